"""SHA-256 of every output shard, computed while the run writes it (off the critical path).

A shard is its header followed by its units' bytes, back to back in unit order (``plan.make_plan``). Units
finish in any order; :class:`ShardHasher` keeps, per shard, the position up to which every byte is written, and a
background thread hashes each newly contiguous stretch straight from the page cache (the bytes were just
written; ``hashlib`` releases the GIL on large buffers, so the workers keep the CPU), or, for units written with
O_DIRECT (not in the page cache), from their staging buffers, held until hashed within a bounded window. At the finish only the
stretches not yet hashed remain. The digest is that of the whole file, the same as ``sha256sum`` prints.

W4A4 plans write their input-scale entries after every unit: their shards are hashed at the finish instead.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

from v4convert.formats.containers import Part

from .plan import Plan
from .unit_io import Staged

PIECE = 8 << 20                 # bytes per pread + update
WINDOW = 256 << 20              # bytes of finished units' staged buffers held for hashing (more: read back from the file)


def _hash_range(h: "hashlib._Hash", fd: int, a: int, b: int, path: Path) -> None:
    """``h.update`` with bytes ``[a, b)`` of the file, through a read-only map of its page-cache pages (no copy into
    a Python buffer); a pread where the file cannot be mapped."""
    if os.fstat(fd).st_size < b:
        raise OSError(f"{path}: shorter than {b} bytes while hashing")
    lo = a - a % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(fd, b - lo, prot=mmap.PROT_READ, offset=lo)
    except (OSError, ValueError):
        data = os.pread(fd, b - a, a)
        if len(data) != b - a:
            raise OSError(f"{path}: short read at byte {a + len(data)} while hashing") from None
        h.update(data)
        return
    try:
        with memoryview(m) as mv:
            h.update(mv[a - lo:])
    finally:
        m.close()


class ShardHasher:
    """``done(unit_index)`` as units finish (after their bytes are written); ``digests()`` at the finish."""

    def __init__(self, plan: Plan, part: Path, done: set[int] = frozenset()) -> None:
        self.part = part
        self._cv = threading.Condition()
        self._sha = {name: hashlib.sha256() for name in plan.shards}
        self._pos = {name: 0 for name in plan.shards}               # bytes hashed so far
        self._size = dict(plan.shards)
        late = {u.shard for u in plan.units for t in u.tensors for e in t.out if e.part is Part.INPUT_SCALE}
        # per shard: its units in file order and the end offset each one completes (header: ready from the start)
        self._order: dict[str, list[tuple[int, int]]] = {n: [] for n in plan.shards}
        self._start: dict[int, int] = {}                            # unit index -> its first byte (hashed shards)
        for u in plan.units:
            if u.shard not in late:
                self._order[u.shard].append((u.index, min(u.offsets.values()) + u.bytes_out))
                self._start[u.index] = min(u.offsets.values())
        # staged O_DIRECT writes: per shard, unit start -> its bytes in RAM, not yet hashed (at most WINDOW bytes)
        self._held: dict[str, dict[int, Staged]] = {n: {} for n in plan.shards}
        self._held_bytes = 0
        self._next = {n: 0 for n in plan.shards}                    # index into _order[n] of the first unfinished
        self._ready = {n: len(plan.shard_headers[n]) if n not in late else 0 for n in plan.shards}
        self._finished: set[int] = set(done)
        self._advance_all()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="v4c-shard-hasher", daemon=True)
        self._thread.start()

    def _advance(self, name: str) -> None:
        order, i = self._order[name], self._next[name]
        while i < len(order) and order[i][0] in self._finished:
            self._ready[name] = order[i][1]
            i += 1
        self._next[name] = i

    def _advance_all(self) -> None:
        for n in self._order:
            self._advance(n)

    def done(self, unit_index: int, shard: str, staged: Staged | None = None) -> None:
        """``staged``: the unit's bytes in RAM (written with O_DIRECT, so not in the page cache): hashed from there
        while the window has room, else released now and read back from the file when their turn comes."""
        with self._cv:
            if staged is not None:
                n = staged.data.nbytes
                if unit_index in self._start and (self._held_bytes + n <= WINDOW or not self._held_bytes):
                    self._held[shard][staged.start] = staged
                    self._held_bytes += n
                else:
                    staged.release()
            self._finished.add(unit_index)
            self._advance(shard)
            self._cv.notify()

    def _work(self) -> tuple[str, int, int, Staged | None] | None:
        """Next job: a held unit starting at the hashed position, else file bytes up to the next held unit."""
        for n, ready in self._ready.items():
            pos = self._pos[n]
            if ready > pos:
                held = self._held[n]
                if pos in held:
                    st = held.pop(pos)
                    return n, pos, pos + st.data.nbytes, st
                stop = min([s for s in held if s > pos], default=ready)
                return n, pos, min(ready, stop, pos + PIECE), None
        return None

    def _release_held(self) -> None:
        for held in self._held.values():
            for st in held.values():
                st.release()
            held.clear()
        self._held_bytes = 0

    def _run(self) -> None:
        fds: dict[str, int] = {}
        try:
            while True:
                with self._cv:
                    job = self._work()
                    while job is None and not self._stop:
                        self._cv.wait()
                        job = self._work()
                    if job is None:
                        return
                name, a, b, st = job
                if st is not None:
                    try:
                        self._sha[name].update(st.data)     # hashlib drops the GIL on large buffers
                    finally:
                        with self._cv:
                            self._held_bytes -= st.data.nbytes
                        st.release()
                else:
                    if name not in fds:
                        fds[name] = os.open(self.part / name, os.O_RDONLY)
                    _hash_range(self._sha[name], fds[name], a, b, self.part / name)
                with self._cv:
                    self._pos[name] = b
        except BaseException as e:          # reported by digests(): a bug or an I/O error, never swallowed
            self._error = e
        finally:
            for fd in fds.values():
                os.close(fd)

    def digests(self) -> dict[str, str]:
        """Hash what is left (every byte is written now) and return ``{shard: sha256 hex}``."""
        with self._cv:
            for n in self._ready:
                self._ready[n] = self._size[n]
            self._stop = True
            self._cv.notify()
        self._thread.join()
        self._release_held()
        if self._error is not None:
            raise self._error
        return {n: self._sha[n].hexdigest() for n in sorted(self._sha)}

    def close(self) -> None:
        """Stop without a result (the run failed)."""
        with self._cv:
            self._ready = dict(self._pos)
            self._stop = True
            self._cv.notify()
        self._thread.join()
        self._release_held()
