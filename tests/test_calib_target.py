"""``--gptq-target original`` in the statistics pass: the original stream beside the quantized one, the paired
cross-statistics ``Xo^T X`` per linear, and the CLI end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from v4convert.calib.collect import collect_stats
from v4convert.calib.data import calibration_windows
from v4convert.calib.method import MethodSpec, quantize_weight
from v4convert.checkpoint import Checkpoint
from v4convert.formats.fp4_grid import FP4Codec

from .calib_common import linears


def _keep(name, w, stats, gamax):
    return w


def _rtn(name, w, stats, gamax):
    return quantize_weight(MethodSpec(), FP4Codec.MXFP4, w.float(), None).dequantize().to(w.dtype)


@pytest.mark.parametrize("preset", ["v3-tiny", "v4-flash-tiny"])
def test_pairing_identical_streams_and_quantized_stream_unchanged(tiny_ckpts, calib_txt, preset):
    """A quantizer that keeps the weights: both streams are the same model, so every linear's (routed experts
    included: their rows are paired by token) cross-statistics equal its X^T X bit for bit. With RTN: the
    quantized stream's X^T X and coverage are those of the pass without pairing, bit for bit, and the
    cross-statistics differ from X^T X only where an input comes after a quantized linear."""
    ck = tiny_ckpts[preset]
    data = calibration_windows(ck, calib_txt, n_tokens=192, seq_len=64)
    names = linears(ck)
    same = collect_stats(ck, data, names, quantize=_keep, batch=2, target_original=True)
    assert same.stats and all(torch.equal(s.xc, s.xtx) for s in same.stats.values())
    plain = collect_stats(ck, data, names, quantize=_rtn, batch=2)
    paired = collect_stats(ck, data, names, quantize=_rtn, batch=2, target_original=True)
    assert paired.coverage == plain.coverage and set(paired.stats) == set(plain.stats)
    with Checkpoint.open(ck) as c:
        layer = {n: c.tensor_info(n).layer for n in names}
    differ = set()
    for n, s in paired.stats.items():
        assert torch.equal(s.xtx, plain.stats[n].xtx) and s.count == plain.stats[n].count, n
        assert plain.stats[n].xc is None
        if not torch.equal(s.xc, s.xtx):
            differ.add(n)
    first = min(layer.values())
    later = {n for n in paired.stats if layer[n] > first}
    assert later and later <= differ          # every linear after the first layer sees a quantized model's input
    # layer 0 sees the same input in both streams and (all at once, not staged) its statistics come from its
    # original weights: every layer-0 linear, routed experts included, has C == H exactly
    assert {n for n in paired.stats if layer[n] == first}.isdisjoint(differ)


@pytest.mark.parametrize("preset", ["v3-tiny", "v4-flash-tiny"])
def test_true_sequential_stages(tiny_ckpts, calib_txt, preset):
    """``sequential``: a block's stage-0 linears (attention inputs) see what they see unstaged, the later stages
    see the earlier ones quantized (other statistics); experts' counts follow the recorded coverage. With
    pairing: the quantized stream is unchanged (the original weights swapped in for the capture runs are
    swapped back), identical streams still pair exactly, and the staged layer-0 linears now differ."""
    from v4convert.calib.collect import SEQUENTIAL_STAGES
    ck = tiny_ckpts[preset]
    data = calibration_windows(ck, calib_txt, n_tokens=192, seq_len=64)
    names = linears(ck)
    with Checkpoint.open(ck) as c:
        layer = {n: c.tensor_info(n).layer for n in names}
        stage = {n: SEQUENTIAL_STAGES.get(c.tensor_info(n).role, 0) for n in names}
        expert = {n: c.tensor_info(n).expert for n in names}
    plain = collect_stats(ck, data, names, quantize=_rtn, batch=2)
    seq = collect_stats(ck, data, names, quantize=_rtn, batch=2, sequential=True)
    assert set(seq.stats) <= set(plain.stats)
    first = min(layer.values())
    for n, s in seq.stats.items():
        same = torch.equal(s.xtx, plain.stats[n].xtx)
        if stage[n] == 0:          # inputs before any quantized linear of the block: as unstaged
            assert same, n
        elif layer[n] == first and expert[n] is None:
            assert not same, n                 # layer 0's later stages: inputs after quantized linears
        if expert[n] is not None:
            assert s.count == seq.coverage[layer[n]][expert[n]]
    assert any(not torch.equal(s.xtx, plain.stats[n].xtx) for n, s in seq.stats.items() if expert[n] is not None)
    same = collect_stats(ck, data, names, quantize=_keep, batch=2, target_original=True, sequential=True)
    assert all(torch.equal(s.xc, s.xtx) for s in same.stats.values())
    paired = collect_stats(ck, data, names, quantize=_rtn, batch=2, target_original=True, sequential=True)
    assert paired.coverage == seq.coverage and set(paired.stats) == set(seq.stats)
    for n, s in paired.stats.items():
        assert torch.equal(s.xtx, seq.stats[n].xtx), n
        if layer[n] == first and expert[n] is None:
            assert torch.equal(s.xc, s.xtx) == (stage[n] == 0), n


def test_cli_gptq_target_original(tiny_ckpts, calib_txt, tmp_path):
    """``--true-sequential --gptq-target original`` end to end: in the calibration options (plan fingerprint), a
    loadable artifact whose FP4 bytes differ from plain GPTQ's."""
    arts = {}
    for target in ("quantized", "original"):
        out = tmp_path / target
        args = [str(tiny_ckpts["v3-tiny"]), "--fp4", "--out", str(out), "--workers", "1", "--calib", str(calib_txt),
                "--calib-tokens", "128", "--calib-seq-len", "64", "--scheme", "mxfp4", "--method", "awq+gptq",
                "--gptq-damp", "1.0", *(("--true-sequential", "--gptq-target", target) if target == "original" else ())]
        r = subprocess.run([sys.executable, "-m", "v4convert.cli", "quantize", *args], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stderr
        arts[target] = out
    cal = json.loads((arts["original"] / "model.safetensors.index.json").read_text())["metadata"]["v4convert"]
    assert cal["calibration"]["method"] == "awq+gptq"
    from v4convert.calib.apply import CalibOptions
    assert "gptq_target" in CalibOptions(gptq_target="original").key()
    assert "true_sequential" in CalibOptions(true_sequential=True).key()
    assert "gptq_target" not in CalibOptions().key()                  # older plans keep their fingerprint
    assert "true_sequential" not in CalibOptions().key()
    a, b = (sorted(p.read_bytes() for p in arts[t].glob("*.safetensors")) for t in ("quantized", "original"))
    assert a != b
    from v4convert.runtime import load
    assert torch.isfinite(load(arts["original"], max_seq_len=16)(torch.arange(2, 10)[None])).all()
