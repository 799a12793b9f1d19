"""The GGUF export engine: planned files, bounded worker threads, journal, resume, atomic rename.

Mirrors ``v4convert.quant.engine`` for ``export --gguf`` (issue #16):

1. Plan: every file's header (KVs + tensor infos + offsets) follows from ``TensorSpec.nbytes``
   (``formats.gguf_writer.layout_files``). Work units: one per tensor, or one per part of a tensor that
   has ``parts`` (a stacked ``[E, out, in]`` experts tensor: one unit per expert, never materialized whole).
2. Each split file ``F.gguf`` is built as ``F.gguf.partial``: header written, file pre-sized with
   ``ftruncate`` (sparse zeros = the padding), units ``os.pwrite`` their bytes at known offsets: the whole
   4 KiB pages of a unit's range O_DIRECT, its head/tail fragments (pages shared with the neighbours, which
   GGUF's 32-byte alignment packs together) buffered (``formats.direct_io.DirectStream``; EINVAL: buffered for
   that file; ``V4C_DIRECT_WRITE=0``: all buffered). ENOSPC while writing: ``GGUFDiskFullError``, the partials
   and journal kept for the rerun to resume.
3. Journal: the directory ``OUT.gguf.journal/`` (``OUT`` as given, also for splits) with our marker
   (``outputs.write_marker``, so ``outputs.claim`` treats it as our scratch), ``plan.sha256`` (the plan
   fingerprint: version, source shard headers, options, every file's name/size/header bytes) and ``done``
   (one ``FILE TENSOR PART`` line per finished unit, PART -1 for a whole tensor). Lines are appended only
   after an ``fsync`` of the partials they cover (every ``sync_bytes`` of output and at the end); a line
   without its newline (torn by a kill) is ignored. A rerun with the same fingerprint skips journaled
   units (a partial with the wrong size or header is recreated and its units redone); another fingerprint
   starts over (logged). Output bytes depend only on the plan, so a resumed file is byte-identical.
4. Finish: fsync, ``on_step("written")``, rename each partial to its final name (``on_step("replaced")``
   after each), then remove the journal. A partial never carries the final name.

Workers are threads: the producers are closures over the open checkpoint and the heavy work (O_DIRECT source
reads, the native kernels, torch/numpy quantizers, ``pwrite``) releases the GIL. ``2 * workers`` threads run at
most ``2 * workers`` units at once, at most ``workers`` of them encoding (``source_io.compute``) while the others
read or write, and together at most ``DEFAULT_INFLIGHT_BYTES`` of float32 values unless a
unit runs alone; a unit's bytes are dropped once written, so peak memory stays near one large tensor's.

Kill points (``outputs.kill_point``): ``gguf:created`` (partials and journal made), ``gguf:tensor`` (after
each journal append), ``gguf:written`` / ``gguf:replaced`` (through ``on_step``, in the exporter).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from v4convert import __version__, outputs
from v4convert.errors import UserError
from v4convert.formats.direct_io import direct_write_enabled, reserve, unallocated_bytes
from v4convert.formats.gguf_writer import FileLayout, write_tensor
from v4convert.threads import usable_cores

from .source_io import set_compute_slots, set_kernel_threads, unit_scope

JOURNAL_SUFFIX = ".journal"
DEFAULT_SYNC_BYTES = 1 << 30      # fsync + journal at least every 1 GiB of output
# Units in flight together hold at most this many float32 bytes of values (a unit alone may exceed it): a
# full-size V3 o_proj [7168, 16384] (470 MB float32, ~1.5 GB while its FP8 blocks are decoded) runs alone,
# experts [2048, 7168] (59 MB) run side by side. Keeps peak RSS near the one-worker peak.
DEFAULT_INFLIGHT_BYTES = 512 << 20


class GGUFDiskFullError(UserError):
    """Not enough free space for the rest of the GGUF files."""


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def partial_of(p: Path) -> Path:
    return p.with_name(p.name + ".partial")


def journal_dir(out: Path) -> Path:
    """The journal of an export to ``out`` (the path as given: ``X.gguf``, also when split)."""
    out = outputs.absolute(out)
    return out.with_name(out.name + JOURNAL_SUFFIX)


@dataclass(frozen=True)
class Unit:
    """One piece of work: tensor ``tensor`` of file ``file``, whole (``part`` -1) or its ``part``-th slice."""
    file: int
    tensor: int
    part: int
    nbytes: int
    elems: int            # elements it encodes: its working set is a few float32 copies of them

    @property
    def cost(self) -> int:
        """Float32 bytes of the unit's values (what the memory budget of ``_pool`` counts)."""
        return 4 * self.elems

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.file, self.tensor, self.part)


def units(files: Sequence[FileLayout]) -> list[Unit]:
    out = []
    for fi, f in enumerate(files):
        for ti, t in enumerate(f.tensors):
            n = math.prod(t.shape)
            if t.parts:
                out.extend(Unit(fi, ti, k, t.nbytes // len(t.parts), n // len(t.parts)) for k in range(len(t.parts)))
            else:
                out.append(Unit(fi, ti, -1, t.nbytes, n))
    return out


def fingerprint(files: Sequence[FileLayout], context: dict) -> str:
    """SHA-256 over what determines the output bytes: tool version, ``context`` (source shard headers,
    options; JSON-able), per file its name, size, header bytes and its tensors' part counts."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": __version__, "context": context}, sort_keys=True, default=str).encode())
    for f in files:
        h.update(json.dumps([f.path.name, f.size, [len(t.parts or ()) for t in f.tensors]]).encode())
        h.update(hashlib.sha256(f.header).digest())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ journal
class Journal:
    def __init__(self, path: Path):
        self.dir = path
        self.plan_path = path / "plan.sha256"
        self.done_path = path / "done"

    def exists(self) -> bool:
        return self.dir.is_dir()

    def fingerprint(self) -> str | None:
        return self.plan_path.read_text().strip() if self.plan_path.is_file() else None

    def start(self, fp: str, partials: Sequence[Path]) -> None:
        self.dir.mkdir()
        outputs.write_marker(self.dir, "gguf-journal", "writing", fingerprint=fp,
                             partials=[p.name for p in partials])
        self.done_path.touch()
        self.plan_path.write_text(fp + "\n")       # last: a journal without it is another plan's
        _fsync(self.plan_path)
        _fsync(self.dir)

    def done(self) -> set[tuple[int, int, int]]:
        """Keys of journaled units; the text after the last newline (a line torn by a kill) is ignored."""
        if not self.done_path.is_file():
            return set()
        out = set()
        for line in self.done_path.read_text().split("\n")[:-1]:
            parts = line.split()
            try:
                f, t, p = (int(x) for x in parts)
            except ValueError:
                continue
            out.add((f, t, p))
        return out

    def append(self, done: Sequence[Unit]) -> None:
        with open(self.done_path, "a") as f:
            f.write("".join(f"{u.file} {u.tensor} {u.part}\n" for u in done))
            f.flush()
            os.fsync(f.fileno())

    def forget_files(self, files: set[int]) -> None:
        keep = [k for k in sorted(self.done()) if k[0] not in files]
        tmp = self.done_path.with_name("done.tmp")
        tmp.write_text("".join(f"{a} {b} {c}\n" for a, b, c in keep))
        os.replace(tmp, self.done_path)

    def partials(self) -> list[Path]:
        """The partial files this journal's run created (beside the journal)."""
        names = (outputs.read_marker(self.dir) or {}).get("partials") or []
        return [self.dir.parent / n for n in names if isinstance(n, str) and "/" not in n]

    def remove(self) -> None:
        outputs.remove_ours(self.dir)


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(layout: FileLayout) -> None:
    with open(partial_of(layout.path), "wb") as f:
        f.write(layout.header)
        f.truncate(layout.size)          # zeros: padding and not-yet-written tensors (allocated in execute)


def _intact(layout: FileLayout) -> bool:
    p = partial_of(layout.path)
    if not p.is_file() or p.is_symlink() or p.stat().st_size != layout.size:
        return False
    with open(p, "rb") as f:
        return f.read(len(layout.header)) == layout.header


def prepare(files: Sequence[FileLayout], journal: Journal, fp: str, log: Callable[[str], None]) -> set:
    """Create the partials and the journal, or validate them for a resume; returns the done unit keys."""
    if journal.exists():
        if journal.fingerprint() == fp:
            done = journal.done()
            bad = {i for i, f in enumerate(files) if not _intact(f)}
            if bad & {k[0] for k in done}:
                journal.forget_files(bad)
                done = {k for k in done if k[0] not in bad}
            for i in sorted(bad):
                _create(files[i])
            return done
        log(f"gguf: {journal.dir} belongs to another export (other source, options, types or version): "
            f"starting over")
        for p in journal.partials():                 # e.g. another split count: other names
            outputs.remove_ours(p)
        journal.remove()
    elif any(partial_of(f.path).exists() for f in files):
        log(f"gguf: {partial_of(files[0].path).name} has no journal: starting over")
    for f in files:
        _create(f)
    journal.start(fp, [partial_of(f.path) for f in files])
    outputs.kill_point("gguf:created")
    return set()


def _check_space(files: Sequence[FileLayout], todo: Sequence[Unit]) -> None:
    # what the remaining units write, less what the partials already hold allocated (a resumed run's reservation)
    unallocated = sum(unallocated_bytes(partial_of(f.path), f.size) for f in files)
    need = min(sum(u.nbytes for u in todo), unallocated)
    free = shutil.disk_usage(partial_of(files[0].path).parent).free
    if need > free:
        raise GGUFDiskFullError(f"{files[0].path.parent}: the GGUF needs {need / 1e9:.2f} GB more but only "
                                f"{free / 1e9:.2f} GB is free there")


def discard(files: Sequence[FileLayout], journal: Journal) -> None:
    """Remove this export's partials and journal (after an error a rerun cannot get past)."""
    for f in files:
        partial_of(f.path).unlink(missing_ok=True)
    if journal.exists():
        journal.remove()


# ------------------------------------------------------------------------------------ run
def execute(files: Sequence[FileLayout], journal: Journal, fp: str, *, workers: int | None = None,
            sync_bytes: int = DEFAULT_SYNC_BYTES, progress: Callable[[int], None] | None = None,
            on_step: Callable[[str, Path], None] | None = None,
            log: Callable[[str], None] = lambda m: None) -> list[Path]:
    """Write ``files`` (resuming a journaled run of the same plan ``fp``); returns the final paths.

    ``workers`` threads (None: ``default_workers()``) encode units, at most ``2 * workers`` submitted.
    ``progress(n)``: bytes written (the resumed part first, at once). ``on_step(step, path)``: "written"
    once every partial is complete and fsynced (before the first rename), "replaced" after each rename.
    A ``UserError`` (bad values, a producer's wrong size) discards the partials and the journal; any other
    exception or a kill keeps them, with every finished unit journaled, for the rerun to resume."""
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"{files[0].path}: --workers {workers}: needs at least 1 (0: the default)")
    all_units = units(files)
    done = prepare(files, journal, fp, log)
    todo = [u for u in all_units if u.key not in done]
    if done:
        log(f"gguf: resuming: {len(all_units) - len(todo)} of {len(all_units)} tensor units already written "
            f"(journal {journal.dir})")
    if progress is not None:
        progress(sum(u.nbytes for u in all_units if u.key in done))
    _check_space(files, todo)
    fds = [os.open(partial_of(f.path), os.O_RDWR) for f in files]
    if direct_write_enabled():
        for f, fd in zip(files, fds):
            reserve(fd, f.size)
    pending: list[Unit] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        if not pending:
            return
        batch = pending[:]
        pending.clear()
        pending_bytes = 0
        for fi in sorted({u.file for u in batch}):
            os.fsync(fds[fi])                 # data first, then the journal line that vouches for it
        journal.append(batch)
        outputs.kill_point("gguf:tensor")

    written: set[tuple[int, int, int]] = set()

    def finished(u: Unit) -> None:
        nonlocal pending_bytes
        written.add(u.key)
        pending.append(u)
        pending_bytes += u.nbytes
        if progress is not None:
            progress(u.nbytes)
        if pending_bytes >= sync_bytes:
            flush()

    direct = direct_write_enabled()

    def run(u: Unit) -> Unit:
        f = files[u.file]
        t = f.tensors[u.tensor]
        try:
            with unit_scope(f.offsets[u.tensor] + max(u.part, 0) * u.nbytes):   # pooled kernel outputs
                write_tensor(fds[u.file], partial_of(f.path), t, f.offsets[u.tensor], None if u.part < 0 else u.part,
                             direct=direct)
        except OSError as ex:
            if ex.errno != errno.ENOSPC:
                raise
            what = f"tensor {t.name}" + (f" part {u.part}" if u.part >= 0 else "")
            raise GGUFDiskFullError(f"{partial_of(f.path)}: {what}: disk full while writing ({u.nbytes:,} bytes); "
                                    f"free space and rerun the same command to resume") from None
        return u

    try:
        try:
            if workers == 1:
                for u in todo:
                    finished(run(u))
            else:
                _pool(todo, workers, run, finished)
        finally:
            flush()                           # everything finished is journaled (fsynced first)
        if written | done != {u.key for u in all_units}:       # never rename a file with a hole
            raise RuntimeError(f"{files[0].path}: engine bug: {len(all_units) - len(written | done)} units not written")
        for fd in fds:
            os.fsync(fd)
    except GGUFDiskFullError:
        raise                                 # partials and journal stay: free space, the rerun resumes
    except UserError:
        for fd in fds:
            os.close(fd)
        fds = []
        discard(files, journal)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    if on_step:
        on_step("written", files[0].path)
    for f in files:
        os.replace(partial_of(f.path), f.path)
        if on_step:
            on_step("replaced", f.path)
    journal.remove()
    return [f.path for f in files]


def _pool(todo: Sequence[Unit], workers: int, run: Callable[[Unit], Unit], finished: Callable[[Unit], None],
          budget: int = DEFAULT_INFLIGHT_BYTES) -> None:
    """Run ``todo`` on ``2 * workers`` threads (at most ``workers`` encoding at once, the others reading or writing),
    in order, at most ``2 * workers`` submitted and at most ``budget``
    bytes of ``Unit.cost`` submitted (or one unit alone); ``finished`` runs in this thread.
    On an error (or Ctrl-C) nothing new starts, running units end, and those that succeeded are reported."""
    queue = list(reversed(todo))
    inflight: dict[cf.Future, Unit] = {}
    # 2 * workers threads: the reads and writes of some units overlap the encoding of others; at most ``workers``
    # encode at once (source_io.compute), each kernel call with cores // workers pthreads (no oversubscription)
    set_compute_slots(workers)
    with contextlib.ExitStack() as stack:
        stack.callback(set_compute_slots, None)
        pool = stack.enter_context(cf.ThreadPoolExecutor(max_workers=2 * workers, thread_name_prefix="gguf",
                                                         initializer=set_kernel_threads,
                                                         initargs=(max(1, usable_cores() // workers),)))
        try:
            while True:
                held = sum(u.cost for u in inflight.values())
                while queue and len(inflight) < 2 * workers and (not inflight or held + queue[-1].cost <= budget):
                    u = queue.pop()
                    held += u.cost
                    inflight[pool.submit(run, u)] = u
                if not inflight:
                    return
                ready, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for fut in ready:
                    del inflight[fut]
                    finished(fut.result())
        except BaseException:
            for fut in inflight:
                fut.cancel()
            for fut in cf.as_completed([f for f in inflight if not f.cancelled()]):
                if fut.exception() is None:
                    finished(fut.result())
            raise
