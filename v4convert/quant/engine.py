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
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from v4convert.formats.containers import Container, OutKind, compressed_tensors_config, modelopt_configs

from .. import __version__
from .plan import Action, Plan, QuantizeError, Unit
from .workers import DiskFullError, UnitResult, choose_kernel, init_worker, run_unit

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
    return out.with_name(out.name + ".partial")


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
def _prepare(plan: Plan, out: Path, overwrite: bool) -> tuple[Path, Journal, dict[int, list[int]]]:
    """Create or validate ``OUT.partial``; return it, its journal and the already-done units."""
    part = partial_dir(out)
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: output directory exists; pass --overwrite to replace it")
    j = Journal(part)
    if part.exists():
        fp = j.fingerprint()
        if fp != plan.fingerprint:
            if not overwrite:
                raise OutputExistsError(
                    f"{part}: holds an unfinished run of a different plan (other source, options or version); "
                    f"pass --overwrite to discard it")
            shutil.rmtree(part)
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
        j.start(plan.fingerprint)
        for name, size in plan.shards.items():
            _create_shard(part / name, plan.shard_headers[name], size)
    return part, j, done


def _create_shard(path: Path, header: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)      # sparse; tensors are written at their offsets


def _check_space(part: Path, plan: Plan, done: dict[int, list[int]]) -> None:
    need = sum(u.bytes_out for u in plan.units if u.index not in done)
    free = shutil.disk_usage(part).free
    if need > free:
        raise DiskFullError(f"{part}: needs {need / 1e9:.2f} GB more for the output but only {free / 1e9:.2f} GB "
                            f"is free on that filesystem")


# ------------------------------------------------------------------------------------ run
def execute(plan: Plan, out: Path, *, workers: int = 1, overwrite: bool = False, progress: bool = False,
            sync_bytes: int = DEFAULT_SYNC_BYTES, device: str = "cpu", kernel=None, log=None) -> RunResult:
    """Run ``plan`` into ``out``. ``workers == 1`` runs in this process (all torch threads);
    more uses a process pool with one thread each and at most ``2 * workers`` units in flight.
    ``kernel`` (``formats.native.Kernel`` or None = default) picks the FP8 -> NVFP4 hot path; either
    kernel writes the same bytes, so it is not part of the plan."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    kernel, why = choose_kernel(kernel, device.split(":")[0])
    log(f"hot path: {why}")
    out = Path(out)
    part, journal, done = _prepare(plan, out, overwrite)
    _check_space(part, plan, done)
    todo = [u for u in plan.units if u.index not in done]
    if done:
        log(f"resuming: {len(done)} of {len(plan.units)} units already done in {part}")
    from tqdm import tqdm
    bar = tqdm(total=plan.bytes_in, initial=sum(u.bytes_in for u in plan.units if u.index in done), unit="B",
               unit_scale=True, unit_divisor=1000, desc="quantize", disable=not progress, smoothing=0.1)
    fds = {name: os.open(part / name, os.O_RDONLY) for name in plan.shards}
    stats = {k: list(v) for k, v in done.items()}
    pending: list[UnitResult] = []
    pending_bytes = 0

    def finished(r: UnitResult) -> None:
        nonlocal pending_bytes
        pending.append(r)
        stats[r.index] = [r.repack_blocks, r.repack_inexact]
        pending_bytes += plan.units[r.index].bytes_out
        bar.update(r.bytes_in)
        if pending_bytes >= sync_bytes:
            flush()

    def flush() -> None:
        nonlocal pending_bytes
        if not pending:
            return
        for name in {plan.units[r.index].shard for r in pending}:
            os.fsync(fds[name])
        journal.append(pending)
        pending.clear()
        pending_bytes = 0

    try:
        if workers <= 1:
            for u in todo:
                finished(run_unit(u, part, plan.options, device, kernel))
        else:
            _run_pool(todo, part, plan, workers, finished, device, kernel)
        flush()
    finally:
        bar.close()
        for fd in fds.values():
            os.close(fd)
    return _finish(plan, out, part, stats, len(done), log)


def _run_pool(todo: list[Unit], part: Path, plan: Plan, workers: int, finished, device: str, kernel) -> None:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                                initargs=(1,)) as pool:
        it = iter(todo)
        inflight: set[cf.Future] = set()
        try:
            while True:
                while len(inflight) < 2 * workers:
                    u = next(it, None)
                    if u is None:
                        break
                    inflight.add(pool.submit(run_unit, u, part, plan.options, device, kernel))
                if not inflight:
                    break
                ready, inflight = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
                for f in ready:
                    finished(f.result())
        except BaseException:
            for f in inflight:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ------------------------------------------------------------------------------------ finish
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(64 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def output_config(plan: Plan) -> tuple[dict, dict | None]:
    """(updated config.json, hf_quant_config.json body or None)."""
    cfg = json.loads(json.dumps(plan.config))
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
    hf = None
    if c is Container.COMPRESSED_TENSORS:
        if any(kinds.values()):
            cfg["quantization_config"] = compressed_tensors_config(kinds, plain, all_mod)
        else:
            cfg.pop("quantization_config", None)
    elif c is Container.MODELOPT:
        hf, qc = modelopt_configs(plain, all_mod, __version__)
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
            shutil.copyfile(p, dst / p.name)
            copied.append(p.name)
    return copied


def _finish(plan: Plan, out: Path, part: Path, stats: dict[int, list[int]], resumed: int, log) -> RunResult:
    shas = {name: _sha256(part / name) for name in sorted(plan.shards)}
    weight_map = {e.name: u.shard for u in plan.units for t in u.tensors for e in t.out}
    blocks = sum(v[0] for v in stats.values())
    inexact = sum(v[1] for v in stats.values())
    total = sum(size - len(plan.shard_headers[n]) for n, size in plan.shards.items())
    index = {"metadata": {"total_size": total, "sha256": shas,
                          "v4convert": {"version": __version__, "format": plan.options.container.value,
                                        **plan.rules, "scale_method": plan.options.scale_method.value,
                                        "mx_rule": plan.options.mx_rule.value,
                                        "mxfp4_repacked_blocks": blocks, "mxfp4_repack_inexact_blocks": inexact}},
             "weight_map": dict(sorted(weight_map.items()))}
    (part / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    cfg, hf = output_config(plan)
    (part / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if hf is not None:
        (part / "hf_quant_config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _copy_side_files(plan.source, part)
    shutil.rmtree(part / JOURNAL_DIR)
    for p in part.iterdir():
        _fsync_path(p)
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    if blocks:
        log(f"mxfp4 -> nvfp4 re-pack: {inexact} of {blocks} 16-blocks not exactly representable")
    return RunResult(out, resumed, len(plan.units),
                     plan.bytes_in, plan.bytes_out, blocks, inexact)
