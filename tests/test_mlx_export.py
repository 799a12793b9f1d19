"""``export --mlx`` judged by mlx-lm itself (mlx[cpu] 0.32.4 + mlx-lm 0.32.2 from PyPI, CPU, in a worker process).

* The bundled trained tiny V3, exported (experts mxfp4, everything else affine 8-bit, float32 so that only the
  weights differ), loads with mlx-lm's own loader, and its logits match our runtime running the *same*
  quantized weights (the MLX tensors decoded back by ``mlx_as_checkpoint``): mean KLD <= 1e-4, top-1 >= 99 %
  on held-out text, prefill and decode steps; mlx-lm's own greedy generation equals ours.
  The check is sensitive: against the unquantized original the KLD is orders of magnitude larger.
* Our MXFP4 artifact of V3 (``quantize --scheme mxfp4 --format deepseek``) re-packs losslessly: the MLX
  expert bytes are the artifact's bytes.
* V3.2 (synthetic, indexer included) in other mixes (nvfp4 / affine 4-bit experts, 8-bit attention,
  unquantized) and the default bfloat16 export sharded in several files load and match.
* V4 is refused before any work, naming the mlx-lm version (it has no deepseek_v4 model).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from v4convert.artifacts import detect_kind
from v4convert.artifacts.runtime import RuntimeRunner
from v4convert.artifacts.mlx import MLXRunner
from v4convert.checkpoint import Checkpoint
from v4convert.cli import main
from v4convert.export.mlx import MLX_LM_CHECKED, Options, export_mlx
from v4convert.export.mlx_read import MLXModel, mlx_as_checkpoint
from v4convert.families.roles import Storage
from v4convert.verify import DEFAULT_DATA, VerifyOptions, greedy, make_windows

DATA = Path(__file__).resolve().parents[1] / "v4convert" / "data"
TINY_V3 = DATA / "tiny-v3"


def _kld_top1(ref: torch.Tensor, art: torch.Tensor) -> tuple[float, float]:
    lp, lq = ref.log_softmax(-1), art.log_softmax(-1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    return float(kld.mean()), float((ref.argmax(-1) == art.argmax(-1)).float().mean())


def _compare(ref_dir: Path, mlx_dir: Path, windows: torch.Tensor, steps: int = 6) -> tuple[float, float]:
    """Prefill every window, then ``steps`` decode steps after the first: logits of both, concatenated."""
    ours, theirs = RuntimeRunner(ref_dir, max_seq_len=windows.shape[1] + steps), MLXRunner(mlx_dir, max_seq_len=512)
    try:
        a, b = [], []
        for w in windows:
            a.append(ours.forward(w[None], 0))
            b.append(theirs.forward(w[None], 0))
        nxt, pos = windows[0, :1], windows.shape[1]
        for i in range(steps):
            a.append(ours.forward(nxt[None], pos + i))
            b.append(theirs.forward(nxt[None], pos + i))
            nxt = a[-1][-1:].argmax(-1)
        return _kld_top1(torch.cat(a), torch.cat(b))
    finally:
        ours.close()
        theirs.close()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return make_windows(TINY_V3, DEFAULT_DATA, VerifyOptions(ctx=128, tokens=2 * 127))


@pytest.fixture(scope="module")
def v3_mlx(tmp_path_factory, mlx_worker) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mlx-v3")
    out = root / "mlx"
    export_mlx(TINY_V3, out, Options(dtype="float32"))
    return out, mlx_as_checkpoint(out, TINY_V3, root / "as-ckpt")


def test_v3_config_and_layout(v3_mlx):
    out, _ = v3_mlx
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert (q["bits"], q["mode"]) == (8, "affine") and cfg["quantization_config"] == q
    assert q["model.layers.1.mlp.switch_mlp.up_proj"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert q["model.layers.0.self_attn.embed_q"]["group_size"] == 32        # nope 32: group 64 falls back
    assert detect_kind(out).value == "mlx"
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.mlp.switch_mlp.gate_proj.scales" in names
    assert not any(".experts." in n or "kv_b_proj" in n for n in names)
    assert (out / "tokenizer.json").is_file()


def test_v3_logits_match_runtime_on_same_weights(v3_mlx, windows):
    out, as_ckpt = v3_mlx
    kld, top1 = _compare(as_ckpt, out, windows)
    assert kld <= 1e-4 and top1 >= 0.99, (kld, top1)
    # sensitivity: the original (unquantized) weights are measurably different
    kld_orig, _ = _compare(TINY_V3, out, windows[:1], steps=0)
    assert kld_orig > 50 * max(kld, 1e-9), (kld_orig, kld)


def test_v3_generates_like_runtime(v3_mlx, windows):
    """mlx_lm.load + mlx_lm.generate (text in, text out, greedy) and generate_step on ids, against our runtime's
    greedy decoding of the same weights."""
    from tokenizers import Tokenizer
    out, as_ckpt = v3_mlx
    tok = Tokenizer.from_file(str(TINY_V3 / "tokenizer.json"))
    mlx = MLXRunner(out)
    ours = RuntimeRunner(as_ckpt, max_seq_len=96)
    try:
        text, prompt_ids = mlx.generate_text("import os\n\ndef main(argv):\n    ", 24)
        mine, _, _ = greedy(ours, torch.tensor(prompt_ids), 24)
        # mlx-lm's streaming BPE detokenizer drops one leading space of the first generated token
        # (tokenizer_utils, trim_space=True); every other character must agree
        want = tok.decode(mine)
        assert text and text == (want[1:] if want.startswith(" ") else want)
        prompt = windows[1, :24]
        theirs = mlx.generate(prompt.tolist(), 24)
        mine, _, _ = greedy(ours, prompt, 24)
        assert theirs == mine
    finally:
        mlx.close()
        ours.close()


def test_mxfp4_artifact_repacked_losslessly(tmp_path, mlx_worker):
    fp4 = tmp_path / "fp4"
    r = CliRunner().invoke(main, ["quantize", str(TINY_V3), "--fp4", "--scheme", "mxfp4", "--format", "deepseek",
                                  "--out", str(fp4)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "mlx"
    res = export_mlx(fp4, out, Options(dtype="float32"))
    assert any("re-packed losslessly" in n for n in res.notes), res.notes
    mlx = MLXModel(out)
    try:
        with Checkpoint.open(fp4) as ck:
            experts = [i for i in ck.infos() if i.expert is not None and not i.mtp]
            assert experts and all(i.storage is Storage.MXFP4 for i in experts)
            proj = {"expert_gate": "gate_proj", "expert_up": "up_proj", "expert_down": "down_proj"}
            for i in experts:
                base = f"model.layers.{i.layer}.mlp.switch_mlp.{proj[i.role.value[0]]}"
                raw = ck.raw(i.name)
                w = mlx._raw(f"{base}.weight")[i.expert].contiguous().view(torch.uint8)
                s = mlx._raw(f"{base}.scales")[i.expert]
                assert torch.equal(w, raw["weight"].view(torch.uint8)), i.name
                assert torch.equal(s, raw["scale"].view(torch.uint8)), i.name
    finally:
        mlx.close()
    kld, top1 = _compare(mlx_as_checkpoint(out, fp4, tmp_path / "as-ckpt"), out,
                         make_windows(TINY_V3, DEFAULT_DATA, VerifyOptions(ctx=96, tokens=95)), steps=2)
    assert kld <= 1e-4 and top1 >= 0.99, (kld, top1)


@pytest.mark.parametrize("quant,attention,experts", [("affine4", "affine8", "nvfp4"), ("none", None, "affine4-g32")])
def test_v32_mixes_match_runtime(tiny_ckpts, tmp_path, mlx_worker, quant, attention, experts):
    src = tiny_ckpts["v32-tiny"]
    out = tmp_path / "mlx"
    export_mlx(src, out, Options(quant=quant, attention=attention, experts=experts, dtype="float32"))
    g = torch.Generator().manual_seed(0)
    with Checkpoint.open(src) as ck:
        ids = torch.randint(0, ck.arch.vocab, (1, 48), generator=g)
    kld, top1 = _compare(mlx_as_checkpoint(out, src, tmp_path / "as-ckpt"), out, ids, steps=3)
    assert kld <= 1e-4 and top1 >= 0.99, (kld, top1)


def test_default_bfloat16_sharded_loads_and_generates(tmp_path, windows, mlx_worker):
    out = tmp_path / "mlx"
    res = export_mlx(TINY_V3, out, Options(shard_bytes=1 << 20))
    assert len(res.paths) > 1 and all(p.name.endswith(f"-of-{len(res.paths):05d}.safetensors") for p in res.paths)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"].values()) == {p.name for p in res.paths}
    kld, top1 = _compare(mlx_as_checkpoint(out, TINY_V3, tmp_path / "as-ckpt"), out, windows, steps=2)
    # Precision, not semantics (float32 exports match to KLD ~1e-8 above): mlx-lm runs a bfloat16 model in
    # bfloat16 throughout; our runtime here in float32 on the same bfloat16 weights. Measured on 4 windows of
    # 128: KLD 1.6e-3, top-1 94 % (our own runtime in bfloat16 vs float32: 1.5e-4, 98 %).
    assert kld <= 4e-3 and top1 >= 0.9, (kld, top1)


def _cli_error(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_v4_refused_naming_mlx_lm_version(tmp_path):
    out = tmp_path / "mlx"
    line = _cli_error(["export", str(DATA / "tiny-v4"), "--mlx", "--out", str(out)])
    assert f"mlx-lm {MLX_LM_CHECKED} has no deepseek_v4 model" in line
    assert not out.exists() and not (tmp_path / "mlx.partial").exists()


def test_bad_spec_and_nonempty_output_are_user_errors(tmp_path):
    assert "unknown MLX quantization 'int3'" in _cli_error(["export", str(TINY_V3), "--mlx", "--mlx-experts", "int3",
                                                            "--out", str(tmp_path / "a")])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    assert "not empty" in _cli_error(["export", str(TINY_V3), "--mlx", "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "x").read_text() == "keep me"


def test_verify_runs_mlx_artifact(v3_mlx, tmp_path):
    out, _ = v3_mlx
    rep = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["verify", str(TINY_V3), str(out), "--tokens", "127", "--ctx", "128",
                                  "--gen-prompts", "1", "--gen-tokens", "4", "--json", str(rep)])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert data["artifact"]["kind"] == "mlx"
    assert data["kld"]["mean"] < 0.05, data["kld"]
