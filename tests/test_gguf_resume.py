"""``export --gguf`` on the engine (issue #16): SIGKILL at several points + rerun = byte-identical files, no
partial under a final name, fingerprint mismatch starts over, fsync before journal, bounded workers, parts."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from v4convert.export.gguf import engine, source_io
from v4convert.export.gguf.exporter import export_gguf
from v4convert.formats import direct_io
from v4convert.formats.gguf_writer import GGUFWriteError, Metadata, TensorSpec, layout_files, write_gguf
from v4convert.outputs import KILL_ENV

from .conftest import is_direct

SPLIT = 400_000          # bytes of tensor data per split: v3-tiny's default mix gives several files

SCRIPT = """
import sys
from pathlib import Path
from v4convert.export.gguf.exporter import TypeMix, GGUFType, export_gguf
mix = TypeMix() if sys.argv[3] == "default" else TypeMix(GGUFType.F32, GGUFType.F32)
export_gguf(sys.argv[1], Path(sys.argv[2]), mix, split_max_size={split}, modelfile=False, workers=2, sync_bytes=1,
            log=lambda m: print(m, file=sys.stderr))
""".format(split=SPLIT)


def export_proc(src: Path, out: Path, kill: str | None = None, types: str = "default"
                ) -> subprocess.CompletedProcess:
    """The exporter in a fresh interpreter (journal after every unit, 2 threads), armed to SIGKILL at ``kill``."""
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(out), types], env=env, capture_output=True,
                          text=True, timeout=600)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_ckpts, tmp_path_factory) -> dict[str, bytes]:
    """An uninterrupted buffered export with one worker, in process (the byte-identity reference)."""
    d = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:      # buffered: the killed/resumed runs below write O_DIRECT
        mp.setenv("V4C_DIRECT_WRITE", "0")
        r = export_gguf(tiny_ckpts["v3-tiny"], d / "m.gguf", split_max_size=SPLIT, modelfile=False, workers=1)
    assert len(r.paths) >= 3
    return files(d)


@pytest.mark.parametrize("point", ["gguf:created", "gguf:tensor:1", "gguf:tensor:7", "gguf:tensor:40",
                                   "gguf:written", "gguf:replaced:2"])
def test_killed_export_resumes_byte_identical(tiny_ckpts, tmp_path, reference, point):
    out = tmp_path / "m.gguf"
    r = export_proc(tiny_ckpts["v3-tiny"], out, kill=point)
    assert r.returncode == -signal.SIGKILL, f"not killed at {point}: {r.stderr[-500:]}"
    left = files(tmp_path)
    if point != "gguf:replaced:2":              # before the first rename no file carries a final name
        assert not [n for n in left if n.endswith(".gguf")], sorted(left)
    else:                                       # renames are in order: exactly the first two are in place
        assert sorted(n for n in left if n.endswith(".gguf")) == sorted(reference)[:2]
        for n in sorted(reference)[:2]:
            assert left[n] == reference[n]
    assert engine.journal_dir(out).is_dir()
    r = export_proc(tiny_ckpts["v3-tiny"], out)
    assert r.returncode == 0, r.stderr[-800:]
    if point.startswith("gguf:tensor"):
        assert "resuming:" in r.stderr, r.stderr[-800:]
    assert files(tmp_path) == reference
    assert not engine.journal_dir(out).exists()


def test_torn_journal_and_truncated_partial(tiny_ckpts, tmp_path, reference):
    out = tmp_path / "m.gguf"
    assert export_proc(tiny_ckpts["v3-tiny"], out, kill="gguf:tensor:30").returncode == -signal.SIGKILL
    done = engine.journal_dir(out) / "done"
    lines = done.read_text().splitlines()
    assert len(lines) == 30
    with open(done, "a") as f:
        f.write("0 1")                          # a line torn by the kill: no newline, ignored
    part = sorted(tmp_path.glob("*.gguf.partial"))[0]
    os.truncate(part, part.stat().st_size - 1)  # a damaged partial: recreated, its units redone
    r = export_proc(tiny_ckpts["v3-tiny"], out)
    assert r.returncode == 0, r.stderr[-800:]
    assert files(tmp_path) == reference


def test_other_plan_starts_over(tiny_ckpts, tmp_path, reference):
    out = tmp_path / "m.gguf"
    r = export_proc(tiny_ckpts["v3-tiny"], out, kill="gguf:tensor:5", types="f32")
    assert r.returncode == -signal.SIGKILL
    r = export_proc(tiny_ckpts["v3-tiny"], out)           # other types: other headers, other fingerprint
    assert r.returncode == 0, r.stderr[-800:]
    assert "starting over" in r.stderr and "resuming:" not in r.stderr
    assert files(tmp_path) == reference


# ------------------------------------------------------------------------------ the engine, in process
def _specs(active: list[int], peak: list[int], lock: threading.Lock) -> list[TensorSpec]:
    """Odd shapes (padding after every tensor), a tensor given in 5 parts, bytes that name their tensor."""
    def buf(seed: int, n: int) -> np.ndarray:
        with source_io.compute():          # the engine runs 2 * workers producers, at most workers encoding
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.002)
            out = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
            with lock:
                active[0] -= 1
        return out
    specs = []
    for i, shape in enumerate([(3, 5), (7,), (1, 1), (2, 3, 11), (13, 3)]):
        n = int(np.prod(shape)) * 4
        specs.append(TensorSpec(f"t{i}", shape, Q.F32, lambda i=i, n=n: buf(i, n)))
    e_bytes = 3 * 32 * 17 // 32          # one [3, 32] MXFP4 expert: 3 rows x 1 block x 17 bytes
    parts = [lambda k=k: buf(100 + k, e_bytes) for k in range(5)]
    specs.append(TensorSpec("exps", (5, 3, 32), Q.MXFP4, lambda: (p() for p in parts), parts=parts))
    return specs


def test_engine_matches_in_order_writer(tmp_path, monkeypatch):
    md = Metadata()
    md.str("general.architecture", "x")
    lock = threading.Lock()
    active, peak = [0], [0]
    write_gguf(tmp_path / "seq.gguf", md, _specs(active, peak, lock))
    peak[0] = 0
    lay = layout_files(tmp_path / "par.gguf", md, _specs(active, peak, lock))
    j = engine.Journal(engine.journal_dir(tmp_path / "par.gguf"))
    events: list[str] = []
    real_fsync, real_append = os.fsync, engine.Journal.append

    def fsync(fd):
        events.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def append(self, done):
        events.append(f"append {len(done)}")
        real_append(self, done)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(engine.Journal, "append", append)
    paths = engine.execute(lay, j, "fp", workers=3, sync_bytes=1)
    monkeypatch.undo()
    assert paths == [tmp_path / "par.gguf"]
    assert (tmp_path / "par.gguf").read_bytes() == (tmp_path / "seq.gguf").read_bytes()
    assert 1 <= peak[0] <= 3
    appends = [i for i, e in enumerate(events) if e.startswith("append")]
    assert sum(int(events[i].split()[1]) for i in appends) == 5 + 5          # 5 tensors + 5 parts
    assert all(events[i - 1] == "fsync par.gguf.partial" for i in appends)  # data fsynced before each line
    assert not j.dir.exists() and not list(tmp_path.glob("*.partial"))


def test_engine_errors(tmp_path):
    md = Metadata()
    md.str("general.architecture", "x")
    lay = layout_files(tmp_path / "e.gguf", md, [
        TensorSpec("ok", (4, 32), Q.F32, lambda: torch.zeros(4, 32)),
        TensorSpec("short", (4, 32), Q.F32, lambda: torch.zeros(3, 32))])
    j = engine.Journal(engine.journal_dir(tmp_path / "e.gguf"))
    with pytest.raises(GGUFWriteError, match="tensor short: producer gave 384 bytes, declared 512"):
        engine.execute(lay, j, "fp", workers=2, sync_bytes=1)
    assert not list(tmp_path.iterdir())                    # a user error: partials and journal discarded
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "I/O error")
        return torch.ones(4, 32)
    lay = layout_files(tmp_path / "f.gguf", md, [
        TensorSpec("a", (4, 32), Q.F32, lambda: torch.zeros(4, 32)), TensorSpec("b", (4, 32), Q.F32, flaky)])
    j = engine.Journal(engine.journal_dir(tmp_path / "f.gguf"))
    with pytest.raises(OSError):
        engine.execute(lay, j, "fp", workers=1, sync_bytes=1)
    assert (tmp_path / "f.gguf.partial").is_file() and j.done() == {(0, 0, -1)}   # kept: tensor a journaled
    logs: list[str] = []
    engine.execute(lay, j, "fp", workers=1, sync_bytes=1, log=logs.append)
    assert any("resuming: 1 of 2" in m for m in logs)
    data = (tmp_path / "f.gguf").read_bytes()
    assert data[lay[0].offsets[1]:lay[0].offsets[1] + 512] == torch.ones(4, 32).numpy().tobytes()
    assert data[lay[0].offsets[0]:lay[0].offsets[0] + 512] == bytes(512)


def test_parts_must_divide():
    with pytest.raises(GGUFWriteError, match="equal parts"):
        TensorSpec("x", (3, 3, 32), Q.MXFP4, lambda: b"", parts=[lambda: b""] * 2)


def test_workers_must_be_positive(tiny_ckpts, tmp_path):
    from v4convert.export.gguf.exporter import ExportError
    with pytest.raises(ExportError, match="--workers -1"):
        export_gguf(tiny_ckpts["v3-tiny"], tmp_path / "m.gguf", workers=-1)
    md = Metadata()
    lay = layout_files(tmp_path / "w.gguf", md, [TensorSpec("a", (32,), Q.F32, lambda: torch.zeros(32))])
    with pytest.raises(engine.UserError, match="at least 1"):
        engine.execute(lay, engine.Journal(engine.journal_dir(tmp_path / "w.gguf")), "fp", workers=0)
    assert not list(tmp_path.iterdir())


def test_pool_memory_budget():
    """A unit over the budget runs alone; small ones share it; at most 2 x workers submitted."""
    lock = threading.Lock()
    state = {"cost": 0, "peak": 0, "n": 0, "peak_n": 0, "alone": []}
    big = engine.Unit(0, 0, -1, 0, 200)             # cost 800 > budget 500
    small = [engine.Unit(0, 1, k, 0, 50) for k in range(12)]     # cost 200 each: 2 fit
    todo = small[:4] + [big] + small[4:]

    def run(u):
        with lock:
            state["cost"] += u.cost
            state["n"] += 1
            state["peak"] = max(state["peak"], state["cost"])
            state["peak_n"] = max(state["peak_n"], state["n"])
            if u is big:
                state["alone"].append(state["n"] == 1)
        time.sleep(0.01)
        with lock:
            state["cost"] -= u.cost
            state["n"] -= 1
        return u
    got: list = []
    engine._pool(todo, 4, run, got.append, budget=500)
    assert sorted(u.key for u in got) == sorted(u.key for u in todo)
    assert state["alone"] == [True]
    assert state["peak"] <= 800 and state["peak_n"] <= 2


# ------------------------------------------------------------------------------ O_DIRECT writes


def _export(src: Path, out: Path, workers: int, direct: str, monkeypatch, **kw) -> dict[str, bytes]:
    monkeypatch.setenv("V4C_DIRECT_WRITE", direct)
    out.mkdir(exist_ok=True)
    export_gguf(src, out / "m.gguf", split_max_size=SPLIT, modelfile=False, workers=workers, **kw)
    return files(out)


@pytest.mark.parametrize("preset_name", ["v3-tiny", "v4-flash-tiny"])
@pytest.mark.parametrize("workers", [1, 2])
def test_direct_same_files_as_buffered(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy, preset_name, workers):
    src = tiny_ckpts[preset_name]
    buf = _export(src, tmp_path / "buf", workers, "0", monkeypatch)
    assert pwrite_spy["direct"] == 0
    pwrite_spy["buffered"] = 0
    got = _export(src, tmp_path / "dir", workers, "1", monkeypatch)
    data = sum(len(b) for b in got.values())
    assert pwrite_spy["direct"] > data // 2 and pwrite_spy["direct"] % 4096 == 0      # most bytes O_DIRECT (tmp_path: ext4)
    assert pwrite_spy["buffered"] > 0                                        # head/tail fragments of shared pages
    assert got == buf


@pytest.mark.parametrize("when", ["open", "write"])
def test_direct_refused_falls_back(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy, reference, when):
    """EINVAL for O_DIRECT (tmpfs refuses it at open, some overlayfs at write): buffered, same bytes."""
    real_open, real_pwrite = os.open, os.pwrite

    def fopen(path, flags, *a, **kw):
        if when == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    def fpwrite(fd, data, off):
        if when == "write" and is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, off)
    monkeypatch.setattr(os, "open", fopen)
    monkeypatch.setattr(os, "pwrite", fpwrite)
    got = _export(tiny_ckpts["v3-tiny"], tmp_path, 2, "1", monkeypatch)
    assert pwrite_spy["direct"] == 0 and direct_io.NO_DIRECT
    assert got == reference


def test_enospc_keeps_partials_then_resume(tiny_ckpts, tmp_path, monkeypatch, pwrite_spy, reference):
    """ENOSPC on an O_DIRECT write: the disk-full error naming file and tensor, partials and journal kept; the
    rerun after freeing space resumes to the same bytes."""
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, off):
        if is_direct(fd):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)
    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "m.gguf"
    with pytest.raises(engine.GGUFDiskFullError, match=r"\.gguf\.partial: tensor \S+.*: disk full while writing.*"
                                                      r"rerun the same command to resume"):
        export_gguf(tiny_ckpts["v3-tiny"], out, split_max_size=SPLIT, modelfile=False, workers=1, sync_bytes=1)
    assert engine.journal_dir(out).is_dir() and list(tmp_path.glob("*.gguf.partial"))
    assert engine.Journal(engine.journal_dir(out)).done()
    monkeypatch.setattr(os, "pwrite", real)
    logs: list[str] = []
    export_gguf(tiny_ckpts["v3-tiny"], out, split_max_size=SPLIT, modelfile=False, workers=2, log=logs.append)
    assert any("resuming:" in m for m in logs)
    assert files(tmp_path) == reference


@pytest.mark.parametrize("start,end", [(5, 4096 * 3 + 7), (4096, 8192), (4095, 4097), (100, 200),
                                       (4096 * 2, 4096 * 9 + 1), (1, 4096 * 8), (33, 4096 * 7 - 32)])
@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 20])
@pytest.mark.parametrize("placed", [False, True])
def test_direct_stream_ranges(tmp_path, pwrite_spy, monkeypatch, start, end, chunk, placed):
    """Odd ranges in odd chunks through a 2-page window, against the bytes a buffered write gives: neighbour
    bytes untouched, exactly the whole pages of the range O_DIRECT. ``placed``: the data sits at an address equal
    to ``start`` modulo 4 KiB (as ``source_io.out_buffer`` places kernel outputs), so aligned pieces go uncopied."""
    size = 4096 * 10
    base = os.urandom(size)
    p = tmp_path / "f"
    p.write_bytes(base)
    data = os.urandom(end - start)
    src: bytes | memoryview = data
    if placed:
        buf = direct_io.aligned_empty(len(data) + 4096)[start % 4096: start % 4096 + len(data)]
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        src = memoryview(buf.numpy())
    uncopied = []
    real_from = direct_io.DirectStream._direct_from
    monkeypatch.setattr(direct_io.DirectStream, "_direct_from", lambda self, d: uncopied.append(1) or real_from(self, d))
    fd = os.open(p, os.O_WRONLY)
    try:
        s = direct_io.DirectStream(p, fd, start, end, window=8192)
        for i in range(0, len(data), chunk):
            s.write(memoryview(src)[i: i + chunk])
        s.close()
    finally:
        os.close(fd)
    assert p.read_bytes() == base[:start] + data + base[end:]
    whole = (end - end % 4096) - (-(-start // 4096) * 4096)
    assert pwrite_spy["direct"] == max(0, whole)
    if placed and chunk == 1 << 20 and pwrite_spy["direct"]:        # (unplaced data may be aligned by chance)
        assert uncopied
