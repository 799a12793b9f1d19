"""``v4convert verify`` end to end on the bundled trained tiny models (v4convert/data/tiny-v3, tiny-v4).

REF vs REF is exact; a deliberately damaged artifact (one expert's weights scaled) fails ``--max-kld`` with
exit 1; cached reference logits give the same report as a fresh run; V4's FP4 outputs give plausible numbers.
Small settings (2 windows of 64 tokens, 1 greedy prompt of 4 tokens) keep each run short on 2 shared cores.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from v4convert.cli import main
from v4convert.demo import bundled_model, quantize_variant
from v4convert.verify import VerifyOptions, verify

SMALL = ["--ctx", "64", "--tokens", "126", "--gen-tokens", "4", "--gen-prompts", "1"]
SPEED_KEYS = ("prefill_tok_s", "decode_tok_s")



def _cli(*args: str):
    return CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The trained V3 release with routed expert 0 of layer 1 scaled x10 (its down_proj FP8 block scales)."""
    src = bundled_model("v3")
    dst = tmp_path_factory.mktemp("damaged") / "v3-damaged"
    shutil.copytree(src, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"
    shard = dst / idx["weight_map"][name]
    t = load_file(str(shard))
    t[name] = t[name] * 10.0
    save_file(t, str(shard), metadata={"format": "pt"})
    return dst


def test_ref_vs_ref_is_exact(tmp_path):
    ref = bundled_model("v3")
    out = tmp_path / "r.json"
    r = _cli(str(ref), str(ref), *SMALL, "--json", str(out), "--max-kld", "1e-9", "--min-top1", "1.0")
    assert r.exit_code == 0, r.output
    j = json.loads(out.read_text())
    assert j["kld"]["max"] <= 1e-9 and abs(j["kld"]["mean"]) <= 1e-9
    assert j["top1_agreement"] == 1.0 and j["ppl"]["ratio"] == 1.0
    assert j["greedy"]["prefix_agreement"] == 1.0
    assert j["hidden"]["available"] and max(j["hidden"]["rel_err"]) == 0.0
    assert len(j["hidden"]["rel_err"]) == 4 and j["settings"]["scored_tokens"] == 126
    assert "PASS" in r.output


def test_damaged_expert_is_caught_and_cached_logits_give_the_same_report(tmp_path, damaged):
    ref = bundled_model("v3")
    cache, a, b = tmp_path / "ref.safetensors", tmp_path / "a.json", tmp_path / "b.json"
    r1 = _cli(str(ref), str(damaged), *SMALL, "--json", str(a), "--max-kld", "0.01", "--save-ref-logits", str(cache))
    assert r1.exit_code == 1, r1.output
    assert "FAIL: mean KLD" in r1.output
    assert cache.is_file() and not (tmp_path / "ref.safetensors.parts").exists()
    r2 = _cli(str(ref), str(damaged), "--json", str(b), "--max-kld", "0.01", "--ref-logits", str(cache))
    assert r2.exit_code == 1, r2.output
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja["kld"]["mean"] > 0.01 and ja["top1_agreement"] < 1.0
    # layer 0 is dense and untouched; from layer 1 on the damaged expert shows
    assert ja["hidden"]["rel_err"][0] == 0.0 and ja["hidden"]["rel_err"][1] > 1e-3
    assert ja["reference"].pop("from_cache") is False and jb["reference"].pop("from_cache") is True
    for k in SPEED_KEYS:          # the artifact is timed again; everything else must be identical
        ja["artifact"].pop(k), jb["artifact"].pop(k)
    assert ja == jb


def test_no_greedy_prompts(tmp_path):
    """``--gen-prompts 0`` skips the greedy comparison (its agreement is n/a) instead of crashing."""
    ref = bundled_model("v3")
    out = tmp_path / "r.json"
    r = _cli(str(ref), str(ref), "--ctx", "64", "--tokens", "126", "--gen-prompts", "0", "--json", str(out))
    assert r.exit_code == 0, r.output
    g = json.loads(out.read_text())["greedy"]
    assert g["prompts"] == 0 and g["tokens"] == 0


def test_cache_with_other_settings_is_refused(tmp_path):
    ref = bundled_model("v3")
    cache = tmp_path / "ref.safetensors"
    assert _cli(str(ref), str(ref), *SMALL, "--save-ref-logits", str(cache)).exit_code == 0
    r = CliRunner().invoke(main, ["verify", str(ref), str(ref), "--ref-logits", str(cache), "--ctx", "32"])
    assert r.exit_code == 2 and "--ctx 32 differs from the reference logits' 64" in r.output


def test_plot(tmp_path):
    import matplotlib  # noqa: F401  (in the test extra; the missing case is tested below)
    ref = bundled_model("v3")
    png = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["verify", str(ref), str(ref), *SMALL, "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    png = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["verify", str(bundled_model("v3")), str(bundled_model("v3")), *SMALL,
                                  "--plot", str(png)])
    assert r.exit_code == 2 and "pip install 'v4convert[plot]'" in r.output
    assert not png.exists()


def test_unknown_artifact_is_a_clear_error(tmp_path):
    bogus = tmp_path / "thing.bin"
    bogus.write_bytes(b"x")
    r = CliRunner().invoke(main, ["verify", str(bundled_model("v3")), str(bogus)])
    assert r.exit_code == 2 and "thing.bin" in r.output and "not an artifact" in r.output


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_v4_fp4_outputs_plausible(tmp_path, scheme):
    """V4's routed experts are MXFP4 already (re-packed or kept); shared experts go FP8 -> FP4: a real, small loss."""
    ref = bundled_model("v4")
    out = tmp_path / scheme
    quantize_variant(ref, out, scheme)
    r = verify(ref, out, VerifyOptions(ctx=64, tokens=126, gen_tokens=4, gen_prompts=1))
    assert 0.0 < r["kld"]["mean"] < 0.05 and r["top1_agreement"] > 0.9
    assert 0.95 < r["ppl"]["ratio"] < 1.05
    assert r["hidden"]["available"] and len(r["hidden"]["rel_err"]) == 4
    assert r["reference"]["ppl"] < 200      # trained: far below the unigram baseline (see train_report.json)
