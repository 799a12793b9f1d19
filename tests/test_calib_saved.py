"""Statistics once, many artifacts: `calibrate --stats DIR` + `quantize --calib-stats DIR` (calib/saved.py)."""
from __future__ import annotations


import pytest
from click.testing import CliRunner
from safetensors import safe_open

from v4convert.calib.saved import STATS_FILE, block_linears
from v4convert.cli import main

TEXT = "def g(y):\n    return {k: y * k for k in range(7)}\n" * 150
DATA = ["--calib-tokens", "768", "--calib-seq-len", "96"]


def _ok(*argv: str) -> str:
    r = CliRunner().invoke(main, [str(a) for a in argv])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def saved(tiny_ckpts, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    (d / "c.txt").write_text(TEXT)
    src = tiny_ckpts["v3-tiny"]
    out = _ok("calibrate", src, "--calib", d / "c.txt", *DATA, "--stats", d / "stats", "--imatrix", d / "im.gguf")
    assert "wrote statistics" in out and "wrote imatrix" in out
    return src, d


def test_saved_pass_holds_every_block_linear(saved):
    src, d = saved
    with safe_open(str(d / "stats" / STATS_FILE), framework="pt") as f:
        names = {k.rsplit(":", 1)[0] for k in f.keys()}  # noqa: SIM118
        assert f.metadata()["source"]
    linears = set(block_linears(src))
    # every block linear the forward runs has a record; the absorbed MLA kv_b_proj is not run as a linear
    assert names <= linears and linears - names <= {n for n in linears if n.endswith("kv_b_proj.weight")}
    assert (d / "im.gguf").is_file()


def test_reuse_equals_a_fresh_pass_byte_for_byte(saved, tmp_path):
    """--calib-stats DIR writes the artifact a normal `--calib --propagate original` run writes on the same data."""
    src, d = saved
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    log = _ok("quantize", src, "--fp4", "--method", "gptq", "--calib-stats", d / "stats", "--out", reused)
    assert "reusing the saved pass" in log
    _ok("quantize", src, "--fp4", "--method", "gptq", "--calib", d / "c.txt", *DATA, "--propagate", "original",
        "--out", fresh)
    files = sorted(p.name for p in fresh.iterdir())
    assert files == sorted(p.name for p in reused.iterdir()) and any(f.endswith(".safetensors") for f in files)
    for name in files:
        assert (reused / name).read_bytes() == (fresh / name).read_bytes(), name
    # a second recipe from the same pass (no new pass: the log says it reuses)
    log = _ok("quantize", src, "--fp4", "--scheme", "mxfp4", "--method", "awq", "--calib-stats", d / "stats",
              "--out", tmp_path / "mx")
    assert "reusing the saved pass" in log and (tmp_path / "mx" / "config.json").is_file()


@pytest.mark.parametrize("case", ["both", "not-stats", "other-model", "all-experts"])
def test_bad_reuse_is_one_line_exit_2(saved, tiny_ckpts, tmp_path, case):
    src, d = saved
    args = {"both": [src, "--calib", "--calib-stats", d / "stats"],
            "not-stats": [src, "--calib-stats", tmp_path],
            "other-model": [tiny_ckpts["v4-flash-tiny"], "--calib-stats", d / "stats"],
            "all-experts": [src, "--calib-stats", d / "stats", "--calib-all-experts"]}[case]
    r = CliRunner().invoke(main, ["quantize", *map(str, args), "--fp4", "--method", "gptq", "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_calibrate_needs_an_output_and_respects_the_output_rule(saved, tmp_path):
    src, d = saved
    r = CliRunner().invoke(main, ["calibrate", str(src), "--calib"])
    assert r.exit_code == 2 and "--imatrix" in r.output and "--stats" in r.output
    r = CliRunner().invoke(main, ["calibrate", str(src), "--calib", *DATA, "--stats", str(d / "stats")])
    assert r.exit_code == 2 and "--overwrite" in r.output          # a previous output of ours, not replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, ["calibrate", str(src), "--calib", *DATA, "--stats", str(tmp_path / "foreign"),
                                  "--overwrite"])
    assert r.exit_code == 2 and (tmp_path / "foreign" / "keep.txt").read_text() == "x"
