"""Deterministic fault injection (issue #13): SIGKILL quantize and export at every step of the finish
protocol and at seeded random work units; the same command rerun must complete byte-identically, and
at no instant may OUT hold anything but a complete old or a complete new output.

Kill points are ``outputs.kill_point`` names, armed through ``$V4CONVERT_KILL_AT`` (``name`` or
``name:N`` for the N-th call). Covered: quantize ``unit:K`` (2 seeded K, journaled per unit and not),
``finish:index|config|side-files|fsync|marker|journal-removed``, ``swap:old-moved|new-in-place``;
export ``gguf:written``, ``gguf:replaced:1`` (between split renames), ``modelfile:written``.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from v4convert.outputs import KILL_ENV

from .test_outputs import snapshot

SHARD = "300KB"
N_UNITS = 107                 # v3-tiny's plan (asserted below through the kill at the last unit)
FINISH = ["finish:index", "finish:config", "finish:side-files", "finish:fsync", "finish:marker",
          "finish:journal-removed"]
SWAP = ["swap:old-moved", "swap:new-in-place"]
UNITS = [f"unit:{k}" for k in sorted(random.Random(13).sample(range(1, N_UNITS), 2))]


def cli(*args: str) -> list[str]:
    return list(args)


@dataclass
class Done:
    returncode: int          # exit status, or -signal when killed (as subprocess reports it)
    stderr: str


def run(args: list[str], kill: str | None = None) -> Done:
    """The CLI in a fresh interpreter, armed to SIGKILL itself at ``kill``. A SIGKILL runs no cleanup, exactly as
    in the field. (A child forked from pytest deadlocked in CI: torch's OpenMP pool does not survive fork.)"""
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill:
        env[KILL_ENV] = kill
    r = subprocess.run([sys.executable, "-m", "v4convert.cli", *args], env=env, capture_output=True, text=True,
                       check=False, timeout=600)
    return Done(r.returncode, r.stderr)


def q_args(src: Path, out: Path, *extra: str) -> list[str]:
    return cli("quantize", str(src), "--fp4", "--out", str(out), "--workers", "1", "--shard-size", SHARD, *extra)


@pytest.fixture(scope="module")
def refs(tiny_ckpts, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: the NVFP4 reference and a different (MXFP4) previous output."""
    root = tmp_path_factory.mktemp("refs")
    src = tiny_ckpts["v3-tiny"]
    for name, extra in (("nvfp4", ()), ("mxfp4", ("--scheme", "mxfp4"))):
        r = run(q_args(src, root / name, *extra))
        assert r.returncode == 0, r.stderr
    return {"nvfp4": root / "nvfp4", "mxfp4": root / "mxfp4"}


def _tree(p: Path) -> dict[str, str] | None:
    return snapshot(p) if p.exists() else None


@pytest.mark.parametrize("point", UNITS + FINISH + SWAP)
def test_quantize_killed_then_resumed(tiny_ckpts, refs, tmp_path, point):
    src = tiny_ckpts["v3-tiny"]
    out = tmp_path / "out"
    extra: tuple[str, ...] = ()
    old = None
    if point.startswith("swap:") or point == FINISH[-1]:      # replace a previous output of ours
        shutil.copytree(refs["mxfp4"], out)
        old = snapshot(out)
        extra = ("--overwrite",)
    if point == UNITS[0]:
        extra += ("--sync-every", "1")                           # journal after every unit
    r = run(q_args(src, out, *extra), kill=point)
    assert r.returncode == -signal.SIGKILL, f"not killed at {point}: {r.stderr[-500:]}"
    new = snapshot(refs["nvfp4"])
    assert _tree(out) in (None, old, new), f"OUT holds a half output after a kill at {point}"
    r = run(q_args(src, out, *extra))
    assert r.returncode == 0, f"rerun after a kill at {point}: {r.stderr[-800:]}"
    assert snapshot(out) == new
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["out"], left


def test_kill_at_last_unit_exists(tiny_ckpts, tmp_path):
    """The unit count the seeded points are drawn from is the plan's (a kill at N_UNITS fires)."""
    r = run(q_args(tiny_ckpts["v3-tiny"], tmp_path / "o"), kill=f"unit:{N_UNITS}")
    assert r.returncode == -signal.SIGKILL
    r = run(q_args(tiny_ckpts["v3-tiny"], tmp_path / "p"), kill=f"unit:{N_UNITS + 1}")
    assert r.returncode == 0, r.stderr


def e_args(src: Path, out: Path, *extra: str) -> list[str]:
    return cli("export", str(src), "--gguf", "--out", str(out), "--split-max-size", "1M", *extra)


@pytest.mark.parametrize("point", ["gguf:written", "gguf:replaced:1", "modelfile:written"])
@pytest.mark.parametrize("previous", [False, True])
def test_export_killed_then_resumed(tiny_ckpts, tmp_path, point, previous):
    src = tiny_ckpts["v3-tiny"]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert run(e_args(src, ref_dir / "m.gguf")).returncode == 0
    want = snapshot(ref_dir)
    work = tmp_path / "work"
    work.mkdir()
    extra: tuple[str, ...] = ()
    if previous:                                     # an older export of ours (other types) is replaced
        assert run(e_args(src, work / "m.gguf", "--type", "F32")).returncode == 0
        extra = ("--overwrite",)
    r = run(e_args(src, work / "m.gguf", *extra), kill=point)
    assert r.returncode == -signal.SIGKILL, r.stderr[-500:]
    r = run(e_args(src, work / "m.gguf", *extra))     # the same command again
    assert r.returncode == 0, f"rerun after a kill at {point}: {r.stderr[-800:]}"
    assert snapshot(work) == want
