"""The layer-sequential statistics pass and `quantize --calib`: coverage, statistics, CLI, errors, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from v4convert.calib.collect import collect_stats
from v4convert.calib.data import calibration_windows
from v4convert.checkpoint import Checkpoint
from v4convert.quant.engine import partial_dir

from .calib_common import linears


@pytest.mark.parametrize("preset", ["v3-tiny", "v4-flash-tiny"])
def test_coverage_and_stats_equal_a_direct_count(tiny_ckpts, calib_txt, preset):
    """Routed counts per expert = a bincount of the runtime's own router outputs; each linear's X^T X = the sum
    over its inputs seen by a plain forward hook (propagate=original: same hidden states as the model)."""
    from v4convert.runtime import load
    from v4convert.runtime.common import Linear
    from v4convert.runtime.deepseek_v4 import model_name
    ck = tiny_ckpts[preset]
    data = calibration_windows(ck, calib_txt, n_tokens=192, seq_len=64)
    names = linears(ck)
    col = collect_stats(ck, data, names, propagate=False, batch=2)
    model = load(ck, max_seq_len=64, max_batch_size=3)
    rename = model_name if preset.startswith("v4") else (lambda n: n)
    direct_x: dict[str, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for n in names:
        m = model.get_submodule(rename(n)[:-7])
        assert isinstance(m, Linear)
        hooks.append(m.register_forward_pre_hook(
            lambda mod, a, n=n: direct_x.__setitem__(n, direct_x.get(n, 0) + a[0].reshape(-1, a[0].shape[-1]).double().T
                                                     @ a[0].reshape(-1, a[0].shape[-1]).double())))
    blocks = model.model.layers if hasattr(model, "model") else model.layers
    for li, blk in enumerate(blocks[: model.args.arch.n_layers]):
        moe = getattr(blk, "mlp", None) or getattr(blk, "ffn", None)
        if hasattr(moe, "experts"):
            n_exp = len(moe.experts)
            hooks.append(moe.gate.register_forward_hook(
                lambda mod, a, out, li=li, e=n_exp: counts.__setitem__(
                    li, counts.get(li, 0) + torch.bincount(out[1].reshape(-1), minlength=e))))
    model(data.windows)
    for h in hooks:
        h.remove()
    assert col.coverage and col.coverage == {k: v.tolist() for k, v in counts.items()}
    assert set(col.stats) == set(direct_x)
    with Checkpoint.open(ck) as c:
        where = {n: (c.tensor_info(n).layer, c.tensor_info(n).expert) for n in names}
    for n, s in col.stats.items():
        torch.testing.assert_close(s.xtx, direct_x[n], rtol=1e-4, atol=1e-3)
        layer, e = where[n]
        if e is not None:                      # an expert's rows = the tokens routed to it
            assert s.count == col.coverage[layer][e]
    # --calib-all-experts: every expert's statistics see every token; coverage stays the routed count
    col_all = collect_stats(ck, data, names, propagate=False, all_experts=True, batch=2)
    assert col_all.coverage == col.coverage
    experts = [n for n in col.stats if where[n][1] is not None]       # main-model experts (MTP is not run)
    assert experts and all(col_all.stats[n].count == data.n_tokens for n in experts)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "v4convert.cli", "quantize", *args]


@pytest.fixture(scope="module")
def calibrated(tiny_ckpts, calib_txt, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("cq") / "out"
    args = [str(tiny_ckpts["v3-tiny"]), "--fp4", "--out", str(out), "--workers", "1", "--calib", str(calib_txt),
            "--calib-tokens", "128", "--calib-seq-len", "64", "--method", "awq+gptq", "--shard-size", "300KB", "--plot"]
    r = subprocess.run(_cli(*args), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    return out, args, r.stderr


def test_calibrated_artifact(calibrated):
    out, _, err = calibrated
    assert "expert coverage" in err and "warning:" in err       # 128 tokens leave some experts short
    rep = json.loads((out / "calibration.json").read_text())
    assert rep["method"] == "awq+gptq" and rep["tokens"] == 128 and rep["fallback_experts"]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["v4convert"]["calibration"]["method"] == "awq+gptq"
    assert not out.with_name(out.name + ".calib-stats.safetensors").exists()
    assert (out / "calibration-coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from v4convert.runtime import load
    logits = load(out, max_seq_len=16)(torch.arange(2, 10)[None])
    assert torch.isfinite(logits).all()


def test_sigkill_and_resume_byte_identical(calibrated, tmp_path):
    ref, args, _ = calibrated
    out = tmp_path / "out"
    args = [out.as_posix() if a == str(ref) else a for a in args] + ["--sync-every", "1"]
    done = partial_dir(out) / ".journal" / "done"
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while proc.poll() is None:
        if done.is_file() and len(done.read_text().splitlines()) >= 30:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert out.with_name(out.name + ".calib-stats.safetensors").is_file()
    r = subprocess.run(_cli(*args), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "reusing statistics" in r.stderr and "resuming: " in r.stderr
    for p in sorted(ref.iterdir()):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_mxfp4_mse_and_scales_search_cli(tiny_ckpts, calib_txt, tmp_path):
    """``--scheme mxfp4 --method gptq+mse --gptq-scales search --gptq-refine 1`` end to end: recorded in the calibration options
    (and so in the plan fingerprint), a loadable artifact."""
    out = tmp_path / "out"
    args = [str(tiny_ckpts["v3-tiny"]), "--fp4", "--out", str(out), "--workers", "1", "--calib", str(calib_txt),
            "--calib-tokens", "128", "--calib-seq-len", "64", "--scheme", "mxfp4", "--method", "gptq+mse",
            "--gptq-scales", "search", "--gptq-refine", "1"]
    r = subprocess.run(_cli(*args), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    cal = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["v4convert"]["calibration"]
    assert cal["method"] == "gptq+mse"
    from v4convert.calib.apply import CalibOptions
    assert "gptq_scales_search" in CalibOptions(gptq_scales_search=True).key()
    assert "gptq_refine" in CalibOptions(gptq_refine=1).key()
    assert "gptq_scales_search" not in CalibOptions().key()          # older plans keep their fingerprint
    assert "gptq_refine" not in CalibOptions().key()
    from v4convert.runtime import load
    assert torch.isfinite(load(out, max_seq_len=16)(torch.arange(2, 10)[None])).all()


@pytest.mark.parametrize("extra,match", [
    (("--method", "gptq"), "needs calibration data"),
    (("--calib", "--method", "rtn"), "data-free"),
    (("--method", "gptq+bogus", "--calib"), "unknown part"),
    (("--method", "rtn+mse"), "at most one"),
    (("--method", "gptq", "--scale-method", "mse", "--calib"), "alias"),
    (("--calib", "NOPE.txt"), "not found"),
    (("--calib", "--calib-tokens", "0"), "must be > 0"),
    (("--plot",), "needs --calib"),
    (("--calib", "--gptq-act-order", "--gptq-scales", "search"), "needs --gptq-scales before"),
    (("--calib", "--method", "awq", "--gptq-refine", "2"), "has no gptq"),
    (("--calib", "--method", "awq", "--gptq-target", "original"), "has no gptq"),
    (("--calib", "--propagate", "original", "--gptq-target", "original"), "needs --propagate quantized"),
    (("--calib", "--propagate", "original", "--true-sequential"), "needs --propagate quantized"),
])
def test_bad_calibration_requests_exit_2(tiny_ckpts, tmp_path, extra, match):
    from v4convert.cli import main
    r = CliRunner().invoke(main, ["quantize", str(tiny_ckpts["v3-tiny"]), "--fp4", "--out", str(tmp_path / "o"),
                                  *[str(tmp_path / e) if e == "NOPE.txt" else e for e in extra]])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and match in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
