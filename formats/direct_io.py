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
import ctypes
import errno
import os
import threading
from collections.abc import Iterator

import numpy as np
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


# ------------------------------------------------------------------------------------ the write side
# Output written with O_DIRECT skips the page-cache copy (on this VM a buffered ``pwrite`` costs ~2.1 s of system
# CPU per GiB, O_DIRECT ~0.05 s). O_DIRECT needs a 4 KiB-aligned buffer address, length and file offset, so a
# writer sends the whole pages of its byte range from an aligned buffer and the unaligned head/tail fragments
# (pages shared with a neighbour's bytes or a header) with a buffered ``pwrite``; Linux keeps the two coherent
# for distinct pages. ``V4C_DIRECT_WRITE=0`` keeps everything buffered. ENOSPC stays an ``OSError`` here: callers
# name the file and tensor/unit in their own disk-full error.
NO_DIRECT: set[str] = set()    # paths whose filesystem refused O_DIRECT (tmpfs: EINVAL at open): buffered from then on


def direct_write_enabled() -> bool:
    """O_DIRECT output writes unless ``V4C_DIRECT_WRITE=0`` (the buffered ``pwrite`` path)."""
    return os.environ.get("V4C_DIRECT_WRITE", "1") != "0" and hasattr(os, "O_DIRECT")


def reserve(fd: int, size: int) -> None:
    """Reserve ``[0, size)`` of ``fd`` (Linux ``fallocate`` mode 0: unwritten extents, read as zeros; data already
    there is kept). On ext4 an O_DIRECT write into a hole takes the inode lock exclusively for the whole I/O, so
    concurrent page-aligned writes into a sparse file run one at a time (and buffered fragments wait behind them);
    into allocated extents they run under the shared lock. Where ``fallocate`` is missing or refused the file stays
    sparse (never glibc's ``posix_fallocate`` emulation, which writes zeros over the whole range)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate(fd, 0, 0, size)      # -1 (EOPNOTSUPP, ENOSPC, ...): stays sparse; a full disk shows at the writes


def unallocated_bytes(path: str | os.PathLike, size: int) -> int:
    """Bytes of ``[0, size)`` of ``path`` not yet backed by disk blocks (a resumed run's earlier reservation counts)."""
    return max(0, size - os.stat(path).st_blocks * 512)


class StagePool:
    """4 KiB-aligned staging buffers shared by every thread (a buffer may be taken on one thread and given back on
    another); at most ``keep_bytes`` stay allocated while free."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An aligned uint8 tensor of at least ``nbytes`` (a whole number of MiB; contents undefined)."""
        with self._lock:
            fit = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fit:
                return self._free.pop(min(fit, key=lambda i: self._free[i].numel()))
        return aligned_empty(nbytes)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            if sum(b.numel() for b in self._free) + buf.numel() <= self.keep_bytes:
                self._free.append(buf)


STAGES = StagePool(keep_bytes=512 << 20)


def pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    """Buffered ``pwrite`` of all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


def open_direct(path: str | os.PathLike) -> int | None:
    """A write-only O_DIRECT fd of ``path``; None where refused (EINVAL: the path joins ``NO_DIRECT``)."""
    if str(path) in NO_DIRECT:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as ex:
        if ex.errno != errno.EINVAL:
            raise
        NO_DIRECT.add(str(path))
        return None


def pwrite_direct(fd: int, path: str | os.PathLike, data: memoryview, offset: int) -> int:
    """O_DIRECT ``pwrite`` of ``data`` (address, length and ``offset`` 4 KiB-aligned) at ``offset``; -> the bytes
    written: all of them, or fewer where the rest must go buffered (EINVAL at write time, some overlayfs: the path
    joins ``NO_DIRECT``; or a short count that is not whole pages). ENOSPC raises."""
    done = 0
    while done < data.nbytes:
        try:
            k = os.pwrite(fd, data[done:], offset + done)
        except OSError as ex:
            if ex.errno != errno.EINVAL:
                raise
            NO_DIRECT.add(str(path))
            return done
        done += k
        if k == 0 or k % ALIGN:                # cannot continue aligned: the rest buffered
            return done
    return done


def _address(data: memoryview) -> int:
    """Address of ``data``'s first byte (read-only views too)."""
    return int(np.frombuffer(data, dtype=np.uint8).ctypes.data) if data.nbytes else 0


class DirectStream:
    """Sequential writes of the byte range ``[start, end)`` of ``path`` (the caller's buffered ``fd``): the head up
    to the first page boundary and the tail after the last go buffered; the whole pages between are copied into an
    aligned window of at most ``window`` bytes (from :data:`STAGES`) and sent O_DIRECT each time it fills, so a
    huge tensor never needs a second whole copy in RAM; data whose bytes at a page boundary already sit at a 4 KiB-
    aligned address (a producer that placed its output so) is sent straight from there, uncopied. ``close()`` after the last byte; ``abandon()`` on error."""

    def __init__(self, path: str | os.PathLike, fd: int, start: int, end: int, window: int = 64 << 20) -> None:
        self.path, self.fd, self.pos, self.end = path, fd, start, end
        self.a, self.b = _ceil(start), end - end % ALIGN          # whole pages [a, b) of the range
        self.dfd = open_direct(path) if self.a < self.b else None
        if self.dfd is None:
            self.a = self.b = end                                  # all buffered
            self.buf = None
        else:
            cap = _ceil(min(window, self.b - self.a))              # whole pages
            self.buf = STAGES.take(cap)
            self.mv = memoryview(self.buf.numpy())[:cap]
        self.wlo, self.fill = self.a, 0                            # the window holds file bytes [wlo, wlo + fill)

    def write(self, data: memoryview) -> None:
        """Append ``data`` (uint8 memoryview) at the current position."""
        if self.pos < self.a and data.nbytes:                      # head fragment
            k = min(data.nbytes, self.a - self.pos)
            pwrite_full(self.fd, data[:k], self.pos)
            self.pos += k
            data = data[k:]
        while data.nbytes and self.pos < self.b:                   # whole pages: through the window
            if self.fill == 0 and data.nbytes >= ALIGN and _address(data) % ALIGN == 0:
                data = self._direct_from(data)                     # already aligned: no copy
                continue
            k = min(data.nbytes, self.b - self.pos, self.mv.nbytes - self.fill)
            self.mv[self.fill: self.fill + k] = data[:k]
            self.fill += k
            self.pos += k
            data = data[k:]
            if self.fill == self.mv.nbytes or self.pos == self.b:
                self._flush()
        if data.nbytes:                                            # tail fragment
            pwrite_full(self.fd, data, self.pos)
            self.pos += data.nbytes

    def _direct_from(self, data: memoryview) -> memoryview:
        """Send the whole pages at the head of ``data`` (its address 4 KiB-aligned, the window empty, ``pos`` on a
        page boundary) straight from it; returns the rest."""
        k = min(data.nbytes, self.b - self.pos) // ALIGN * ALIGN
        d = pwrite_direct(self.dfd, self.path, data[:k], self.pos) if str(self.path) not in NO_DIRECT else 0
        if d < k:
            pwrite_full(self.fd, data[d:k], self.pos + d)          # refused or short: the rest buffered
        self.pos += k
        self.wlo = self.pos
        return data[k:]

    def _flush(self) -> None:
        win = self.mv[: self.fill]
        d = pwrite_direct(self.dfd, self.path, win, self.wlo) if str(self.path) not in NO_DIRECT else 0
        if d < self.fill:
            pwrite_full(self.fd, win[d:], self.wlo + d)             # refused or short: the rest buffered
        self.wlo += self.fill
        self.fill = 0

    def close(self) -> None:
        """Send what the window still holds and release it."""
        try:
            if self.fill:
                self._flush()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Release the window and the O_DIRECT fd without writing (the unit failed; it is redone later)."""
        if self.dfd is not None:
            os.close(self.dfd)
            self.dfd = None
        if self.buf is not None:
            STAGES.give(self.buf)
            self.buf = None
