"""RankView's batched reader and read-ahead (v4convert.sharded_layout): bytes equal to an independent read.

Reference: each part's bytes read with a plain ``open().seek().read()`` at the manifest's offset, and its SHA-256
from the manifest. The reader is run with tiny request / read-ahead sizes (a few 4 KiB blocks), so parts span two
or more requests, requests end inside a tensor, runs hold several tensors and odd-sized parts are padded.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

from v4convert import sharded_layout as sl
from v4convert.export import sharded
from v4convert.sharded_layout import Manifest, RankView, ShardedLayoutError
from v4convert.synth import synth


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shreader")
    src = synth("v3-tiny", root / "src").out
    out = root / "layout"
    sharded.export(src, out, sharded.Options(tp=1, ep=2))
    return out


def _reference(root: Path, rank: int) -> dict[tuple[str, str], bytes]:
    m = Manifest.read(root)
    path = root / m.files[rank]["file"]
    ref = {}
    with open(path, "rb") as f:
        for t in m.tensors:
            if t["rank"] != rank:
                continue
            for comp, p in t["parts"].items():
                f.seek(p["offset"])
                b = f.read(p["bytes"])
                assert hashlib.sha256(b).hexdigest() == p["sha256"]
                ref[(t["name"], comp)] = b
    return ref


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()


def _small_requests(monkeypatch, request: int, ahead: int, iov_max: int = 1024) -> None:
    monkeypatch.setattr(sl, "REQUEST", request)
    monkeypatch.setattr(sl, "AHEAD", ahead)
    monkeypatch.setattr(sl, "_IOV_MAX", iov_max)


def test_layout_has_odd_and_multi_block_parts(layout):
    """The fixture exercises what the tests below claim: parts not a multiple of 4 KiB, parts > 2 blocks."""
    sizes = [p["bytes"] for t in Manifest.read(layout).tensors for p in t["parts"].values()]
    assert any(s % sl.ALIGN for s in sizes) and any(s > 3 * sl.ALIGN for s in sizes)


@pytest.mark.parametrize("request_blocks,ahead_blocks,iov_max", [(1, 1, 1024), (2, 5, 1024), (3, 7, 2), (64, 256, 1024),
                                                                 (16384, 49152, 1024)])
@pytest.mark.parametrize("direct", [True, False])
def test_in_order_read_equals_reference(layout, monkeypatch, request_blocks, ahead_blocks, iov_max, direct):
    _small_requests(monkeypatch, request_blocks * sl.ALIGN, ahead_blocks * sl.ALIGN, iov_max)
    m = Manifest.read(layout)
    for rank in range(m.world.size):
        ref = _reference(layout, rank)
        v = RankView(m, rank, direct=direct)
        got = {}
        for name in v.names():
            for comp, t in v.raw(name).items():
                assert tuple(t.shape) == tuple(v.tensor_info(name).parts[comp].shape)
                got[(name, comp)] = _bytes(t)
        v.close()
        assert got == ref


def test_out_of_order_and_repeated_reads(layout, monkeypatch):
    """Any order (random jumps, backwards, the same tensor twice) gives the same bytes; the read-ahead stays
    bounded by AHEAD plus one request."""
    _small_requests(monkeypatch, 2 * sl.ALIGN, 6 * sl.ALIGN)
    m = Manifest.read(layout)
    ref = _reference(layout, 1)
    v = RankView(m, 1, direct=True)
    names = v.names()
    order = names[:5] + random.Random(0).sample(names, len(names)) + names[3:9] + [names[4]] * 2 + names
    for name in order:
        for comp, t in v.raw(name).items():
            assert _bytes(t) == ref[(name, comp)], name
        assert sum(r.left for r in v._runs) <= sl.AHEAD + sl.REQUEST + max(v._size)
    v.close()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _copy(layout: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in layout.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("direct", [True, False])
def test_sha_mismatch_inside_a_batched_read(layout, tmp_path, monkeypatch, direct):
    """A flipped byte in the last byte of a part in the middle of a multi-tensor request: the tensors before it
    load, that tensor fails with its own name; verify=False returns the flipped bytes."""
    _small_requests(monkeypatch, 64 * sl.ALIGN, 256 * sl.ALIGN)
    bad = _copy(layout, tmp_path / "bad")
    m = Manifest.read(bad)
    v = RankView(m, 0, direct=direct)
    names = v.names()
    victim = names[len(names) // 2]
    p = v.tensor_info(victim).parts["weight"]
    _flip(v.path, p.start + p.nbytes - 1)
    for name in names[:names.index(victim)]:
        v.raw(name)
    with pytest.raises(ShardedLayoutError, match=f"tensor {victim}: weight fails its SHA-256 check"):
        v.raw(victim)
    v.close()
    v = RankView(m, 0, verify=False, direct=direct)
    for name in names[:names.index(victim)]:
        v.raw(name)
    assert _bytes(v.raw(victim)["weight"])[-1] == _reference(layout, 0)[(victim, "weight")][-1] ^ 0x01
    v.close()


@pytest.mark.parametrize("direct", [True, False])
def test_file_truncated_after_open(layout, tmp_path, monkeypatch, direct):
    """The rank file shrinks after the view checked its size: the tensors wholly before the cut still load
    (although they share a request with the cut one), the cut tensor raises naming itself."""
    _small_requests(monkeypatch, 64 * sl.ALIGN, 256 * sl.ALIGN)
    bad = _copy(layout, tmp_path / "trunc")
    m = Manifest.read(bad)
    ref = _reference(layout, 1)
    v = RankView(m, 1, direct=direct)
    names = v.names()
    victim = names[len(names) // 2]
    p = v.tensor_info(victim).parts["weight"]
    os.truncate(v.path, p.start + p.nbytes // 2)
    for name in names[:names.index(victim)]:
        for comp, t in v.raw(name).items():
            assert _bytes(t) == ref[(name, comp)]
    with pytest.raises(ShardedLayoutError, match=f"tensor {victim}: part weight: the file ends inside it"):
        v.raw(victim)
    v.close()


@pytest.mark.parametrize("populate", [1 << 40, sl.ALIGN])
def test_loaded_tensors_own_their_memory(layout, monkeypatch, populate):
    """Each part is its own allocation (not a view into a shared request buffer), 4 KiB-aligned under O_DIRECT;
    ``populate``: parts from this size are their own pre-populated mappings (here: none / all but the smallest);
    the bytes equal the reference either way."""
    _small_requests(monkeypatch, 64 * sl.ALIGN, 256 * sl.ALIGN)
    monkeypatch.setattr(sl, "POPULATE", populate)
    ref = _reference(layout, 0)
    v = RankView(Manifest.read(layout), 0, direct=True)
    storages, kept = set(), []          # kept alive, so no address is reused
    for name in v.names():
        for comp, t in v.raw(name).items():
            kept.append(t)
            assert _bytes(t) == ref[(name, comp)]
            if t.numel():
                assert t.untyped_storage().nbytes() <= -(-t.nbytes // sl.ALIGN) * sl.ALIGN + sl.ALIGN
                storages.add(t.untyped_storage().data_ptr())
                if v._aligned:
                    assert t.data_ptr() % sl.ALIGN == 0
    assert len(storages) == sum(1 for n in v.names() for t in v.tensor_info(n).parts.values() if t.nbytes)
    v.close()


@pytest.mark.parametrize("direct", [True, False])
def test_short_reads_resume_inside_a_buffer(layout, monkeypatch, direct):
    """preadv returning fewer bytes than asked (signals, some filesystems): the reader resumes at the right byte,
    also inside one part's buffer. The fake returns at most 3 blocks (O_DIRECT) or 1000 bytes per call."""
    _small_requests(monkeypatch, 16 * sl.ALIGN, 64 * sl.ALIGN)
    real = os.preadv

    def short(fd, bufs, offset):
        step = 3 * sl.ALIGN if v._aligned else 1000
        out, left = [], step
        for b in bufs:
            if left <= 0:
                break
            out.append(memoryview(b)[:left])
            left -= len(out[-1])
        return real(fd, out, offset)

    m = Manifest.read(layout)
    v = RankView(m, 0, direct=direct)
    v._open()
    monkeypatch.setattr(os, "preadv", short)
    ref = _reference(layout, 0)
    for name in v.names():
        for comp, t in v.raw(name).items():
            assert _bytes(t) == ref[(name, comp)], name
    v.close()


# ---------------------------------------------------------------------------------------------- checksum modes
def _load_all(m: Manifest, rank: int, verify=True) -> dict[tuple[str, str], bytes]:
    v = RankView(m, rank, verify=verify, direct=True)
    try:
        return {(n, c): _bytes(t) for n in v.names() for c, t in v.raw(n).items()}
    finally:
        v.close()


@pytest.fixture
def hashes(monkeypatch, tmp_path):
    """Counts sha256_of calls (the reader threads' and the caller's); stamps go to a private cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(sl.CHECKSUMS_ENV, raising=False)
    calls = []
    real = sl.sha256_of

    def counting(t):
        calls.append(1)
        return real(t)
    monkeypatch.setattr(sl, "sha256_of", counting)
    return calls


def test_once_hashes_first_load_only_and_a_rewrite_is_hashed_again(layout, tmp_path, hashes):
    """Default ``once``: the first load hashes every part and stamps the file; a second (cold or warm) load
    of the unchanged file hashes nothing and returns the same bytes; a same-size in-place rewrite with the
    old mtime put back is hashed again (ctime moved) and the flipped part fails with its name."""
    lay = _copy(layout, tmp_path / "lay")
    m = Manifest.read(lay)
    ref = _reference(lay, 0)
    n_parts = len(ref)
    assert _load_all(m, 0) == ref and len(hashes) == n_parts
    assert len(list((tmp_path / "cache" / "v4convert" / "verified").iterdir())) == 1
    hashes.clear()
    assert _load_all(Manifest.read(lay), 0) == ref and hashes == []
    assert _load_all(Manifest.read(lay), 1) == _reference(lay, 1) and len(hashes) > 0   # rank 1: its own stamp
    path = lay / m.files[0]["file"]
    st = path.stat()
    victim = next(t for t in m.tensors if t["rank"] == 0)
    _flip(path, victim["parts"]["weight"]["offset"])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ShardedLayoutError, match=f"tensor {victim['name']}: weight fails its SHA-256 check"):
        _load_all(Manifest.read(lay), 0)


def test_once_stamp_is_per_manifest(layout, tmp_path, hashes):
    """A changed manifest (even one byte of whitespace) invalidates the stamp of an unchanged data file."""
    lay = _copy(layout, tmp_path / "lay")
    _load_all(Manifest.read(lay), 0)
    hashes.clear()
    (lay / sl.MANIFEST).write_text((lay / sl.MANIFEST).read_text() + "\n")
    _load_all(Manifest.read(lay), 0)
    assert len(hashes) > 0


def test_partial_load_writes_no_stamp(layout, tmp_path, hashes):
    lay = _copy(layout, tmp_path / "lay")
    m = Manifest.read(lay)
    v = RankView(m, 0, direct=True)
    v.raw(v.names()[0])
    v.close()
    assert not (tmp_path / "cache" / "v4convert" / "verified").exists()
    hashes.clear()
    _load_all(Manifest.read(lay), 0)
    assert len(hashes) == len(_reference(lay, 0))


@pytest.mark.parametrize("mode,second", [("always", True), ("never", False), ("ONCE", False)])
def test_checksums_env(layout, tmp_path, hashes, monkeypatch, mode, second):
    lay = _copy(layout, tmp_path / "lay")
    monkeypatch.setenv(sl.CHECKSUMS_ENV, mode)
    _load_all(Manifest.read(lay), 0)
    first = len(hashes)
    assert (first > 0) == (mode != "never")
    hashes.clear()
    _load_all(Manifest.read(lay), 0)
    assert (len(hashes) == first) if second else hashes == []
    hashes.clear()
    _load_all(Manifest.read(lay), 0, verify=False)       # verify=False wins over the environment
    assert hashes == []


def test_checksums_env_bad_value(layout, monkeypatch):
    monkeypatch.setenv(sl.CHECKSUMS_ENV, "sometimes")
    with pytest.raises(ShardedLayoutError, match="V4CONVERT_CHECKSUMS='sometimes': expected one of always, once"):
        RankView(Manifest.read(layout), 0)


def test_unwritable_cache_still_loads_and_hashes_each_time(layout, tmp_path, hashes, monkeypatch):
    lay = _copy(layout, tmp_path / "lay")
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    ref = _reference(lay, 0)
    assert _load_all(Manifest.read(lay), 0) == ref
    hashes.clear()
    assert _load_all(Manifest.read(lay), 0) == ref and len(hashes) == len(ref)
