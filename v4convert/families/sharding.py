"""Which part of every tensor each rank holds: the one table of tensor- and expert-parallel splits.

Used by the sharded-layout writer (``v4convert.export.sharded``), its reader, and the distributed runtime
(``v4convert.runtime.distributed``, which also reads a part straight from an unsharded checkpoint), so a layout on disk and a model cut in memory always agree.

World: ``size = max(tp, ep)`` ranks; the smaller of ``tp``/``ep`` must divide the larger.
- attention heads, the dense MLP, the shared experts, embed and head are split over ``tp`` ranks (ranks
  ``g*tp .. g*tp+tp-1`` form TP group ``g``; the ``size/tp`` groups hold the same slices);
- routed experts are partitioned over ``ep`` groups of ``size/ep`` consecutive ranks (expert ``e`` lives in
  group ``e // (E/ep)``) and each expert is split column/row over the ranks of its group;
- shared experts are held only by TP group 0 (so one sum over the world adds them exactly once).
DeepSeek's own ``convert.py --model-parallel N`` is ``tp = ep = N`` (heads and experts over the same ranks).

Splits follow DeepSeek's ``convert.py``: column-parallel (dim 0) ``wq_b``/``wkv_b``/``w1``/``w3``/embed/head,
row-parallel (dim 1) ``wo``/``w2``; norms, router and everything else replicated. V4 adds the grouped output
projection (``wo_a`` dim 0 by output groups, ``wo_b`` dim 1) and the per-head ``attn_sink`` (dim 0).
The vocabulary may split unevenly (rank ``i`` holds rows ``i*V//tp .. (i+1)*V//tp``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from v4convert.errors import UserError
from v4convert.formats.blocks import FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK

from .layout import Arch
from .roles import Family, Role, Storage


class ShardPlanError(UserError):
    """A ``--tp``/``--ep`` the model's shapes (or its stored blocks) cannot be split into."""


class Split(enum.Enum):
    """How one tensor is cut across the ranks of its group."""
    REPLICATE = "replicate"
    COLUMN = "column"          # dim 0 (output features / heads), even
    ROW = "row"                # dim 1 (input features), even
    VOCAB = "vocab"            # dim 0, balanced (may be uneven)


class Scope(enum.Enum):
    """Which ranks hold a tensor at all."""
    ALL = "all"                # every rank (split over its TP group)
    EXPERT = "expert"          # the ranks of the expert's EP group (split over that group)
    SHARED = "shared"          # TP group 0 only


# Role -> split (everything not listed is replicated). One table for V3, V3.2 and V4.
SPLITS: dict[Role, Split] = {
    Role.EMBED: Split.VOCAB, Role.HEAD: Split.VOCAB, Role.MTP_EMBED: Split.VOCAB, Role.MTP_HEAD: Split.VOCAB,
    Role.ATTN_Q_B: Split.COLUMN, Role.ATTN_KV_B: Split.COLUMN, Role.ATTN_O: Split.ROW,
    Role.ATTN_O_A: Split.COLUMN, Role.ATTN_O_B: Split.ROW, Role.ATTN_SINK: Split.COLUMN,
    Role.DENSE_GATE: Split.COLUMN, Role.DENSE_UP: Split.COLUMN, Role.DENSE_DOWN: Split.ROW,
    Role.EXPERT_GATE: Split.COLUMN, Role.EXPERT_UP: Split.COLUMN, Role.EXPERT_DOWN: Split.ROW,
    Role.SHARED_GATE: Split.COLUMN, Role.SHARED_UP: Split.COLUMN, Role.SHARED_DOWN: Split.ROW,
}
SCOPES: dict[Role, Scope] = {
    Role.EXPERT_GATE: Scope.EXPERT, Role.EXPERT_UP: Scope.EXPERT, Role.EXPERT_DOWN: Scope.EXPERT,
    Role.SHARED_GATE: Scope.SHARED, Role.SHARED_UP: Scope.SHARED, Role.SHARED_DOWN: Scope.SHARED,
}
SPLIT_DIM = {Split.COLUMN: 0, Split.VOCAB: 0, Split.ROW: 1}

# Stored block along (dim 0, dim 1) of each quantized storage: a split must not cut one.
BLOCKS: dict[Storage, tuple[int, int]] = {
    Storage.FP8_BLOCK: (FP8_BLOCK, FP8_BLOCK), Storage.MXFP4: (1, MXFP4_BLOCK),
    Storage.NVFP4_CT: (1, NVFP4_BLOCK), Storage.NVFP4_MODELOPT: (1, NVFP4_BLOCK),
}


@dataclass(frozen=True)
class World:
    """``tp`` x ``ep`` layout over ``size = max(tp, ep)`` ranks (see module docstring)."""
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ShardPlanError(f"--tp and --ep must be >= 1 (got tp={self.tp}, ep={self.ep})")
        if max(self.tp, self.ep) % min(self.tp, self.ep):
            raise ShardPlanError(f"--tp {self.tp} and --ep {self.ep}: the smaller must divide the larger "
                                 "(world size = the larger)")

    @property
    def size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def expert_tp(self) -> int:
        """Ranks each routed expert is split over (``size / ep``)."""
        return self.size // self.ep

    def tp_group(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def ep_group(self, rank: int) -> int:
        return rank // self.expert_tp

    def tp_groups(self) -> list[list[int]]:
        return [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.size // self.tp)]


@dataclass(frozen=True)
class Part:
    """The slice ``[start, stop)`` along ``dim`` of a tensor held by one rank (``dim`` None: the whole)."""
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        s = list(full)
        s[self.dim] = self.stop - self.start
        return tuple(s)


WHOLE = Part()


def vocab_range(vocab: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Rows of the embedding/head held by ``tp_rank`` (balanced; the first ``vocab % tp`` get one fewer)."""
    return tp_rank * vocab // tp, (tp_rank + 1) * vocab // tp


def check_world(arch: Arch, world: World) -> None:
    """Refuse a world the model's shapes cannot be split into (heads, groups, widths, experts)."""
    tp, etp = world.tp, world.expert_tp
    need = [("num_attention_heads", arch.n_heads, tp), ("n_routed_experts", arch.n_experts, world.ep),
            ("moe_intermediate_size", arch.moe_inter, etp)]
    if arch.n_shared:
        need.append(("moe_intermediate_size * n_shared_experts", arch.moe_inter * arch.n_shared, tp))
    if arch.family.is_v3_like and arch.first_dense:
        need.append(("intermediate_size", arch.inter, tp))
    if arch.family is Family.V4:
        need.append(("o_groups", arch.o_groups, tp))
    for key, n, k in need:
        if n % k:
            raise ShardPlanError(f"{key} = {n} cannot be split over {k} ranks (tp={world.tp}, ep={world.ep})")
    if arch.vocab < tp:
        raise ShardPlanError(f"vocab_size {arch.vocab} is smaller than --tp {tp}")


def part_for(role: Role, expert: int | None, shape: tuple[int, ...], arch: Arch, world: World,
             rank: int) -> Part | None:
    """The part of a tensor (``role``, logical ``shape``) that ``rank`` holds, or None if it holds none."""
    scope = SCOPES.get(role, Scope.ALL)
    split = SPLITS.get(role, Split.REPLICATE)
    if scope is Scope.EXPERT:
        per = arch.n_experts // world.ep
        if expert is None or expert // per != world.ep_group(rank):
            return None
        n, r = world.expert_tp, rank % world.expert_tp
    else:
        if scope is Scope.SHARED and world.tp_group(rank) != 0:
            return None
        n, r = world.tp, world.tp_rank(rank)
    if split is Split.REPLICATE or n == 1:
        return WHOLE
    dim = SPLIT_DIM[split]
    size = shape[dim]
    if split is Split.VOCAB:
        a, b = vocab_range(size, n, r)
        return Part(dim, a, b)
    if size % n:
        raise ShardPlanError(f"dim {dim} of size {size} ({role.value}) cannot be split over {n} ranks")
    k = size // n
    return Part(dim, r * k, (r + 1) * k)


def rank_parts(role: Role, expert: int | None, shape: tuple[int, ...], arch: Arch,
               world: World) -> dict[int, Part]:
    """``rank -> Part`` for every rank holding some of the tensor."""
    out = {}
    for r in range(world.size):
        p = part_for(role, expert, shape, arch, world, r)
        if p is not None:
            out[r] = p
    return out


# ----------------------------------------------------------------------------------------------
# Cutting stored parts (codecs stay packed)
# ----------------------------------------------------------------------------------------------
def _stored_range(storage: Storage, comp: str, dim: int, a: int, b: int) -> tuple[int, int]:
    """Range along ``dim`` of stored component ``comp`` that holds logical ``[a, b)`` (block-aligned a, b)."""
    if comp == "weight":
        if storage in (Storage.MXFP4, Storage.NVFP4_CT, Storage.NVFP4_MODELOPT) and dim == 1:
            return a // 2, b // 2                   # two E2M1 codes per byte
        return a, b
    blk = BLOCKS[storage][dim]
    return a // blk, -(-b // blk)


def covering(storage: Storage, dim: int, a: int, b: int, size: int) -> tuple[int, int]:
    """The smallest block-aligned range ``[a', b') >= [a, b)`` along ``dim`` (edge block may be partial)."""
    blk = BLOCKS.get(storage, (1, 1))[dim]
    return (a // blk) * blk, min(size, -(-b // blk) * blk)


def cuts_block(storage: Storage, dim: int, a: int, b: int, size: int) -> bool:
    return covering(storage, dim, a, b, size) != (a, b)


def slice_stored(storage: Storage, parts: dict[str, torch.Tensor], part: Part, full: tuple[int, ...],
                 where: str) -> dict[str, torch.Tensor]:
    """The stored components of ``part`` of a tensor (views; codecs stay packed).

    Raises ``ShardPlanError`` when the split cuts a stored block (a 128x128 FP8 block, a 32/16-element FP4
    block, a packed byte). Scalars (``global_scale``, ``input_scale``) are kept whole.
    """
    if part.dim is None:
        return dict(parts)
    d, a, b = part.dim, part.start, part.stop
    if storage.is_quantized and cuts_block(storage, d, a, b, full[d]):
        blk = BLOCKS[storage][d]
        raise ShardPlanError(f"{where}: splitting dim {d} (size {full[d]}) at [{a}, {b}) cuts a {blk}-element "
                             f"block of its {storage.value} storage; choose a --tp/--ep whose slices are multiples of {blk}, "
                             "or shard a checkpoint stored in another codec")
    if not storage.is_quantized:
        return {k: v.narrow(d, a, b - a) for k, v in parts.items()}
    out = {}
    for comp, t in parts.items():
        if t.dim() < 2:
            out[comp] = t
            continue
        lo, hi = _stored_range(storage, comp, d, a, b)
        out[comp] = t.narrow(d, lo, hi - lo)
    return out
