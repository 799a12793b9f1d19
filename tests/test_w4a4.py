"""W4A4 (`quantize --activations w4a4`): activation fake-quant vs compressed-tensors, the artifacts' scales and
configs vs independent references, runtime loading with act-quant on, and the exit-2 errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from v4convert.runtime.act_quant import mxfp4_fake_quant, nvfp4_fake_quant

TINY_V3 = Path(__file__).resolve().parents[1] / "v4convert" / "data" / "tiny-v3"
CALIB = ["--calib-tokens", "512", "--calib-seq-len", "128", "--propagate", "original", "--method", "rtn"]


def _x(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))   # heavy tails
    x[0, :16] = 0.0                                    # an all-zero block
    x[-1, 3] = 40.0                                    # an outlier that sets the tensor amax
    return x


def _ct_forward(x: torch.Tensor, preset: str, global_scale: torch.Tensor | None) -> torch.Tensor:
    """compressed-tensors' own input path: ``forward_quantize(module, x, "input", preset args)``."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    m = torch.nn.Module()
    m.quantization_status = QuantizationStatus.COMPRESSED
    if global_scale is not None:
        m.input_global_scale = torch.nn.Parameter(global_scale.reshape(1), requires_grad=False)
    return forward_quantize(m, x, "input", PRESET_SCHEMES[preset]["input_activations"])


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e2m1_scalar(v: float) -> float:
    """Nearest E2M1 value, ties to the even code (scalar; vLLM's ``cast_to_fp4`` bounds)."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(_E2M1[i] - a), i % 2))
    return math.copysign(_E2M1[best], v)


def _nvfp4_scalar(x: np.ndarray, g: float) -> np.ndarray:
    """Scalar transcription of vLLM's ``ref_nvfp4_quant`` + ``dequantize_to_dtype`` (float32 arithmetic)."""
    f32 = np.float32
    out = np.zeros_like(x, dtype=np.float32)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 16):
            blk = x[r, b:b + 16].astype(np.float32)
            s = f32(g) * (f32(np.abs(blk).max()) / f32(6.0))
            s = f32(np.float32(min(max(s, -448.0), 448.0)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
            if s == 0:
                continue
            eff = f32(s / f32(g))
            for j, v in enumerate(blk):
                out[r, b + j] = f32(_e2m1_scalar(float(np.clip(f32(v / eff), -6, 6)))) * eff
    return out


def _mxfp4_scalar(x: np.ndarray) -> np.ndarray:
    """Scalar MXFP4 with c-t's exponent rule: amax rounded to a power of two up when its mantissa >= 1.75."""
    out = np.zeros_like(x, dtype=np.float32)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            blk = x[r, b:b + 32].astype(np.float32)
            amax = float(np.abs(blk).max())
            if amax == 0:
                continue
            m, e = math.frexp(amax)                       # amax = m * 2**e, m in [0.5, 1)
            p2 = e if m >= 0.875 else e - 1               # mantissa (2m) >= 1.75 rounds up
            s = np.float32(2.0 ** (min(max(p2 - 2, -127), 128)))
            for j, v in enumerate(blk):
                out[r, b + j] = np.float32(_e2m1_scalar(float(np.clip(np.float32(v / s), -6, 6)))) * s
    return out


@pytest.mark.parametrize("shape", [(7, 48), (3, 64)])
def test_nvfp4_act_quant_bit_exact_vs_compressed_tensors_and_scalar_reference(shape):
    x = _x(shape)
    g = (448.0 * 6.0 / x.abs().amax()).float()
    ours = nvfp4_fake_quant(x, g)
    assert torch.equal(ours, _ct_forward(x, "NVFP4", g))
    assert np.array_equal(ours.numpy(), _nvfp4_scalar(x.numpy(), float(g)))
    # a static scale from a smaller calibration amax clips (the runtime sees what vLLM would serve)
    g_small = (448.0 * 6.0 / (x.abs().amax() / 8)).float()
    assert torch.equal(nvfp4_fake_quant(x, g_small), _ct_forward(x, "NVFP4", g_small))
    x3 = x.reshape(1, *shape)                          # [B, T, K] like the runtime's activations
    assert torch.equal(nvfp4_fake_quant(x3, g), ours.reshape(1, *shape))


@pytest.mark.parametrize("shape", [(7, 64), (5, 96)])
def test_mxfp4_act_quant_bit_exact_vs_compressed_tensors_and_scalar_reference(shape):
    x = _x(shape, seed=1)
    x[1, 32:64] *= 1e-30                               # tiny exponents
    ours = mxfp4_fake_quant(x)
    assert torch.equal(ours, _ct_forward(x, "MXFP4", None))
    assert np.array_equal(ours.numpy(), _mxfp4_scalar(x.numpy()))


# ------------------------------------------------------------------------------------------ artifacts
def _quantize(out: Path, calib: Path, *extra: str):
    from v4convert.cli import main
    return CliRunner().invoke(main, ["quantize", str(TINY_V3), "--fp4", "--out", str(out), "--calib", str(calib),
                                     *CALIB, "--activations", "w4a4", *extra])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, calib_txt) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("w4a4")
    out = {}
    for fmt in ("compressed-tensors", "modelopt"):
        r = _quantize(root / fmt, calib_txt, "--format", fmt)
        assert r.exit_code == 0, r.output
        out[fmt] = root / fmt
    return out


@pytest.fixture(scope="module")
def ref_amax(calib_txt) -> dict[str, float]:
    """max|x| of every FP4 linear's inputs from plain forward hooks on the source model (same windows)."""
    from v4convert.calib.data import calibration_windows
    from v4convert.runtime import load
    from v4convert.runtime.common import Linear
    data = calibration_windows(TINY_V3, calib_txt, 512, 128)
    model = load(TINY_V3, max_seq_len=128, max_batch_size=4)
    amax: dict[str, float] = {}
    for n, m in model.named_modules():
        if isinstance(m, Linear) and ".mlp." in n:
            m.register_forward_pre_hook(lambda mod, a, n=n: amax.__setitem__(
                n, max(amax.get(n, 0.0), float(a[0].abs().max())) if a[0].numel() else amax.get(n, 0.0)))
    with torch.inference_mode():
        for i in range(0, data.windows.shape[0], 4):
            model(data.windows[i:i + 4])
    return amax


def _group(mod: str) -> str:
    """The module set sharing one input scale: a layer's experts per w13/w2; gate+up of an MLP."""
    import re
    mod = re.sub(r"\.experts\.\d+\.", ".experts.*.", mod)
    return re.sub(r"\.(gate|up)_proj$", ".w13", mod)


def _scales(path: Path, suffix: str) -> dict[str, float]:
    out = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():      # noqa: SIM118
                if k.endswith(suffix):
                    out[k[: -len(suffix)]] = float(f.get_tensor(k).reshape(-1)[0])
    return out


def test_compressed_tensors_w4a4_config_and_scales(artifacts, ref_amax):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    cfg = json.loads((artifacts["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(cfg)
    fp4 = [g for g in cfg["config_groups"].values() if g["format"] == "nvfp4-pack-quantized"]
    assert len(fp4) == 1
    assert QuantizationArgs.model_validate(fp4[0]["input_activations"]) == PRESET_SCHEMES["NVFP4"]["input_activations"]
    g = _scales(artifacts["compressed-tensors"], ".input_global_scale")
    packed = _scales(artifacts["compressed-tensors"], ".weight_global_scale")
    assert set(g) == set(packed) and len(g) == 156          # every NVFP4 linear, nothing else
    groups: dict[str, float] = {}
    for mod in g:
        groups[_group(mod)] = max(groups.get(_group(mod), 0.0), ref_amax.get(mod, 0.0))
    by_group: dict[str, set[float]] = {}
    for mod, v in g.items():
        by_group.setdefault(_group(mod), set()).add(v)
        # the reference runs the whole model, the pass block by block: hidden states agree to float32 rounding
        # (BLAS paths), so the amax matches to ~1e-7 relative, not bit for bit
        want = 448.0 * 6.0 / groups[_group(mod)]
        assert abs(v / want - 1) < 1e-5, (mod, v, want)
    assert all(len(vs) == 1 for vs in by_group.values())       # one value per fused group / layer's experts
    assert len(by_group) == 1 * 2 + 3 * 2 + 3 * 2             # dense layer 0 (w13, down); 3 MoE layers x (experts, shared)


def test_modelopt_w4a4_config_and_scales(artifacts):
    hf = json.loads((artifacts["modelopt"] / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "NVFP4"
    mo = _scales(artifacts["modelopt"], ".input_scale")
    ct = _scales(artifacts["compressed-tensors"], ".input_global_scale")
    assert set(mo) == set(ct)
    for mod, v in mo.items():     # amax/(6*448) and 448*6/amax of the same calibrated amax
        assert abs(v * ct[mod] - 1.0) < 1e-6, mod


def _kld(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_runtime_applies_act_quant_and_stays_close(artifacts, fmt):
    from v4convert.runtime import load
    from v4convert.runtime.common import Linear
    art = artifacts[fmt]
    on, off, ref = load(art, max_seq_len=64), load(art, max_seq_len=64, act_quant=False), load(TINY_V3, max_seq_len=64)
    assert sum(isinstance(m, Linear) and m.act_quant is not None for m in on.modules()) == 156
    assert not any(isinstance(m, Linear) and m.act_quant is not None for m in off.modules())
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b, r = (m(ids).log_softmax(-1) for m in (on, off, ref))
    assert not torch.equal(a, b)                               # activation quant is active
    k4, k16 = _kld(r, a), _kld(r, b)
    assert k4 < 0.1 and k4 < 3 * k16, (k4, k16)
    packed = load(art, max_seq_len=64, packed=True)             # packed FP4 weights: the same input quantizers
    assert sum(isinstance(m, Linear) and m.act_quant is not None for m in packed.modules()) == 156
    with torch.inference_mode():
        assert _kld(r, packed(ids).log_softmax(-1)) < 0.1


def test_w4a16_default_has_no_activation_scales(calib_txt):
    """Without --activations (w4a16) the plan writes no input scale and the config declares no input quant."""
    from v4convert.calib.apply import CalibOptions
    from v4convert.checkpoint import Checkpoint
    from v4convert.formats.containers import Part
    from v4convert.quant.engine import output_config
    from v4convert.quant.plan import Options, make_plan
    from v4convert.quant.recipes import RuleSet, preset
    for copts in (None, CalibOptions(stats="x")):
        with Checkpoint.open(TINY_V3) as ck:
            plan = make_plan(ck, RuleSet(preset("nvfp4-experts")), Options(calib=copts))
        assert not any(e.part is Part.INPUT_SCALE for t in plan.tensors() for e in t.out)
        cfg, _ = output_config(plan)
        assert all(g["input_activations"] is None for g in cfg["quantization_config"]["config_groups"].values()
                   if g["format"] != "float-quantized")


@pytest.mark.parametrize("extra, match", [
    (("--activations", "w4a4"), "add --calib"),
    (("--activations", "w4a4", "--calib", "--format", "deepseek", "--scheme", "mxfp4"), "no place for activation"),
    (("--calib", "--method", "rtn"), "data-free"),          # rtn + --calib stays an error for weight-only
])
def test_bad_w4a4_requests_exit_2(tmp_path, extra, match):
    from v4convert.cli import main
    r = CliRunner().invoke(main, ["quantize", str(TINY_V3), "--fp4", "--out", str(tmp_path / "o"), *extra])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and match in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_uncalibrated_linear_is_a_clear_error(tmp_path, calib_txt):
    """The MTP block is never run by the calibration forward: W4A4 names it and the --keep fix (exit 2)."""
    from v4convert.cli import main
    from v4convert.synth import synth
    ck = synth("v3-tiny", tmp_path / "v3").out
    r = CliRunner().invoke(main, ["quantize", str(ck), "--fp4", "--out", str(tmp_path / "o"), "--calib",
                                  str(calib_txt), "--calib-tokens", "128", "--calib-seq-len", "64", "--method", "rtn",
                                  "--activations", "w4a4"])
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: --activations w4a4: tensor model.layers.") and "--keep 'model.layers." in last
    assert not (tmp_path / "o").exists()


def test_v4_w4a4_repacked_experts_get_scales_and_run(tmp_path, calib_txt):
    """V4: the native MXFP4 experts re-packed to NVFP4 are not re-quantized but still get a calibrated input scale;
    the artifact runs with act-quant on, close to the reference."""
    from v4convert.cli import main
    from v4convert.runtime import load
    from v4convert.runtime.common import Linear
    src = TINY_V3.parent / "tiny-v4"
    r = CliRunner().invoke(main, ["quantize", str(src), "--fp4", "--out", str(tmp_path / "o"), "--calib", str(calib_txt),
                                  "--calib-tokens", "128", "--calib-seq-len", "64", "--method", "rtn",
                                  "--activations", "w4a4"])
    assert r.exit_code == 0, r.output
    g = _scales(tmp_path / "o", ".input_global_scale")
    assert set(g) == set(_scales(tmp_path / "o", ".weight_global_scale")) and len(g) == 204
    assert len({v for k, v in g.items() if k.startswith("layers.1.ffn.experts.") and k.endswith(".w2")}) == 1
    on, ref = load(tmp_path / "o", max_seq_len=64), load(src, max_seq_len=64)
    assert sum(isinstance(m, Linear) and m.act_quant is not None for m in on.modules()) == 204
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _kld(ref(ids).log_softmax(-1), on(ids).log_softmax(-1)) < 0.1


def test_compressed_tensors_runs_our_w4a4_linears(artifacts):
    """compressed-tensors builds every NVFP4 linear's scheme from our config.json, loads our tensors (with
    ``input_global_scale``) and its own quantized forward equals our runtime's act-quant + matmul bit for bit."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config
    from compressed_tensors.utils.module import replace_direct_state_dict
    from transformers import CompressedTensorsConfig

    from v4convert.checkpoint import Checkpoint
    out = artifacts["compressed-tensors"]
    cfg = json.loads((out / "config.json").read_text())
    comp = ModelCompressor.from_compression_config(CompressedTensorsConfig(**cfg["quantization_config"]))
    stored: dict[str, torch.Tensor] = {}
    for sh in out.glob("*.safetensors"):
        with safe_open(str(sh), "pt") as f:
            for k in f.keys():      # noqa: SIM118
                stored[k] = f.get_tensor(k)
    root, mods = torch.nn.Module(), {}
    gen = torch.Generator().manual_seed(0)
    with Checkpoint.open(out) as ck:
        for info in ck.infos():
            if info.storage.value != "nvfp4_ct":
                continue
            *path, leaf = info.name[: -len(".weight")].split(".")
            parent = root
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, torch.nn.Module())
                parent = getattr(parent, p)
            lin = torch.nn.Linear(info.shape[1], info.shape[0], bias=False)
            parent.add_module(leaf, lin)
            mods[info.name[: -len(".weight")]] = (lin, info)
        apply_quantization_config(root, comp.quantization_config, show_progress=False)
        for m, (lin, info) in mods.items():
            sd = {k[len(m) + 1:]: v for k, v in stored.items() if k.startswith(m + ".") and "." not in k[len(m) + 1:]}
            replace_direct_state_dict(lin, sd)
            lin.quantization_status = QuantizationStatus.COMPRESSED
        comp.decompress_model(root)
        for m, (lin, info) in mods.items():
            lin.register_parameter("bias", None)
            lin.quantization_status = QuantizationStatus.COMPRESSED     # weights = ours exactly (no weight QDQ)
            w = ck.dequantize(info.name)
            lin.weight.data = w
            x = torch.randn(5, info.shape[1], generator=gen) * 3
            with torch.no_grad():
                got = lin(x)                                      # c-t's quantized forward: input QDQ + matmul
            ours = torch.nn.functional.linear(nvfp4_fake_quant(x, stored[m + ".input_global_scale"]), w)
            assert torch.equal(got, ours), m
    assert len(mods) == 156


def test_mxfp4_w4a4_is_dynamic(tmp_path, calib_txt):
    """MXFP4 W4A4: the preset's dynamic per-32 input_activations, no scale tensor; the runtime quantizes the inputs of
    every MXFP4 linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    from v4convert.runtime import load
    from v4convert.runtime.common import Linear
    r = _quantize(tmp_path / "o", calib_txt, "--scheme", "mxfp4")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(cfg)
    mx = [g for g in cfg["config_groups"].values() if g["format"] == "mxfp4-pack-quantized"]
    assert len(mx) == 1
    assert QuantizationArgs.model_validate(mx[0]["input_activations"]) == PRESET_SCHEMES["MXFP4"]["input_activations"]
    assert not _scales(tmp_path / "o", ".input_global_scale")
    m = load(tmp_path / "o", max_seq_len=64)
    kinds = [m.act_quant.kind for m in m.modules() if isinstance(m, Linear) and m.act_quant is not None]
    assert kinds == ["mxfp4"] * 156


def test_verify_no_act_quant_scores_weights_only(artifacts, tmp_path):
    """``verify --no-act-quant``: the W4A4 artifact is scored weights-only (what a peer's file that declares
    activations it was not calibrated for needs); the default follows the config. The weights-only score is the
    KLD of ``load(act_quant=False)`` on the same windows: recomputed here from the runtime directly."""
    import json

    from v4convert.cli import main
    from v4convert.verify import VerifyOptions, make_windows
    from v4convert.verify import DEFAULT_DATA
    art = artifacts["compressed-tensors"]
    reps = {}
    for flag in ((), ("--no-act-quant",)):
        j = tmp_path / f"r{len(flag)}.json"
        r = CliRunner().invoke(main, ["verify", str(TINY_V3), str(art), "--tokens", "128", "--ctx", "64",
                                      "--gen-tokens", "0", "--top-k", "1000000", "--json", str(j), *flag])
        assert r.exit_code == 0, r.output
        reps[bool(flag)] = json.loads(j.read_text())
    on, off = reps[False], reps[True]
    assert on["artifact"]["act_quant"] is True and off["artifact"]["act_quant"] is False
    assert any("--no-act-quant" in n for n in off["artifact"]["notes"])
    assert on["kld"]["mean"] != off["kld"]["mean"]
    from v4convert.runtime import load
    windows = make_windows(TINY_V3, DEFAULT_DATA, VerifyOptions(ctx=64, tokens=128, gen_tokens=0))
    ref, art_m = load(TINY_V3, max_seq_len=64), load(art, max_seq_len=64, act_quant=False)
    with torch.inference_mode():
        kl = torch.cat([(lambda p, q: (p.exp() * (p - q)).sum(-1).reshape(-1))(
            ref(w[None, :-1]).log_softmax(-1), art_m(w[None, :-1]).log_softmax(-1)) for w in windows])
    assert abs(float(kl.mean()) - off["kld"]["mean"]) <= 1e-5 * float(kl.mean()), (float(kl.mean()), off["kld"]["mean"])
