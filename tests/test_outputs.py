"""issue #20 item 1: --overwrite never destroys what we did not write (sentinel files for every case).

Each case runs the real CLI (in-process) for quantize, export and synth and checks the exit code and
that every file in the area (source, sentinels beside it, foreign dirs) is byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from v4convert import outputs
from v4convert.cli import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> sha256 (links recorded as their target)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            if p.is_symlink():
                out[str(p.relative_to(root))] = "->" + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def area(tiny_ckpts, tmp_path) -> Path:
    """tmp/area/{src (a v3-tiny checkpoint + sentinel), sentinel.txt, foreign/ (a user's dir)}."""
    a = tmp_path / "area"
    shutil.copytree(tiny_ckpts["v3-tiny"], a / "src")
    (a / "src" / "notes.txt").write_text("the user's notes inside the checkpoint")
    (a / "sentinel.txt").write_text("a file beside the source")
    (a / "foreign").mkdir()
    (a / "foreign" / "thesis.tex").write_text("do not delete")
    return a


def quantize(src: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(src), "--fp4", "--out", str(out), "--workers", "1", "--shard-size", "300KB", *extra]


def export(src: Path, out: Path, *extra: str) -> list[str]:
    return ["export", str(src), "--gguf", "--out", str(out), *extra]


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def refused(args: list[str], area: Path, words: str) -> None:
    before = snapshot(area)
    for extra in ([], ["--overwrite"]):
        r = run(args + extra)
        assert r.exit_code == 2, r.output
        lines = [x for x in r.output.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and words in lines[0], r.output
        assert "Traceback" not in r.output
        assert snapshot(area) == before


@pytest.mark.parametrize("cmd", ["quantize", "export"])
def test_out_is_contains_or_inside_the_source(area, cmd):
    src = area / "src"
    if cmd == "quantize":
        refused(quantize(src, src), area, "is the source")
        refused(quantize(src, area), area, "contains the source")
        refused(quantize(src, src / "sub"), area, "is inside the source")
        (area / "link").symlink_to(src)                    # a symlink to the source is the source
        refused(quantize(src, area / "link"), area, "is the source")
    else:
        refused(export(src, src / "m.gguf"), area, "is inside the source")
        refused(export(src, src / "m.gguf", "--split-max-size", "1M"), area, "is inside the source")
        (area / "link").symlink_to(src)
        refused(export(src, area / "link" / "m.gguf"), area, "is inside the source")
    # the partial-path trap: a source named OUT.partial must not be taken for our scratch
    part = area / "out.partial"
    shutil.copytree(src, part)
    if cmd == "quantize":
        refused(quantize(part, area / "out"), area, "the source")


def test_export_split_control_and_refusals(area):
    src = area / "src"
    before = snapshot(area)
    r = run(export(src, area / "m.gguf", "--split-max-size", "1M"))
    assert r.exit_code == 0, r.output
    made = set(snapshot(area)) - set(before)
    assert made == {"m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "Modelfile"}
    assert all(snapshot(area)[k] == v for k, v in before.items())


def test_unrelated_nonempty_dir_and_foreign_files_refused(area):
    src = area / "src"
    refused(quantize(src, area / "foreign"), area, "not written by v4convert")
    refused(["synth", "--preset", "v3-tiny", "--out", str(area / "foreign")], area, "not written by v4convert")
    (area / "user.gguf").write_bytes(b"GGUF not ours")
    refused(export(src, area / "user.gguf"), area, "not written by v4convert")
    # a Modelfile the user wrote beside the target
    (area / "Modelfile").write_text("FROM ./mine.gguf\n")
    refused(export(src, area / "new.gguf"), area, "Modelfile")
    assert run(export(src, area / "new.gguf", "--no-modelfile")).exit_code == 0
    # a foreign OUT.partial (scratch path) is never deleted
    (area / "q.partial").mkdir()
    (area / "q.partial" / "data").write_text("user data")
    refused(quantize(src, area / "q"), area, "scratch path")


def test_previous_output_replaced_only_with_overwrite(area):
    src = area / "src"
    for args, out in ((quantize(src, area / "q"), area / "q"), (export(src, area / "m.gguf"), area / "m.gguf"),
                      (["synth", "--preset", "v3-tiny", "--out", str(area / "s")], area / "s")):
        assert run(args).exit_code == 0
        assert outputs.is_ours(out)
        first = snapshot(area)
        r = run(args)
        assert r.exit_code == 2 and "--overwrite" in r.output
        assert snapshot(area) == first
        r = run(args + ["--overwrite"])
        assert r.exit_code == 0, r.output
        after = snapshot(area)
        assert after == first          # deterministic writers: the replacement is byte-identical
        assert not list(area.glob("*.partial")) and not list(area.glob("*.old")) \
            and not list(area.glob("*.v4convert-swap"))


def test_empty_dir_is_an_output(area):
    (area / "empty").mkdir()
    r = run(quantize(area / "src", area / "empty"))
    assert r.exit_code == 0, r.output
    assert outputs.is_ours(area / "empty") and (area / "empty" / "config.json").is_file()


def test_remove_ours_refuses_foreign(area):
    with pytest.raises(outputs.OutputError, match="not written by v4convert"):
        outputs.remove_ours(area / "foreign")
    assert (area / "foreign" / "thesis.tex").is_file()


@pytest.mark.parametrize("fmt", [["--sharded", "--tp", "1"], ["--mlx"]])
def test_sharded_and_mlx_never_write_inside_the_source(area, fmt):
    """The sharded and MLX exporters follow the same rule: an output inside (or being) the source, or a user's
    non-empty directory, is refused with one line and nothing is touched."""
    src = area / "src"
    before = snapshot(area)
    for out, words in ((src / "sub", "inside the source"), (src, "not empty"), (area / "foreign", "not empty")):
        r = run(["export", str(src), *fmt, "--out", str(out)])
        assert r.exit_code == 2, r.output
        lines = [x for x in r.output.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and words in lines[0], r.output
        assert snapshot(area) == before
    r = run(["export", str(src), *fmt, "--out", str(area / "ok")])
    assert r.exit_code == 0, r.output
    assert outputs.is_ours(area / "ok")
