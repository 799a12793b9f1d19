"""``v4convert demo``: bundled trained V3 -> NVFP4 and MXFP4 -> verify each -> table, offline."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from v4convert.cli import main


def test_demo_quantizes_verifies_and_reports(tmp_path):
    n = torch.get_num_threads()
    try:
        out = tmp_path / "demo"
        r = CliRunner().invoke(main, ["demo", "--out", str(out), "--tokens", "126", "--ctx", "64", "--threads", "1"],
                               catch_exceptions=False)
    finally:
        torch.set_num_threads(n)
    assert r.exit_code == 0, r.output
    for label in ("NVFP4 experts (RTN)", "MXFP4 experts (OCP floor)", "NVFP4 experts (GPTQ+4/6, calib)"):
        assert label in r.output
    assert "KLD mean" in r.output and str(out / "nvfp4") in r.output
    assert json.loads((out / "nvfp4-gptq" / "calibration.json").read_text())["source"] == "bundled training split"
    for name in ("nvfp4", "mxfp4", "nvfp4-gptq"):
        assert (out / name / "config.json").is_file()
        j = json.loads((out / f"verify-{name}.json").read_text())
        # FP4 experts of a trained model: a real but small loss
        assert 1e-5 < j["kld"]["mean"] < 0.5, j["kld"]
        assert 0.6 < j["top1_agreement"] <= 1.0
        assert 0.98 < j["ppl"]["ratio"] < 1.5
        assert j["delta_p"]["rms"] > 0
        # the recipes quantize dense MLPs too, so every layer moves
        assert j["hidden"]["available"] and min(j["hidden"]["rel_err"]) > 0
    assert json.loads((out / "verify-mxfp4.json").read_text())["reference"]["from_cache"] is True
    assert (out / "ref-logits.safetensors").is_file()
