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
from pathlib import Path

import torch

from v4convert.formats.direct_io import BufferPool, DirectReader
from v4convert.formats.safetensors_io import ST_DTYPES, TensorEntry, tensor_bytes

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
