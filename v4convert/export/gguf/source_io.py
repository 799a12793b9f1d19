"""Source reads and kernel threads of the GGUF export's workers (issue #16).

The exporter's producers run on the engine's worker threads. Reading a stored tensor through the checkpoint's
memory map costs a page fault per 4 KiB page and a page-cache copy (system CPU), and the kernel's readahead only
sees small synchronous faults. Here a stored tensor is one O_DIRECT ``preadv`` of its byte range into a 4 KiB-aligned
buffer from this thread's :class:`formats.direct_io.BufferPool` (reused between units: faulted in once), as the
quantizer's workers read (``quant/unit_io.py``); where the filesystem refuses O_DIRECT it is a buffered ``preadv``.
``V4C_DIRECT_IO=0`` reads buffered (e.g. a checkpoint already in the page cache).

Kernel threads and compute slots: the engine runs ``2 * workers`` threads so that reads and writes of some units
overlap the encoding of others, but at most ``workers`` of them encode at once (:func:`compute`, a semaphore set by
``set_compute_slots``), each kernel call with ``usable cores // workers`` pthreads (``set_kernel_threads``, from the
engine's thread initializer): ``--workers 2`` on 2 cores encodes on 2 threads, never 4.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from v4convert.checkpoint import TensorInfo
from v4convert.errors import UserError
from v4convert.formats.direct_io import ALIGN, BufferPool, DirectReader
from v4convert.formats.safetensors_io import ST_DTYPES, TensorEntry
from v4convert.threads import ComputeSlots


class SourceReadError(UserError):
    """A source shard shorter than its header says (truncated or replaced during the export)."""


class _Local(threading.local):
    def __init__(self) -> None:
        self.pool = BufferPool(keep_bytes=64 << 20)      # kept between reads: one V3 expert's FP8 bytes are ~15 MB
        self.threads: int | None = None
        self.out_pool = BufferPool(keep_bytes=64 << 20)  # kernel outputs of this thread's units (one V3 expert: 7.8 MB)
        self.unit_offset: int | None = None              # file offset of the unit this thread is producing, if any


_LOCAL = _Local()


def direct_reads_enabled() -> bool:
    """O_DIRECT source reads unless ``V4C_DIRECT_IO=0`` (the variable the quantizer reads too)."""
    return os.environ.get("V4C_DIRECT_IO", "1") != "0"


def set_kernel_threads(threads: int) -> None:
    """Native kernel threads for calls made on this thread (the engine's worker initializer)."""
    _LOCAL.threads = max(1, threads)


def kernel_threads(default: int) -> int:
    """This thread's native kernel threads: what ``set_kernel_threads`` set, else ``default``."""
    return _LOCAL.threads or default


_SLOTS = ComputeSlots()           # the running export's compute slots (v4convert.threads.ComputeSlots)
set_compute_slots = _SLOTS.set
compute = _SLOTS.hold


@contextlib.contextmanager
def unit_scope(offset: int) -> Iterator[None]:
    """Around one unit's produce and write on an engine worker (``offset``: where its bytes go in the file): the
    kernel outputs taken with :func:`out_buffer` meanwhile come from this thread's pool and go back to it at the end
    (no fresh pages to fault in per unit), placed so that the file's page boundaries fall on 4 KiB-aligned addresses
    (``DirectStream`` then sends the whole pages straight from them, no copy into its window)."""
    _LOCAL.unit_offset = offset
    try:
        with _LOCAL.out_pool.scope():
            yield
    finally:
        _LOCAL.unit_offset = None


def out_buffer(nbytes: int) -> torch.Tensor | None:
    """A uint8 buffer of ``nbytes`` for a kernel's output inside :func:`unit_scope` (valid until it ends; its first
    byte's address is the unit's file offset modulo 4 KiB), else None (the kernel allocates a new tensor)."""
    off = _LOCAL.unit_offset
    if off is None:
        return None
    skew = off % ALIGN
    return _LOCAL.out_pool.take(nbytes + skew)[skew: skew + nbytes]


def _read(rd: DirectReader, e: TensorEntry) -> torch.Tensor:
    buf, got = rd.read_range(str(e.path), e.start, e.nbytes)
    if got < e.nbytes:
        raise SourceReadError(f"{e.path}: tensor {e.name}: short read at byte {e.start + got} of {e.end} "
                              f"(shard truncated during the export?)")
    dtype = ST_DTYPES[e.dtype][0]
    if buf.data_ptr() % torch.empty((), dtype=dtype).element_size():   # file offset not a multiple of the item
        buf = buf.clone()
    return buf.view(dtype).reshape(e.shape)


@contextlib.contextmanager
def stored(info: TensorInfo) -> Iterator[dict[str, torch.Tensor]]:
    """The stored tensors of ``info`` by component (as ``Checkpoint.raw``), read into this thread's pooled buffers:
    valid only inside the ``with`` (the buffers are reused by the next read)."""
    rd = DirectReader(_LOCAL.pool, direct=direct_reads_enabled())
    try:
        with _LOCAL.pool.scope():
            yield {k: _read(rd, e) for k, e in info.parts.items()}
    finally:
        rd.close()
