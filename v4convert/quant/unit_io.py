"""A worker's raw I/O for one unit: O_DIRECT source reads into pooled buffers and ``pwrite`` into output shards.

``read_rows`` reads rows of a stored tensor with ``os.preadv`` (a short read names the shard and tensor: a shard
truncated under us is an error, not a SIGBUS from a memory map); ``Writer`` writes at the plan's byte offsets, so
units finish in any order and a redone unit rewrites the same bytes. Per-thread state (``_LOCAL``): read buffers
reused between units and the reader open while ``workers.run_unit`` runs.
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from v4convert.formats.direct_io import (ALIGN, NO_DIRECT, STAGES, BufferPool, DirectReader, _ceil, open_direct,
                                         pwrite_direct)
from v4convert.formats.safetensors_io import ST_DTYPES, TensorEntry, tensor_bytes

from v4convert.threads import ComputeSlots

from .plan import QuantizeError


class DiskFullError(QuantizeError):
    """ENOSPC while writing the output; the partial directory is left for a resume after freeing space."""


class SourceReadError(QuantizeError):
    """A source shard shorter than its header says (truncated or replaced during the run)."""


# ------------------------------------------------------------------------------------ raw I/O
class _Local(threading.local):
    """Per worker thread (the engine runs units on threads; each thread of a process pool worker alike): its read
    buffers, reused between units, and its reader, open only while ``run_unit`` runs (fds never outlive a unit)."""

    def __init__(self) -> None:
        self.pool = BufferPool(keep_bytes=256 << 20)
        self.reader: DirectReader | None = None
        self.native_threads: int | None = None    # pthreads per native kernel call (None: torch's thread count)


def _nthreads() -> int:
    return _LOCAL.native_threads or torch.get_num_threads()


def init_thread(threads: int) -> None:
    """Thread-pool initializer: ``threads`` pthreads per native kernel call made on this thread."""
    _LOCAL.native_threads = max(1, threads)


_LOCAL = _Local()
_SLOTS = ComputeSlots()           # the running pool's compute slots (v4convert.threads.ComputeSlots)
set_compute_slots = _SLOTS.set
compute = _SLOTS.hold


def _pool() -> BufferPool:
    return _LOCAL.pool


def direct_io_enabled() -> bool:
    """O_DIRECT source reads unless ``V4C_DIRECT_IO=0`` (e.g. a release already in the page cache)."""
    return os.environ.get("V4C_DIRECT_IO", "1") != "0"


def read_rows(e: TensorEntry, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a stored tensor as a tensor of its stored dtype (``formats.direct_io``: one O_DIRECT
    read into a pooled aligned buffer inside ``run_unit``, valid until the unit ends; elsewhere a fresh buffer)."""
    rows = e.shape[0] if e.shape else 1
    r1 = rows if r1 is None else r1
    row_b = e.nbytes // rows if rows else 0
    n = (r1 - r0) * row_b
    mine = _LOCAL.reader
    rd = mine or DirectReader(_pool(), direct=direct_io_enabled())
    try:
        buf, got = rd.read_range(str(e.path), e.start + r0 * row_b, n)
    finally:
        if rd is not mine:
            rd.close()
    if got < n:
        raise SourceReadError(f"{e.path}: tensor {e.name}: short read at byte {e.start + r0 * row_b + got} "
                              f"of {e.end} (shard truncated during the run?)")
    tdtype = ST_DTYPES[e.dtype][0]
    shape = ((r1 - r0),) + tuple(e.shape[1:]) if e.shape else ()
    item = torch.empty((), dtype=tdtype).element_size()
    if buf.data_ptr() % item:         # a tensor whose file offset is not a multiple of its element size: copy
        buf = buf.clone()
    return buf.view(tdtype).reshape(shape)


_SHARD_LOCKS: dict[str, threading.Lock] = {}
_SHARD_LOCKS_GUARD = threading.Lock()


def _shard_lock(path: Path) -> threading.Lock:
    with _SHARD_LOCKS_GUARD:
        return _SHARD_LOCKS.setdefault(str(path), threading.Lock())


class Writer:
    """``pwrite`` into one output shard; ENOSPC becomes :class:`DiskFullError` naming the file.

    Worker threads writing one shard take turns on a per-shard lock: buffered writes to one file serialize on its
    inode lock anyway, and the kernel spins on that lock (8.5 % of all CPU with 2 threads on a full-size layer,
    ``perf``), while a waiter on ours sleeps."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY)
        self.lock = _shard_lock(path)

    def write(self, offset: int, data: torch.Tensor | bytes | memoryview, what: str) -> int:
        buf = memoryview(data) if isinstance(data, (bytes, memoryview)) else tensor_bytes(data)
        buf = buf.cast("B") if buf.format != "B" else buf
        done = 0
        with self.lock:
            while done < buf.nbytes:
                try:
                    done += os.pwrite(self.fd, buf[done:], offset + done)
                except OSError as ex:
                    if ex.errno == errno.ENOSPC:
                        raise DiskFullError(f"{self.path}: disk full while writing {what} "
                                            f"({buf.nbytes - done:,} bytes left); free space and rerun the same "
                                            f"command to resume") from None
                    raise
        return done

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------ direct (staged) writes
STAGE_MAX = 512 << 20          # bytes: larger units keep the buffered Writer (no second copy of a huge unit in RAM)


@dataclass
class Staged:
    """A finished unit's bytes ``[start, start + len(data))`` of ``shard``, still in RAM (for the shard hasher);
    ``release()`` returns the buffer to the pool (after it the view is invalid)."""
    shard: str
    start: int
    data: memoryview
    buf: torch.Tensor | None

    def release(self) -> None:
        if self.buf is not None:
            STAGES.give(self.buf)
            self.buf = None


class StagedWriter:
    """``Writer`` for one unit owning the contiguous range ``[start, end)`` of its shard (``plan.make_plan`` lays units
    back to back): writes land in an aligned staging buffer; ``commit()`` sends the whole 4 KiB pages of the range
    ``[ceil4k(start), floor4k(end))`` in one O_DIRECT ``pwrite`` and the head/tail fragments (pages shared with the
    neighbour units or the header) with a buffered one. Linux keeps the two coherent for distinct pages. Bytes of the
    range never written are zeros, as in the sparse file."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self.path, self.start, self.end = path, start, end
        self.lo = start - start % ALIGN                       # file offset of buf[0]
        self.buf = STAGES.take(_ceil(end) - self.lo)
        self.mv = memoryview(self.buf.numpy())
        self.spans: list[tuple[int, int]] = []                # written [a, b) file offsets

    def write(self, offset: int, data: torch.Tensor | bytes | memoryview, what: str) -> int:
        buf = memoryview(data) if isinstance(data, (bytes, memoryview)) else tensor_bytes(data)
        buf = buf.cast("B") if buf.format != "B" else buf
        n = buf.nbytes
        if offset < self.start or offset + n > self.end:
            raise RuntimeError(f"{self.path}: {what}: write [{offset}, {offset + n}) outside the unit's range "
                               f"[{self.start}, {self.end})")
        self.mv[offset - self.lo: offset - self.lo + n] = buf
        self.spans.append((offset, offset + n))
        return n

    def region(self, offset: int, nbytes: int, what: str) -> torch.Tensor:
        """The staging bytes ``[offset, offset + nbytes)`` of the file as a uint8 tensor for a kernel to fill in
        place (counted as written; valid until ``commit``/``abandon``)."""
        if offset < self.start or offset + nbytes > self.end:
            raise RuntimeError(f"{self.path}: {what}: region [{offset}, {offset + nbytes}) outside the unit's range "
                               f"[{self.start}, {self.end})")
        self.spans.append((offset, offset + nbytes))
        return self.buf[offset - self.lo: offset - self.lo + nbytes]

    def _zero_gaps(self) -> None:
        pos = self.start
        for a, b in sorted(self.spans) + [(self.end, self.end)]:
            if a > pos:
                self.buf[pos - self.lo: a - self.lo].zero_()
            pos = max(pos, b)

    def commit(self, shard: str) -> Staged:
        """Write the range out; -> its bytes for the hasher (the caller owns them: ``release()``)."""
        self._zero_gaps()
        a, b = _ceil(self.start), self.end - self.end % ALIGN     # whole pages of the range
        if a >= b:
            a = b = self.end                                         # no whole page: all buffered
        d = self._direct(a, b) if a < b and str(self.path) not in NO_DIRECT else a   # O_DIRECT wrote [a, d)
        w = Writer(self.path)
        try:
            w.write(self.start, self.mv[self.start - self.lo: a - self.lo], "unit head")
            w.write(d, self.mv[d - self.lo: self.end - self.lo], "unit tail")
        finally:
            w.close()
        return Staged(shard, self.start, self.mv[self.start - self.lo: self.end - self.lo], self.buf)

    def _direct(self, a: int, b: int) -> int:
        """O_DIRECT ``pwrite`` of pages ``[a, b)``; -> the file offset up to which it wrote (``a``: refused)."""
        fd = open_direct(self.path)
        if fd is None:
            return a
        try:
            return a + pwrite_direct(fd, self.path, self.mv[a - self.lo: b - self.lo], a)
        except OSError as ex:
            if ex.errno == errno.ENOSPC:
                raise DiskFullError(f"{self.path}: disk full while writing a unit ({b - a:,} bytes left); "
                                    f"free space and rerun the same command to resume") from None
            raise
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """The unit failed: nothing is written; the buffer goes back."""
        STAGES.give(self.buf)
