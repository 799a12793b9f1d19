"""Shared fixtures: tiny synthetic checkpoints written once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models: one thread avoids OpenMP spin-waiting on a shared 2-core machine (10x slower small ops).
torch.set_num_threads(1)
# ...and the CLI's default (v4convert.threads: free cores) follows, in-process and in subprocesses: a report
# computed twice in one test must not change with the machine's load.
os.environ.setdefault("V4CONVERT_THREADS", "1")

def is_direct(fd: int) -> bool:
    """Whether ``fd`` was opened with O_DIRECT."""
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def pwrite_spy(monkeypatch):
    """Bytes written by ``os.pwrite`` with and without O_DIRECT (every writer of ours: quantize, GGUF); the set of
    files that refused O_DIRECT starts and ends empty."""
    from v4convert.formats import direct_io
    real = os.pwrite
    seen = {"direct": 0, "buffered": 0}

    def pwrite(fd, data, off):
        k = real(fd, data, off)
        seen["direct" if is_direct(fd) else "buffered"] += k
        return k
    monkeypatch.setattr(os, "pwrite", pwrite)
    direct_io.NO_DIRECT.clear()
    yield seen
    direct_io.NO_DIRECT.clear()


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    """A small calibration text file (tests/calib_common.TEXT)."""
    from .calib_common import TEXT
    p = tmp_path_factory.mktemp("calib") / "c.txt"
    p.write_text(TEXT)
    return p


TINY_PRESETS = ("v3-tiny", "v32-tiny", "v4-flash-tiny", "v4-flash-base-tiny")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Each tiny preset written by `synth` (default seed) into a session temp dir."""
    from v4convert.synth import synth
    root = tmp_path_factory.mktemp("tiny")
    return {p: synth(p, root / p).out for p in TINY_PRESETS}


@pytest.fixture(scope="session")
def mlx_worker():
    """One mlx-lm worker process (mlx + mlx-lm from PyPI, in the venv ``.ci/mlx_venv.sh`` creates)."""
    from v4convert.artifacts.mlx import MLXUnavailable, MLXWorker
    try:
        w = MLXWorker()
    except MLXUnavailable as e:
        pytest.fail(f"{e} (run: bash .ci/mlx_venv.sh)")
    yield w
    w.close()
