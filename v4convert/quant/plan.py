"""The quantize plan: what happens to every tensor, computed from the index before any work.

``make_plan(ckpt, options)`` reads only headers. For each logical tensor it decides an
``Action`` (from the recipe and the stored codec), the output entries (names, dtypes, shapes, in the
container's convention), bytes in and out; groups fused partners (gate/up, q_a/kv_a) into one work
``Unit`` so they can share one NVFP4 global scale; and assigns units to ~5 GB output shards with
exact byte offsets. The plan is deterministic, so a restarted run recomputes the same plan and its
fingerprint tells whether a ``.partial`` directory belongs to it. ``v4convert.quant.engine`` executes it.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from v4convert.formats.containers import Container, ContainerError, Entry, OutKind, Part, entries
from v4convert.formats.mxfp4 import MXScaleRule
from v4convert.formats.nvfp4 import ScaleMethod
from v4convert.formats.safetensors_io import ST_DTYPES, TensorEntry, header_bytes
from v4convert.formats.sharding import split_in_order

from .. import __version__
from ..checkpoint import Checkpoint, TensorInfo
from .recipes import Codec, RecipeError, RuleSet
from ..families.roles import Family, Role, Storage
from v4convert.errors import UserError



class CalibratedUnits(Protocol):
    """What the workers need of a calibration (``v4convert.calib.apply.CalibOptions``, a layer above): write one
    FP4 unit's parts with the calibrated method. Its fields are primitives (they enter the fingerprint)."""

    activations: str          # "w4a16" | "w4a4" (static NVFP4 input scales, see v4convert.calib.activations)

    def write_unit(self, unit: Unit, ts: tuple[TensorPlan, ...], w, opts: Options) -> None: ...

    def input_amax(self, names: list[str]) -> dict[str, float]: ...

DEFAULT_SHARD_BYTES = 5 * 10**9
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


class QuantizeError(UserError):
    """A quantize request that cannot be carried out; the message names the tensor or file."""


class Action(enum.Enum):
    """What a worker does with one tensor. Value = short label used in the plan summary."""
    COPY = "copy"                        # bytes verbatim (plain tensors; DeepSeek-container FP8 / MXFP4)
    FP8_REWRAP = "keep fp8 (scale->F32)"  # FP8 weight verbatim, block scale re-encoded as F32 (exact)
    FP8_TO_BF16 = "fp8 -> bf16"          # ModelOpt keeps unquantized layers in BF16 (CT too with keep_bf16)
    MXFP4_REWRAP = "keep mxfp4"          # MXFP4 codes/scales verbatim under container names
    TO_NVFP4 = "-> nvfp4"                # quantize (FP8 / BF16 source) to NVFP4
    MXFP4_TO_NVFP4 = "mxfp4 -> nvfp4 (re-pack)"
    TO_MXFP4 = "-> mxfp4"                # quantize (FP8 / BF16 source) to MXFP4


# One enum each with the codecs' (the names quantize's options have always used):
ScaleChoice = ScaleMethod      # NVFP4 block-scale choice: rtn | mse | four-over-six
MXRule = MXScaleRule           # MXFP4 exponent rule: floor | round-up


@dataclass(frozen=True)
class Options:
    """Everything that changes output bytes (part of the plan fingerprint)."""
    container: Container = Container.COMPRESSED_TENSORS
    scale_method: ScaleChoice = ScaleChoice.RTN
    mx_rule: MXRule = MXRule.FLOOR
    keep_native_fp4: bool = False
    shard_bytes: int = DEFAULT_SHARD_BYTES
    allow_missing: bool = False          # write an artifact although tensors the config implies are absent
    allow_nonfinite: bool = False        # copy NaN/Inf in tensors kept as stored instead of refusing
    keep_bf16: bool = False      # kept FP8-block linears written as BF16 (compressed-tensors; ModelOpt always)
    calib: CalibratedUnits | None = None   # calibrated FP4 (v4convert.calib.apply.CalibOptions); None = data-free


@dataclass(frozen=True)
class TensorPlan:
    name: str                     # logical name
    role: Role
    action: Action
    codec: Codec
    src_storage: Storage
    src: dict[str, TensorEntry]   # component -> stored source tensor
    shape: tuple[int, ...]        # logical shape
    out: tuple[Entry, ...]        # output entries in write order

    @property
    def bytes_in(self) -> int:
        return sum(e.nbytes for e in self.src.values())

    @property
    def bytes_out(self) -> int:
        return sum(_nbytes(e) for e in self.out)


@dataclass(frozen=True)
class Unit:
    """A work item: one tensor, or fused partners that share one NVFP4 global scale."""
    index: int
    tensors: tuple[TensorPlan, ...]
    shard: str                    # output shard file name
    offsets: dict[str, int]       # output entry name -> absolute byte offset in the shard

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)


@dataclass
class Plan:
    source: Path
    options: Options
    rules: dict
    units: list[Unit]
    shards: dict[str, int]                        # shard name -> file size
    shard_headers: dict[str, bytes]
    config: dict                                   # source config.json
    family: Family
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)  # extra keys for the index's v4convert metadata

    @property
    def bytes_in(self) -> int:
        return sum(u.bytes_in for u in self.units)

    @property
    def bytes_out(self) -> int:
        return sum(self.shards.values())

    def tensors(self):
        for u in self.units:
            yield from u.tensors

    def summary(self) -> str:
        by: dict[Action, list[int]] = defaultdict(lambda: [0, 0, 0])
        for t in self.tensors():
            row = by[t.action]
            row[0] += 1
            row[1] += t.bytes_in
            row[2] += t.bytes_out
        lines = [f"plan: {sum(r[0] for r in by.values())} tensors in {len(self.units)} work units -> "
                 f"{len(self.shards)} shard(s) [{self.options.container.value}, recipe {self.rules['recipe']}]",
                 f"  {'action':<26} {'tensors':>8} {'GB in':>10} {'GB out':>10}"]
        for a in Action:
            if a in by:
                n, bi, bo = by[a]
                lines.append(f"  {a.value:<26} {n:>8} {bi / 1e9:>10.3f} {bo / 1e9:>10.3f}")
        lines.append(f"  {'total':<26} {'':>8} {self.bytes_in / 1e9:>10.3f} {self.bytes_out / 1e9:>10.3f}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _nbytes(e: Entry) -> int:
    return ST_DTYPES[e.dtype][1] * math.prod(e.shape)


# Fused partners that share one NVFP4 global scale (vLLM fuses them into one GEMM). Value: key role.
_PARTNERS: dict[Role, Role] = {
    Role.EXPERT_GATE: Role.EXPERT_GATE, Role.EXPERT_UP: Role.EXPERT_GATE,
    Role.SHARED_GATE: Role.SHARED_GATE, Role.SHARED_UP: Role.SHARED_GATE,
    Role.DENSE_GATE: Role.DENSE_GATE, Role.DENSE_UP: Role.DENSE_GATE,
}
_V3_PARTNERS = {Role.ATTN_Q_A: Role.ATTN_Q_A, Role.ATTN_KV_A: Role.ATTN_Q_A}   # vLLM fused_qkv_a_proj


def _action(info: TensorInfo, codec: Codec, opts: Options) -> tuple[Action, OutKind]:
    st = info.storage
    c = opts.container
    if st in (Storage.NVFP4_CT, Storage.NVFP4_MODELOPT):
        raise QuantizeError(f"tensor {info.name}: the source is already NVFP4; quantize reads FP8/BF16/MXFP4 checkpoints")
    if codec is Codec.KEEP or (st is Storage.MXFP4 and opts.keep_native_fp4):
        if st is Storage.FP8_BLOCK:
            if c is Container.DEEPSEEK:
                return Action.COPY, OutKind.FP8_BLOCK
            if c is Container.MODELOPT or opts.keep_bf16:
                return Action.FP8_TO_BF16, OutKind.BF16
            return Action.FP8_REWRAP, OutKind.FP8_BLOCK
        if st is Storage.MXFP4:
            return (Action.COPY if c is Container.DEEPSEEK else Action.MXFP4_REWRAP), OutKind.MXFP4
        return Action.COPY, OutKind.PLAIN
    if codec is Codec.NVFP4:
        return (Action.MXFP4_TO_NVFP4 if st is Storage.MXFP4 else Action.TO_NVFP4), OutKind.NVFP4
    if codec is Codec.MXFP4:
        if st is Storage.MXFP4:   # already MXFP4: values kept exactly, bytes re-wrapped
            return (Action.COPY if c is Container.DEEPSEEK else Action.MXFP4_REWRAP), OutKind.MXFP4
        return Action.TO_MXFP4, OutKind.MXFP4
    raise QuantizeError(f"tensor {info.name}: no action for codec {codec}")


def w4a4(opts: Options) -> bool:
    """W4A4: every NVFP4 output linear also stores a static input scale (calibrated activation amax)."""
    return opts.calib is not None and opts.calib.activations == "w4a4"


def _tensor_plan(info: TensorInfo, codec: Codec, opts: Options) -> TensorPlan:
    action, kind = _action(info, codec, opts)
    extra = set(info.parts) - {"weight", "scale"}
    if extra:
        raise QuantizeError(f"{info.parts['weight'].path}: tensor {info.name}: unexpected stored parts {sorted(extra)}")
    src_scale = (info.parts["scale"].name, info.parts["scale"].dtype) if "scale" in info.parts else None
    try:
        if action is Action.COPY:
            # verbatim: stored names and dtypes unchanged
            out = tuple(Entry(e.name, e.dtype, e.shape, Part.WEIGHT if k == "weight" else Part.SCALE)
                        for k, e in info.parts.items())
        else:
            out = tuple(entries(opts.container, kind, info.name, info.shape,
                                plain_dtype=info.parts["weight"].dtype, src_scale=src_scale,
                                input_scale=kind is OutKind.NVFP4 and w4a4(opts)))
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    return TensorPlan(info.name, info.role, action, codec, info.storage, dict(info.parts), info.shape, out)


def make_plan(ck: Checkpoint, rules: RuleSet, opts: Options) -> Plan:
    """Decide every tensor's action and output placement from headers only."""
    if opts.keep_bf16 and opts.container is Container.DEEPSEEK:
        raise QuantizeError("--keep-bf16: the DeepSeek container keeps FP8 blocks verbatim (use it with "
                            "--format compressed-tensors; ModelOpt always keeps BF16)")
    absent = ck.check_complete(opts.allow_missing)
    infos = sorted(ck.infos(), key=lambda i: (str(i.parts["weight"].path), i.parts["weight"].start))
    plans: dict[str, TensorPlan] = {}
    for info in infos:
        try:
            codec = rules.codec_for(info)
        except RecipeError as e:
            raise QuantizeError(str(e)) from None
        plans[info.name] = _tensor_plan(info, codec, opts)
    try:
        rules.check_all_used()
    except RecipeError as e:
        raise QuantizeError(str(e)) from None
    # group fused partners (same layer/expert, both going to NVFP4)
    partner_table = dict(_PARTNERS)
    if ck.family.is_v3_like:
        partner_table.update(_V3_PARTNERS)
    groups: dict[tuple, list[str]] = {}
    order: list[tuple] = []
    for info in infos:
        t = plans[info.name]
        key_role = partner_table.get(t.role)
        nv = t.action in (Action.TO_NVFP4, Action.MXFP4_TO_NVFP4)
        key = (key_role, info.layer, info.expert, t.action) if key_role and nv else ("single", info.name)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(info.name)

    # shard assignment: fill shards in unit order up to the shard size
    unit_lists: list[list[TensorPlan]] = [[plans[n] for n in groups[k]] for k in order]
    shard_of = split_in_order([sum(t.bytes_out for t in ul) for ul in unit_lists], opts.shard_bytes)
    n_shards = (shard_of[-1] + 1) if shard_of else 1
    names = [SHARD_NAME.format(i + 1, n_shards) for i in range(n_shards)]
    meta = {"format": "pt"}
    per_shard: dict[int, list[int]] = defaultdict(list)
    for ui, s in enumerate(shard_of):
        per_shard[s].append(ui)
    units: list[Unit | None] = [None] * len(unit_lists)
    shards: dict[str, int] = {}
    headers: dict[str, bytes] = {}
    for s, uis in per_shard.items():
        ents = [(e.name, e.dtype, e.shape) for ui in uis for t in unit_lists[ui] for e in t.out]
        hdr = header_bytes(ents, meta)
        off = len(hdr)
        for ui in uis:
            offsets = {}
            for t in unit_lists[ui]:
                for e in t.out:
                    offsets[e.name] = off
                    off += _nbytes(e)
            units[ui] = Unit(ui, tuple(unit_lists[ui]), names[s], offsets)
        shards[names[s]] = off
        headers[names[s]] = hdr
    seen: dict[str, str] = {}
    for t in plans.values():
        for e in t.out:
            if e.name in seen:
                raise QuantizeError(f"tensor {t.name}: output name {e.name} collides with {seen[e.name]}")
            seen[e.name] = t.name
    plan = Plan(ck.root, opts, rules.describe(), [u for u in units if u is not None], shards, headers,
                ck.config, ck.family, metadata=absent)
    if absent.get("allowed_missing"):
        plan.notes.append(f"--allow-missing: {absent['allowed_missing']['count']} tensors the config implies "
                          f"are absent; the artifact is incomplete")
    plan.fingerprint = fingerprint(plan)
    from .engine import output_config   # the config is decided now: a container conflict stops before any work
    try:
        output_config(plan)
    except ContainerError as e:
        raise QuantizeError(str(e)) from None
    return plan


def fingerprint(plan: Plan) -> str:
    """SHA-256 over everything that determines output bytes: tool version, options, rules, and per
    tensor its source bytes' location and its output placement."""
    h = hashlib.sha256()
    opts = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(plan.options).items()}
    if opts.get("calib"):      # the statistics file's location (derived from OUT) does not change bytes
        opts["calib"] = {k: v for k, v in opts["calib"].items() if k != "stats"}
    h.update(json.dumps({"version": __version__, "options": opts, "rules": plan.rules,
                         "config": plan.config}, sort_keys=True).encode())
    for u in plan.units:
        for t in u.tensors:
            src = sorted((k, e.path.name, e.start, e.end, e.dtype) for k, e in t.src.items())
            h.update(json.dumps([u.shard, t.name, t.action.value, src,
                                 [(e.name, e.dtype, list(e.shape), u.offsets[e.name]) for e in t.out]]).encode())
    for name, hdr in sorted(plan.shard_headers.items()):
        h.update(name.encode())
        h.update(hashlib.sha256(hdr).digest())
    return h.hexdigest()
