"""formats.direct_io (O_DIRECT reads into pooled aligned buffers) and quant.hashing (shard SHA-256 while writing)."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4convert.formats.direct_io import ALIGN, BufferPool, DirectReader

DATA = random.Random(7).randbytes(3 * ALIGN * 5 + 1234)        # not a whole number of blocks: a ragged end


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dio") / "blob.bin"
    p.write_bytes(DATA)
    return p


@settings(max_examples=150, deadline=None)
@given(start=st.integers(0, len(DATA)), n=st.integers(0, 40000), direct=st.booleans())
def test_read_range_returns_the_file_bytes(blob: Path, start: int, n: int, direct: bool) -> None:
    pool = BufferPool()
    rd = DirectReader(pool, direct=direct)
    try:
        with pool.scope():
            buf, got = rd.read_range(str(blob), start, n)
            want = DATA[start:start + n]
            assert got == len(want)                           # short exactly where the file ends
            assert bytes(buf[:got].numpy()) == want
            if direct and n and rd._fds[str(blob)][1]:
                assert (buf.data_ptr() - start) % ALIGN == 0  # the cover started on a block boundary
    finally:
        rd.close()


def test_direct_reads_at_the_end_of_file_keep_o_direct(blob: Path) -> None:
    rd = DirectReader(direct=True)
    try:
        for start in (len(DATA) - 10, 0, len(DATA) - ALIGN - 3, 5):
            buf, got = rd.read_range(str(blob), start, 10)
            assert bytes(buf[:got].numpy()) == DATA[start:start + 10]
        assert rd._fds[str(blob)][1] is True                  # a ragged last block did not drop O_DIRECT
    finally:
        rd.close()


def test_pool_scopes_reuse_and_release() -> None:
    pool = BufferPool(keep_bytes=8 << 20)
    a = pool.take(100)                                        # outside a scope: fresh, owned, never pooled
    assert a.data_ptr() % ALIGN == 0 and not pool._free and not pool._used
    with pool.scope():
        b = pool.take(3 << 20)
        with pool.scope():                                    # a loop body: its piece returns at its end
            c = pool.take(1 << 20)
            cp = c.data_ptr()
        assert len(pool._used) == 1 and pool._free[0].data_ptr() == cp
        d = pool.take(1000)                                   # reuses c's buffer (smallest that fits)
        assert d.data_ptr() == cp and b.data_ptr() != cp
    assert not pool._used and sorted(t.numel() for t in pool._free) == [1 << 20, 3 << 20]
    with pool.scope():
        pool.take(16 << 20)                                   # over keep_bytes: dropped when released
    assert sum(t.numel() for t in pool._free) <= 8 << 20


def test_quantize_reads_misaligned_wide_dtypes(tmp_path) -> None:
    """A float32 tensor at a file offset that is not a multiple of 4 (legal in safetensors headers we read)."""
    from v4convert.formats.safetensors_io import TensorEntry
    from v4convert.quant import workers
    x = torch.arange(37 * 5, dtype=torch.float32).reshape(37, 5)
    p = tmp_path / "t.bin"
    p.write_bytes(b"\0" * 4099 + x.numpy().tobytes())
    e = TensorEntry("w", p, "F32", (37, 5), 4099, 4099 + x.numel() * 4)
    assert torch.equal(workers.read_rows(e), x) and torch.equal(workers.read_rows(e, 3, 11), x[3:11])


def test_shard_hasher_digest_equals_sha256sum_with_units_out_of_order(tmp_path) -> None:
    from v4convert.quant.hashing import PIECE, ShardHasher

    class U:
        def __init__(self, i, shard, off, n):
            self.index, self.shard, self.offsets, self._n, self.tensors = i, shard, {"t": off}, n, ()

        @property
        def bytes_out(self):
            return self._n

    rng = random.Random(3)
    sizes = {"a": [17, PIECE + 5, 3, 2 * PIECE], "b": [1, 2]}
    units, shards, headers, files = [], {}, {}, {}
    for name, lens in sizes.items():
        hdr = rng.randbytes(41)
        off = len(hdr)
        for n in lens:
            units.append(U(len(units), name, off, n))
            off += n
        data = hdr + rng.randbytes(off - len(hdr))
        (tmp_path / name).write_bytes(data)
        shards[name], headers[name], files[name] = len(data), hdr, data

    class P:
        pass
    plan = P()
    plan.units, plan.shards, plan.shard_headers = units, shards, headers
    h = ShardHasher(plan, tmp_path, done={1})                 # unit 1 finished in an earlier run (resume)
    for i in (3, 4, 0, 2, 5):
        h.done(i, units[i].shard)
    assert h.digests() == {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())}
    os.remove(tmp_path / "b")
    h2 = ShardHasher(plan, tmp_path)
    h2.done(4, "b")                                           # the shard vanished: the error surfaces at the end
    with pytest.raises(OSError):
        h2.digests()
