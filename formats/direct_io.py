"""Reads that go from the disk straight into our buffers: O_DIRECT, page-aligned, reused.

A cold 700 GB release is read once; through the page cache every byte is copied twice (disk -> cache -> our
buffer) and a fresh buffer per tensor is page-faulted (zeroed) by the kernel first. Here a read of ``[start, end)``
becomes one O_DIRECT ``preadv`` of the 4 KiB-aligned cover ``[start & ~4095, ceil4k(end))`` into a 4 KiB-aligned
buffer taken from a :class:`BufferPool` (kept between calls, so pages are faulted in once per process), and the
caller gets a view at ``start``. Where the filesystem refuses O_DIRECT (tmpfs, some overlayfs) the same call
falls back to a buffered ``preadv`` of exactly ``[start, end)``.

``read_range`` returns how many of the wanted bytes arrived; a short count means the file is shorter than asked
(truncated under us): the caller names the tensor in its error.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

ALIGN = 4096                  # O_DIRECT alignment of offset, length and buffer address (logical block size <= 4 KiB)


def _ceil(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A fresh 4 KiB-aligned uint8 tensor of ``nbytes`` rounded up to whole MiB (contents undefined)."""
    cap = _ceil(max(nbytes, 1), 1 << 20)              # whole MiB: neighbouring sizes share pooled buffers
    raw = torch.empty(cap + ALIGN, dtype=torch.uint8)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off: off + cap]


class BufferPool:
    """Page-aligned uint8 buffers reused between reads. Inside ``with pool.scope():`` buffers come from the pool and
    those taken in that scope return to it when it ends (callers must not keep views past it; scopes nest: a loop
    body can be its own scope so a streamed copy holds one piece at a time); outside any scope every ``take`` is a
    fresh allocation the caller owns. At most ``keep_bytes`` stay allocated between scopes."""

    def __init__(self, keep_bytes: int = 1 << 30) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []      # aligned uint8 [capacity] views of their own allocations
        self._used: list[torch.Tensor] = []      # taken, in order; a scope releases its own tail
        self._marks: list[int] = []

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        self._marks.append(len(self._used))
        try:
            yield
        finally:
            self._release_since(self._marks.pop())

    def take(self, nbytes: int) -> torch.Tensor:
        """An aligned uint8 tensor of at least ``nbytes`` (contents undefined)."""
        if not self._marks:
            return aligned_empty(nbytes)
        fit = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]    # indices: tensors have no plain ==
        if fit:
            b = self._free.pop(min(fit, key=lambda i: self._free[i].numel()))
        else:
            b = aligned_empty(nbytes)
        self._used.append(b)
        return b

    def _release_since(self, mark: int) -> None:
        self._free.extend(self._used[mark:])
        del self._used[mark:]
        self._free.sort(key=lambda t: -t.numel())
        total = 0
        kept = []
        for b in self._free:                      # largest first; drop what exceeds the budget
            if total + b.numel() <= self.keep_bytes:
                kept.append(b)
                total += b.numel()
        self._free = kept


class DirectReader:
    """One O_DIRECT file descriptor per path (buffered where refused), kept open for this process's reads."""

    def __init__(self, pool: BufferPool | None = None, direct: bool = True) -> None:
        self.pool = pool or BufferPool()
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict[str, tuple[int, bool]] = {}      # path -> (fd, opened with O_DIRECT)

    def _fd(self, path: str) -> tuple[int, bool]:
        got = self._fds.get(path)
        if got is None:
            got = None
            if self.direct:
                try:
                    got = (os.open(path, os.O_RDONLY | os.O_DIRECT), True)
                except OSError:
                    got = None
            if got is None:
                got = (os.open(path, os.O_RDONLY), False)
            self._fds[path] = got
        return got

    def read_range(self, path: str, start: int, nbytes: int) -> tuple[torch.Tensor, int]:
        """``(uint8 [nbytes] view, bytes of it that were read)`` of ``path[start:start + nbytes]``."""
        fd, direct = self._fd(str(path))
        if direct:
            lo = start - start % ALIGN
            span = _ceil(start + nbytes) - lo
            buf = self.pool.take(span)[:span]
            try:
                got = _pread_full(fd, buf, lo, direct=True)
            except OSError:                     # O_DIRECT refused at read time: buffered from now on
                os.close(fd)
                self._fds[str(path)] = (os.open(path, os.O_RDONLY), False)
                return self.read_range(path, start, nbytes)
            head = start - lo
            return buf[head: head + nbytes], max(0, min(nbytes, got - head))
        buf = self.pool.take(nbytes)[:nbytes]
        return buf, _pread_full(fd, buf, start)

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_full(fd: int, buf: torch.Tensor, offset: int, direct: bool = False) -> int:
    """``preadv`` until ``buf`` is full or the file ends; returns the bytes read. O_DIRECT reads stop at a count
    that is not a whole 4 KiB block (the end of the file: the next request would be unaligned)."""
    mv = memoryview(buf.numpy())
    got = 0
    while got < len(mv):
        k = os.preadv(fd, [mv[got:]], offset + got)
        got += k
        if k == 0 or (direct and k % ALIGN):
            break
    return got
