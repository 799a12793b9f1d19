"""Execute a quantize plan: bounded worker pool, journal, resume, atomic finish.

Layout while running: ``OUT.partial/`` holds the output shards (header written, file sized to its
final length, tensors filled in at planned offsets) and ``.journal/`` with the plan fingerprint and
one line per finished work unit. Journal lines are appended only after the shard data they cover
has been ``fsync``ed (every ``sync_bytes`` of output and at the end), so a killed run loses at most
that much work and a rerun of the same command skips every journaled unit. At the end: per-shard
SHA-256, ``model.safetensors.index.json``, ``config.json``, container config, tokenizer/generation
files; the journal is removed and ``OUT.partial`` renamed to ``OUT`` (a half-written directory never
carries the final name). Output bytes depend only on the plan, so a resumed run is byte-identical.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from v4convert.formats.containers import (Container, OutKind, Part, check_fused, compressed_tensors_config,
                                          modelopt_configs)
from v4convert.formats.direct_io import direct_write_enabled, reserve, unallocated_bytes

from .. import __version__
from .. import outputs
from ..paths import checkpoint_file
from .plan import Action, Plan, QuantizeError, Unit
from ..families.roles import RELEASE_ROUTING
from .hashing import ShardHasher
from .unit_io import DiskFullError, Writer, init_thread, set_compute_slots
from .workers import UnitResult, choose_kernel, init_worker, run_unit

JOURNAL_DIR = ".journal"
INDEX_NAME = "model.safetensors.index.json"
# Files of the source directory never copied (we write our own versions)
_NOT_COPIED = {"config.json", INDEX_NAME, "hf_quant_config.json", "model.safetensors"}
DEFAULT_SYNC_BYTES = 1 << 30


class OutputExistsError(QuantizeError):
    """The output directory (or a foreign ``.partial``) exists and ``--overwrite`` was not given."""


@dataclass
class RunResult:
    out: Path
    resumed_units: int
    units: int
    bytes_in: int
    bytes_out: int
    repack_blocks: int
    repack_inexact: int


def partial_dir(out: Path) -> Path:
    return outputs.partial_path(out)


# ------------------------------------------------------------------------------------ journal
class Journal:
    def __init__(self, root: Path):
        self.dir = root / JOURNAL_DIR
        self.done_path = self.dir / "done"
        self.plan_path = self.dir / "plan.sha256"

    def fingerprint(self) -> str | None:
        return self.plan_path.read_text().strip() if self.plan_path.is_file() else None

    def start(self, fp: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plan_path.write_text(fp + "\n")
        self.done_path.touch()
        _fsync_path(self.plan_path)

    def done(self) -> dict[int, list[int]]:
        """unit index -> [repack blocks, inexact blocks] of journaled units (a torn last line is ignored)."""
        out: dict[int, list[int]] = {}
        if not self.done_path.is_file():
            return out
        for line in self.done_path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and all(p.isdigit() for p in parts):
                out[int(parts[0])] = [int(parts[1]), int(parts[2])]
        return out

    def append(self, results: list[UnitResult]) -> None:
        if not results:
            return
        with open(self.done_path, "a") as f:
            f.write("".join(f"{r.index} {r.repack_blocks} {r.repack_inexact}\n" for r in results))
            f.flush()
            os.fsync(f.fileno())

    def forget(self, units: set[int]) -> None:
        keep = {k: v for k, v in self.done().items() if k not in units}
        tmp = self.done_path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k} {a} {b}\n" for k, (a, b) in keep.items()))
        os.replace(tmp, self.done_path)


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ setup
def _prepare(plan: Plan, out: Path, overwrite: bool) -> tuple[Path, Journal, dict[int, list[int]]] | None:
    """Create or validate ``OUT.partial``; return it, its journal and the already-done units, or None
    when ``OUT.partial`` already holds this plan's complete output (a kill during the finish)."""
    part = partial_dir(out)
    outputs.recover(out)
    try:
        outputs.claim(out, sources=[plan.source], overwrite=overwrite)
    except outputs.OutputError as e:
        raise OutputExistsError(str(e)) from None
    j = Journal(part)
    if part.exists():
        marker = outputs.read_marker(part) or {}
        if marker.get("state") == "complete" and marker.get("fingerprint") == plan.fingerprint:
            if (part / JOURNAL_DIR).exists():      # killed between steps 5 and 6 of the finish
                shutil.rmtree(part / JOURNAL_DIR)
            return None
        if j.fingerprint() != plan.fingerprint:
            if not overwrite:
                raise OutputExistsError(
                    f"{part}: holds an unfinished run of a different plan (other source, options or version); "
                    f"pass --overwrite to discard it")
            outputs.remove_ours(part)
    done: dict[int, list[int]] = {}
    if part.exists():
        done = j.done()
        bad_shards = set()
        for name, size in plan.shards.items():
            p = part / name
            hdr = plan.shard_headers[name]
            ok = p.is_file() and p.stat().st_size == size
            if ok:
                with open(p, "rb") as f:
                    ok = f.read(len(hdr)) == hdr
            if not ok:
                bad_shards.add(name)
        redo = {u.index for u in plan.units if u.shard in bad_shards}
        if redo & set(done):
            j.forget(redo)
            done = {k: v for k, v in done.items() if k not in redo}
        for name in bad_shards:
            _create_shard(part / name, plan.shard_headers[name], plan.shards[name])
    else:
        part.mkdir(parents=True)
        outputs.write_marker(part, "quantize", "writing", fingerprint=plan.fingerprint)
        j.start(plan.fingerprint)
        for name, size in plan.shards.items():
            _create_shard(part / name, plan.shard_headers[name], size)
    return part, j, done


def _create_shard(path: Path, header: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)      # sparse; tensors are written at their offsets


def _check_space(part: Path, plan: Plan, done: dict[int, list[int]]) -> None:
    # what the remaining units write, less what the shards already hold allocated (a resumed run's reservation)
    unallocated = sum(unallocated_bytes(part / name, size) for name, size in plan.shards.items())
    need = min(sum(u.bytes_out for u in plan.units if u.index not in done), unallocated)
    free = shutil.disk_usage(part).free
    if need > free:
        raise DiskFullError(f"{part}: needs {need / 1e9:.2f} GB more for the output but only {free / 1e9:.2f} GB "
                            f"is free on that filesystem")


# ------------------------------------------------------------------------------------ run
def execute(plan: Plan, out: Path, *, workers: int = 1, threads: int | None = None, overwrite: bool = False,
            progress: bool = False,
            sync_bytes: int = DEFAULT_SYNC_BYTES, device: str = "cpu", kernel=None, log=None,
            extra_files: dict[str, str | bytes] | None = None) -> RunResult:
    """Run ``plan`` into ``out``. ``workers == 1`` runs in this process (``threads`` torch threads, None:
    as set); more uses a process pool of lean workers (forked from a server that imported only
    ``v4convert.quant.workers``) with ``threads`` threads each (None: 1) and at most ``2 * workers`` units in flight
    (data-free plans: ``2 * workers`` threads of this process, ``workers`` of them in a kernel at once).
    ``kernel`` (``formats.native.Kernel`` or None = default) picks the FP8 -> NVFP4 hot path and the (CPU-only)
    MXFP4 -> NVFP4 re-pack; either kernel writes the same bytes, so it is not part of the plan. ``extra_files``: name -> text written into the
    output before the final rename (e.g. the calibration coverage report)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    requested = kernel          # units resolve it again: the FP8 hot path for ``device``, the re-pack for the CPU
    kernel, why = choose_kernel(requested, device.split(":")[0])
    log(f"hot path: {why}")
    if device.split(":")[0] != "cpu" and any(t.action is Action.MXFP4_TO_NVFP4 for t in plan.tensors()):
        log(f"mxfp4 -> nvfp4 re-pack (CPU): {choose_kernel(requested, 'cpu')[1]}")
    out = Path(out)
    prepared = _prepare(plan, out, overwrite)
    if prepared is None:
        log(f"resuming: {partial_dir(out)} is complete; putting it in place")
        return _swap(plan, out, partial_dir(out))
    part, journal, done = prepared
    _check_space(part, plan, done)
    if direct_write_enabled():
        for name, size in plan.shards.items():      # O_DIRECT writes into allocated extents run concurrently
            fd = os.open(part / name, os.O_WRONLY)
            try:
                reserve(fd, size)
            finally:
                os.close(fd)
    todo = [u for u in plan.units if u.index not in done]
    if done:
        log(f"resuming: {len(done)} of {len(plan.units)} units already done in {part}")
    from tqdm import tqdm
    bar = tqdm(total=plan.bytes_in, initial=sum(u.bytes_in for u in plan.units if u.index in done), unit="B",
               unit_scale=True, unit_divisor=1000, desc="quantize", disable=not progress, smoothing=0.1)
    hasher = ShardHasher(plan, part, set(done))
    flusher = _Flusher(part, plan, journal)
    stats = {k: list(v) for k, v in done.items()}
    pending: list[UnitResult] = []
    pending_bytes = 0

    def finished(r: UnitResult) -> None:
        nonlocal pending_bytes
        staged, r = r.staged, replace(r, staged=None)      # the hasher owns (and releases) the staged bytes
        pending.append(r)
        stats[r.index] = [r.repack_blocks, r.repack_inexact]
        pending_bytes += plan.units[r.index].bytes_out
        hasher.done(r.index, plan.units[r.index].shard, staged)
        bar.update(r.bytes_in)
        if pending_bytes >= sync_bytes:
            flush()

    def flush() -> None:
        nonlocal pending_bytes
        if pending:
            flusher.submit(pending[:])     # taken first: a Ctrl-C inside flush cannot journal a unit twice
            pending.clear()
            pending_bytes = 0

    # staged O_DIRECT output writes where the units run in this process (their bytes then feed the hasher)
    stage = direct_write_enabled() and (workers <= 1 or pool_kind(plan) == "threads")
    ok = False
    try:
        if workers <= 1:
            if threads is not None:
                import torch
                torch.set_num_threads(threads)
            for u in todo:
                finished(run_unit(u, part, plan.options, device, requested, stage))
                outputs.kill_point("unit")
        else:
            _run_pool(todo, part, plan, workers, threads or 1, finished, device, requested, stage)
        flush()
        flusher.close()                    # every unit fsynced and journaled
        _write_input_scales(plan, part)
        shas = hasher.digests()
        ok = True
    except KeyboardInterrupt:
        flush()           # journal what is finished (fsynced first): the rerun resumes after it
        flusher.close()
        raise
    finally:
        bar.close()
        if not ok:
            flusher.close(raise_error=False)
            hasher.close()
    return _finish(plan, out, part, stats, len(done), log, extra_files or {}, shas)


class _Flusher:
    """fsync-then-journal off the main loop (which keeps feeding the workers): batches of finished units are
    fsynced (their shards) and only then appended to the journal, in submission order, by one thread."""

    def __init__(self, part: Path, plan: Plan, journal: Journal) -> None:
        import queue
        import threading
        self.plan, self.journal = plan, journal
        self.fds = {name: os.open(part / name, os.O_RDONLY) for name in plan.shards}
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="v4c-journal", daemon=True)
        self.thread.start()
        self.closed = False

    def _run(self) -> None:
        while True:
            batch = self.q.get()
            if batch is None:
                return
            if self.error is not None:
                continue
            try:
                for name in sorted({self.plan.units[r.index].shard for r in batch}):
                    os.fsync(self.fds[name])
                self.journal.append(batch)
            except BaseException as e:      # re-raised by close(): the journal never lists an unsynced unit
                self.error = e

    def submit(self, batch: list[UnitResult]) -> None:
        self.q.put(batch)

    def close(self, raise_error: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self.q.put(None)
            self.thread.join()
            for fd in self.fds.values():
                os.close(fd)
        if raise_error and self.error is not None:
            raise self.error


def _write_input_scales(plan: Plan, part: Path) -> None:
    """W4A4: every NVFP4 linear's static input scale (``Part.INPUT_SCALE`` entries) from the calibrated activation
    amax (fused groups share one: ``v4convert.calib.activations``), in the container's form (c-t 448*6/amax, ModelOpt
    amax/(6*448): ``formats.nvfp4.nvfp4_global_scale``). A few bytes per linear; rewritten on a resumed run (same
    bytes), made durable by the finish's fsync."""
    import torch

    from v4convert.formats.nvfp4 import NVFP4Convention, nvfp4_global_scale
    ents = [(u, t, e) for u in plan.units for t in u.tensors for e in t.out if e.part is Part.INPUT_SCALE]
    if not ents:
        return
    amax = plan.options.calib.input_amax(sorted({t.name for _, t, _ in ents}))
    conv = NVFP4Convention.MODELOPT if plan.options.container is Container.MODELOPT else \
        NVFP4Convention.COMPRESSED_TENSORS
    writers: dict[str, Writer] = {}
    try:
        for u, t, e in ents:
            w = writers.setdefault(u.shard, Writer(part / u.shard))
            g = nvfp4_global_scale(torch.tensor(amax[t.name], dtype=torch.float32), conv)
            w.write(u.offsets[e.name], g.reshape(1).contiguous(), e.name)     # F32 [1] or scalar: same 4 bytes
    finally:
        for w in writers.values():
            w.close()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Lean workers: a fork server imports ``v4convert.quant.workers`` (torch + codecs) once, and every worker
    is forked from it. With spawn each worker re-imported torch and the whole CLI. A forked worker still
    runs the ``__main__`` script (``bin/v4convert``: one ``from v4convert.cli import main``), so the
    server preloads ``v4convert.cli`` too when we were started from it: that import is then free.
    Falls back to spawn where there is no fork server (Windows)."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload([run_unit.__module__] + (["v4convert.cli"] if "v4convert.cli" in sys.modules else []))
    return ctx


def pool_kind(plan: Plan) -> str:
    """``threads`` for data-free runs: every unit's heavy work (O_DIRECT reads, the native kernel, torch codec ops,
    pwrite) runs without the GIL, so threads overlap one unit's disk wait with another's compute at one process's
    RSS; ``processes`` for calibrated runs (GPTQ/AWQ loops hold the GIL). ``V4C_POOL`` overrides."""
    kind = os.environ.get("V4C_POOL") or ("processes" if plan.options.calib is not None else "threads")
    if kind not in ("threads", "processes"):
        raise QuantizeError(f"V4C_POOL={kind!r}: choose threads or processes")
    return kind


def _run_pool(todo: list[Unit], part: Path, plan: Plan, workers: int, threads: int, finished, device: str,
              kernel, stage: bool = False) -> None:
    threaded = pool_kind(plan) == "threads"
    if threaded:
        # 2 * workers unit threads, at most ``workers`` of them in a kernel (compute slots): one unit's reads and
        # writes overlap another's encode without oversubscribing the cores (``threads`` pthreads per kernel call)
        pool = cf.ThreadPoolExecutor(max_workers=2 * workers, thread_name_prefix="v4c-unit", initializer=init_thread,
                                     initargs=(threads,))
        set_compute_slots(workers)
    else:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(), initializer=init_worker,
                                      initargs=(threads,))
    with pool:
        it = iter(todo)
        inflight: set[cf.Future] = set()
        try:
            while True:
                while len(inflight) < 2 * workers:
                    u = next(it, None)
                    if u is None:
                        break
                    inflight.add(pool.submit(run_unit, u, part, plan.options, device, kernel, stage))
                if not inflight:
                    break
                ready, inflight = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for f in ready:
                    finished(f.result())
                    outputs.kill_point("unit")
        except BaseException:
            for f in inflight:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            if threaded:
                set_compute_slots(None)


# ------------------------------------------------------------------------------------ finish
def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def output_config(plan: Plan) -> tuple[dict, dict | None]:
    """(updated config.json, hf_quant_config.json body or None).

    Raises ContainerError when a fused module of the serving engine would mix storage kinds (checked at
    plan time too). Adds DeepSeek's release routing keys when the source config lacks them (transformers 5
    drops them; vLLM needs them) with the values our runtime assumes for the family.
    """
    cfg = json.loads(json.dumps(plan.config))
    for k, v in RELEASE_ROUTING[plan.family].items():
        cfg.setdefault(k, v)
    linears = [t for t in plan.tensors() if t.role.is_linear and len(t.shape) == 2]
    all_mod = [_module(t.name) for t in linears]
    kinds: dict[OutKind, list[str]] = {OutKind.NVFP4: [], OutKind.MXFP4: [], OutKind.FP8_BLOCK: []}
    plain: list[str] = []
    for t in linears:
        if t.action in (Action.TO_NVFP4, Action.MXFP4_TO_NVFP4):
            kinds[OutKind.NVFP4].append(_module(t.name))
        elif t.action in (Action.TO_MXFP4, Action.MXFP4_REWRAP) or (t.action is Action.COPY and t.src_storage.value == "mxfp4"):
            kinds[OutKind.MXFP4].append(_module(t.name))
        elif t.action is Action.FP8_REWRAP or (t.action is Action.COPY and t.src_storage.value == "fp8_block"):
            kinds[OutKind.FP8_BLOCK].append(_module(t.name))
        else:
            plain.append(_module(t.name))
    c = plan.options.container
    activations = plan.options.calib.activations if plan.options.calib is not None else "w4a16"
    hf = None
    if c in (Container.COMPRESSED_TENSORS, Container.MODELOPT):
        check_fused({m: k for k, ms in kinds.items() for m in ms} | {m: OutKind.PLAIN for m in plain})
    if c is Container.COMPRESSED_TENSORS:
        if any(kinds.values()):
            cfg["quantization_config"] = compressed_tensors_config(kinds, plain, all_mod, __version__,
                                                                   activations=activations)
        else:
            cfg.pop("quantization_config", None)
    elif c is Container.MODELOPT:
        hf, qc = modelopt_configs(plain, all_mod, __version__, activations=activations)
        cfg["quantization_config"] = qc
    else:   # DeepSeek native: the source's fp8 block config stays; experts are FP4
        if kinds[OutKind.MXFP4]:
            cfg["expert_dtype"] = "fp4"
    return cfg, hf


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in _NOT_COPIED and not p.name.endswith(".safetensors") \
                and not p.name.startswith("."):
            shutil.copyfile(checkpoint_file(src, p.name), dst / p.name)   # never a link out of the source
            copied.append(p.name)
    return copied


def _finish(plan: Plan, out: Path, part: Path, stats: dict[int, list[int]], resumed: int, log,
            extra_files: dict[str, str | bytes], shas: dict[str, str]) -> RunResult:
    """The finish protocol. Steps 1-4 rewrite files inside ``OUT.partial`` (a rerun repeats them, the
    journal still says every unit is done); step 5 marks it complete; after step 6 a rerun finds the
    complete marker and only swaps; ``outputs.swap_in`` keeps the old or the new output under OUT at
    every instant. Each step ends in a ``kill_point`` (tests kill there and resume)."""
    weight_map = {e.name: u.shard for u in plan.units for t in u.tensors for e in t.out}
    blocks = sum(v[0] for v in stats.values())
    inexact = sum(v[1] for v in stats.values())
    total = sum(size - len(plan.shard_headers[n]) for n, size in plan.shards.items())
    index = {"metadata": {"total_size": total, "sha256": shas,
                          "v4convert": {"version": __version__, "format": plan.options.container.value,
                                        **plan.rules, "scale_method": plan.options.scale_method.value,
                                        "mx_rule": plan.options.mx_rule.value,
                                        "mxfp4_repacked_blocks": blocks, "mxfp4_repack_inexact_blocks": inexact,
                                        **plan.metadata,
                                        **({"calibration": {k: v for k, v in asdict(plan.options.calib).items()
                                                            if k != "stats"}} if plan.options.calib else {})}},
             "weight_map": dict(sorted(weight_map.items()))}
    (part / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    outputs.kill_point("finish:index")                                            # 1
    cfg, hf = output_config(plan)
    (part / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if hf is not None:
        (part / "hf_quant_config.json").write_text(json.dumps(hf, indent=2) + "\n")
    outputs.kill_point("finish:config")                                           # 2
    _copy_side_files(plan.source, part)
    for name, data in extra_files.items():       # e.g. the calibration report
        (part / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    outputs.kill_point("finish:side-files")                                       # 3
    for p in part.iterdir():
        if p.is_file():
            _fsync_path(p)
    outputs.kill_point("finish:fsync")                                            # 4
    outputs.write_marker(part, "quantize", "complete", fingerprint=plan.fingerprint)
    _fsync_path(part / outputs.MARKER)
    outputs.kill_point("finish:marker")                                           # 5
    shutil.rmtree(part / JOURNAL_DIR)
    outputs.kill_point("finish:journal-removed")                                  # 6
    if blocks:
        log(f"mxfp4 -> nvfp4 re-pack: {inexact} of {blocks} 16-blocks not exactly representable")
    r = _swap(plan, out, part)
    r.resumed_units = resumed
    return r


def _swap(plan: Plan, out: Path, part: Path) -> RunResult:
    """Step 7: swap the complete ``part`` in at ``out``; the counts come from its index."""
    meta = json.loads((part / INDEX_NAME).read_text())["metadata"]["v4convert"]
    outputs.swap_in(part, out)
    return RunResult(out, len(plan.units), len(plan.units), plan.bytes_in, plan.bytes_out,
                     meta["mxfp4_repacked_blocks"], meta["mxfp4_repack_inexact_blocks"])
