"""Staged O_DIRECT output writes (``quant.unit_io.StagedWriter``): the same files and SHA-256s as buffered ``pwrite``
(``V4C_DIRECT_WRITE=0``), every fallback (O_DIRECT refused at open or at write, hasher window full) and ENOSPC."""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from v4convert.checkpoint import Checkpoint
from v4convert.formats import direct_io
from v4convert.quant import hashing, unit_io
from v4convert.quant.engine import execute, partial_dir
from v4convert.quant.plan import Options, make_plan
from v4convert.quant.recipes import RuleSet, preset
from v4convert.quant.unit_io import DiskFullError, StagedWriter

from .conftest import is_direct
from .test_quantize import run_quantize


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}




def check_digests(out: Path) -> None:
    shas = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["sha256"]
    for name, h in shas.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == h, name


@pytest.mark.parametrize("preset_name,recipe", [("v3-tiny", "nvfp4-experts"), ("v4-flash-tiny", "nvfp4-experts"),
                                                ("v3-tiny", "nvfp4-all-linear")])
@pytest.mark.parametrize("workers", [1, 3])
def test_direct_same_files_as_buffered(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy, preset_name, recipe, workers):
    src = tiny_ckpts[preset_name]
    monkeypatch.setenv("V4C_DIRECT_WRITE", "0")
    run_quantize(src, tmp_path / "buf", recipe, workers=workers)
    assert pwrite_spy["direct"] == 0
    monkeypatch.setenv("V4C_DIRECT_WRITE", "1")
    from_file = []
    real = hashing._hash_range
    monkeypatch.setattr(hashing, "_hash_range", lambda h, fd, a, b, p: (from_file.append(b - a), real(h, fd, a, b, p)))
    plan, _ = run_quantize(src, tmp_path / "dir", recipe, workers=workers)
    assert pwrite_spy["direct"] > plan.bytes_out // 2        # most output bytes went out O_DIRECT (tmp_path: ext4)
    assert sum(from_file) == sum(len(h) for h in plan.shard_headers.values())    # units hashed from staging
    assert tree(tmp_path / "dir") == tree(tmp_path / "buf")
    check_digests(tmp_path / "dir")


def test_hasher_window_full_reads_back(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy):
    """A window too small for any second unit: released buffers are hashed from the file, same digests."""
    src = tiny_ckpts["v3-tiny"]
    run_quantize(src, tmp_path / "a", workers=3)
    monkeypatch.setattr(hashing, "WINDOW", 1)
    reads = []
    real = hashing._hash_range
    monkeypatch.setattr(hashing, "_hash_range", lambda h, fd, a, b, p: (reads.append(b - a), real(h, fd, a, b, p)))
    run_quantize(src, tmp_path / "b", workers=3)
    assert reads and pwrite_spy["direct"] > 0
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


@pytest.mark.parametrize("when", ["open", "write"])
def test_direct_refused_falls_back(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy, when):
    """EINVAL for O_DIRECT (tmpfs refuses it at open, some overlayfs at write): buffered, same bytes."""
    src = tiny_ckpts["v3-tiny"]
    monkeypatch.setenv("V4C_DIRECT_WRITE", "0")
    run_quantize(src, tmp_path / "buf")
    monkeypatch.setenv("V4C_DIRECT_WRITE", "1")
    real_open, real_pwrite = os.open, unit_io.os.pwrite

    def fopen(path, flags, *a, **kw):
        if when == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    def fpwrite(fd, data, off):
        if when == "write" and is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, off)

    monkeypatch.setattr(unit_io.os, "open", fopen)
    monkeypatch.setattr(unit_io.os, "pwrite", fpwrite)
    run_quantize(src, tmp_path / "dir")
    assert pwrite_spy["direct"] == 0 and direct_io.NO_DIRECT
    assert tree(tmp_path / "dir") == tree(tmp_path / "buf")


def test_enospc_on_direct_write_then_resume(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy):
    src = tiny_ckpts["v3-tiny"]
    run_quantize(src, tmp_path / "ref", shard_bytes=300_000)
    real = unit_io.os.pwrite
    calls = {"n": 0}

    def full(fd, data, off):
        if is_direct(fd):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(unit_io.os, "pwrite", full)
    out = tmp_path / "out"
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, RuleSet(preset("nvfp4-experts")), Options(shard_bytes=300_000))
    with pytest.raises(DiskFullError, match="disk full while writing a unit"):
        execute(plan, out, sync_bytes=1, log=lambda m: None)
    assert not out.exists() and partial_dir(out).is_dir()
    monkeypatch.setattr(unit_io.os, "pwrite", real)
    r = execute(plan, out, log=lambda m: None)
    assert 0 < r.resumed_units < len(plan.units)     # journaled units skipped, their bytes hashed from the file
    assert tree(out) == tree(tmp_path / "ref")


@pytest.mark.parametrize("start,end", [(5, 4096 * 3 + 7), (4096, 8192), (4095, 4097), (100, 200), (4096 * 2, 4096 * 5 + 1),
                                       (1, 4096 * 4)])
def test_staged_writer_ranges(tmp_path, pwrite_spy, start, end):
    """Odd ranges against a plain buffered reference: neighbour bytes untouched, unwritten bytes zero, the
    returned view equals the file's bytes."""
    size = 4096 * 6
    base = os.urandom(size)
    p = tmp_path / "f"
    p.write_bytes(base)
    data = os.urandom(end - start)
    w = StagedWriter(p, start, end)
    mid = start + (end - start) // 3
    w.write(mid, data[mid - start:], "b")           # out of order, a gap [mid - 3, mid) left unwritten when it fits
    w.write(start, data[: max(0, mid - start - 3)], "a")
    st = w.commit("f")
    gap = min(3, mid - start)
    want = base[:start] + data[: mid - start - gap] + bytes(gap) + data[mid - start:] + base[end:]
    got = p.read_bytes()
    assert got == want
    assert bytes(st.data) == want[start:end]
    whole = (end - end % 4096) - (-(-start // 4096) * 4096)
    assert pwrite_spy["direct"] == max(0, whole)
    st.release()
    with pytest.raises(RuntimeError, match="outside the unit's range"):
        StagedWriter(p, start, end).write(end - 1, b"xy", "c")


def test_staged_writer_region(tmp_path, pwrite_spy):
    """A kernel filling ``region`` in place lands the same bytes as ``write`` (gaps stay zero); out of range raises."""
    size = 4096 * 4
    base = os.urandom(size)
    p = tmp_path / "f"
    p.write_bytes(base)
    start, end = 100, 4096 * 3 + 5
    w = StagedWriter(p, start, end)
    r = w.region(start + 10, 5000, "k")
    r.copy_(torch.arange(5000, dtype=torch.int32).to(torch.uint8))
    w.write(end - 4, b"tail", "t")
    st = w.commit("f")
    want = (base[:start] + bytes(10) + bytes(torch.arange(5000, dtype=torch.int32).to(torch.uint8).numpy())
            + bytes(end - 4 - start - 10 - 5000) + b"tail" + base[end:])
    assert p.read_bytes() == want and bytes(st.data) == want[start:end]
    st.release()
    with pytest.raises(RuntimeError, match="outside the unit's range"):
        StagedWriter(p, start, end).region(end - 1, 2, "c")


def test_compute_slots_bound_concurrency():
    """``set_compute_slots(n)``: at most n threads inside ``compute()`` at once; None: no bound (all 6 meet inside)."""
    import threading
    import time
    inside, peak, lock = [0], [0], threading.Lock()
    meet = threading.Barrier(6, timeout=10)

    def job(unbounded: bool):
        with unit_io.compute():
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            meet.wait() if unbounded else time.sleep(0.02)
            with lock:
                inside[0] -= 1
    for n in (2, None):
        unit_io.set_compute_slots(n)
        peak[0] = 0
        try:
            ts = [threading.Thread(target=job, args=(n is None,)) for _ in range(6)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        finally:
            unit_io.set_compute_slots(None)
        assert peak[0] == (n or 6)
