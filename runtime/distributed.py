"""Tensor- and expert-parallel execution on ``torch.distributed`` (gloo on CPU, NCCL on CUDA), under ``torchrun``.

``load(path, ...)`` on every rank builds that rank's part of the model:
- from a sharded layout (``export --sharded``): only the rank's own data file is read (O_DIRECT where the
  filesystem allows it: measured faster than buffered reads, see ``bench/sharded_load.py``);
- from an unsharded checkpoint with ``tp``/``ep``: each rank reads only its slices (and the stored blocks
  that cover them) through the mmapped reader (``read_part``).
Which rank holds what is the one table of ``v4convert.families.sharding``. The family builders build the full model
on the meta device; ``_Sharder`` then resizes each meta parameter to the rank's local shape, swaps the
embedding for a vocab-parallel one, drops the routed experts of other ranks and adds the collectives:

- attention: heads split (``wq_b``/``q_b_proj``, ``kv_b_proj``, V4 ``wo_a`` by output groups, ``attn_sink``);
  the row-parallel output (``o_proj`` / V4 ``wo_b``) is all-reduced over the TP group;
- dense MLP (V3 layers < first_k_dense_replace): column/row split, all-reduce over the TP group;
- MoE: each rank computes its experts' partial outputs (+ the shared experts' partial on TP group 0) and the
  layer output is one all-reduce over the world. Chosen over all-to-all token dispatch because it is simpler
  (no token permutation, identical routing on every rank) and moves only ``[tokens, hidden]`` per layer; it was
  not benchmarked against an all-to-all implementation (there is none here);
- embedding: vocab-parallel rows, masked lookup + all-reduce; head: vocab-parallel rows + all-gather.

Every collective has the process-group timeout (``V4CONVERT_DIST_TIMEOUT`` seconds, default 300). Loading runs
under ``agree``: a bad input on any rank (manifest, world size, missing/truncated file, SHA-256) raises on every
rank with one line naming the failing rank, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from v4convert.checkpoint import Checkpoint, decode
from v4convert.errors import UserError
from v4convert.families.roles import Family
from v4convert.families.sharding import Part, World, check_world, covering, part_for, slice_stored
from v4convert.sharded_layout import Manifest, RankView, is_sharded_layout

from .common import FakeQuant, Linear, LoadOptions, RuntimeLoadError

DEFAULT_TIMEOUT_S = 300


class DistributedError(UserError):
    """A distributed run that cannot start: world size mismatch, another rank's bad input, ..."""


# ----------------------------------------------------------------------------------------------
# Process groups and collectives
# ----------------------------------------------------------------------------------------------
def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> tuple[int, int]:
    """``(rank, size)``, initialising the default process group from torchrun's environment if needed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if env_world_size() == 1:
        return 0, 1
    timeout = datetime.timedelta(seconds=float(os.environ.get("V4CONVERT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    atexit.register(shutdown)
    return dist.get_rank(), dist.get_world_size()


EXIT_BARRIER_S = 10.0     # seconds every rank waits for the others at exit before tearing its group down


def shutdown() -> None:
    """Destroy the default process group (registered at exit by ``init``). A gloo process that exits with
    its group alive can abort in interpreter teardown ("terminate called without an active exception",
    SIGABRT: gloo's worker threads outlive the interpreter; pytorch/pytorch#190489) - seen in CI. So can a rank
    that destroys its group while a peer is still talking to it (seen in CI on the quiet rank of a 2-rank
    ``run``), so gloo ranks first meet at a monitored barrier (bounded: a peer that died makes it fail fast
    or time out after ``EXIT_BARRIER_S``; teardown goes on either way)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
            except Exception:       # a peer gone or late: nothing to wait for, tear down anyway
                pass
        dist.destroy_process_group()


class Comm:
    """The collectives one rank's model uses: TP-group all-reduce/all-gather and world all-reduce."""

    def __init__(self, world: World, rank: int) -> None:
        self.world, self.rank = world, rank
        self.size = world.size
        self.tp_group = None
        if self.size > 1 and world.tp > 1:
            if world.tp == self.size:
                self.tp_group = dist.group.WORLD
            else:            # every rank must create every group, in the same order
                for ranks in world.tp_groups():
                    g = dist.new_group(ranks)
                    if rank in ranks:
                        self.tp_group = g

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_reduce_world(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_tp(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate along the last dim the TP ranks' ``x [..., sizes[r]]`` (padded to equal size for gloo)."""
        if self.tp_group is None:
            return x
        m = max(sizes)
        pad = F.pad(x, (0, m - x.shape[-1])).contiguous()
        bufs = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(bufs, pad, group=self.tp_group)
        return torch.cat([b[..., :n] for b, n in zip(bufs, sizes)], dim=-1)


def agree(size: int, fn: Callable[[], object]) -> object:
    """Run ``fn`` on every rank; if it fails on any rank, fail on every rank (no rank left in a collective).

    The failing rank re-raises its own exception (a bug keeps its traceback); the others raise one
    ``DistributedError`` line naming it."""
    err: BaseException | None = None
    out = None
    try:
        out = fn()
    except Exception as e:                      # noqa: BLE001 - reported to every rank, then re-raised
        err = e
    if size > 1:
        msgs: list = [None] * size
        dist.all_gather_object(msgs, None if err is None else f"{err}")
        if err is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                r, m = bad[0]
                raise DistributedError(f"rank {r} failed: {m}")
    if err is not None:
        raise err
    return out


# ----------------------------------------------------------------------------------------------
# A rank's view of an unsharded checkpoint
# ----------------------------------------------------------------------------------------------
def read_part(ck, name: str, part: Part) -> torch.Tensor:
    """float32 values of ``part`` of ``name`` from a ``Checkpoint``, touching only the stored blocks that
    cover it (mmapped views); used to load an unsharded checkpoint with ``--tp``. Any split works here:
    blocks cut by the split are decoded whole and trimmed."""
    info = ck.tensor_info(name)
    if part.dim is None:
        return ck.dequantize(name)
    d = part.dim
    a, b = covering(info.storage, d, part.start, part.stop, info.shape[d]) if info.storage.is_quantized \
        else (part.start, part.stop)
    cover = Part(d, a, b)
    parts = slice_stored(info.storage, ck.raw(name), cover, info.shape, name)
    sub = dataclasses.replace(info, shape=cover.shape(info.shape))
    out = decode(sub, parts).narrow(d, part.start - a, part.stop - part.start).contiguous()
    if out.numel() and out.data_ptr() == parts["weight"].data_ptr():
        out = out.clone()
    del parts
    ck.release(name)
    return out


class SlicedView:
    """``Checkpoint`` restricted to one rank's parts (``families.sharding``), read slice by slice from the mmap."""

    def __init__(self, ck: Checkpoint, world: World, rank: int) -> None:
        self.ck, self.world, self.rank = ck, world, rank
        self.root, self.config, self.arch = ck.root, ck.config, ck.arch
        self._parts: dict[str, Part] = {}
        for info in ck.infos():
            p = part_for(info.role, info.expert, info.shape, ck.arch, world, rank)
            if p is not None:
                self._parts[info.name] = p

    @property
    def family(self) -> Family:
        return self.ck.family

    def names(self) -> list[str]:
        return list(self._parts)

    def tensor_info(self, name: str):
        info = self.ck.tensor_info(name)
        return dataclasses.replace(info, shape=self._parts[name].shape(info.shape))

    def infos(self):
        return (self.tensor_info(n) for n in self._parts)

    def dequantize(self, name: str) -> torch.Tensor:
        return read_part(self.ck, name, self._parts[name])

    def raw(self, name: str):
        raise RuntimeLoadError(f"{name}: packed weights are not supported when slicing an unsharded checkpoint "
                               "(export --sharded first, or load without --packed)")

    def close(self) -> None:
        self.ck.close()


# ----------------------------------------------------------------------------------------------
# Cutting the meta model
# ----------------------------------------------------------------------------------------------
class Absent(nn.Module):
    """Stands for a routed expert (or the shared experts) held by another rank: contributes zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[lo, hi)`` of the embedding; ids outside contribute zero; summed over the TP group."""

    def __init__(self, weight: torch.Tensor, lo: int, hi: int, comm: Comm) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lo, self.hi, self.comm = lo, hi, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.lo) & (ids < self.hi)
        out = F.embedding((ids - self.lo).clamp(0, self.hi - self.lo - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.comm.all_reduce_tp(out)


def _reduce_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    return lambda module, args, out: fn(out)


class _Sharder:
    """Applied by the family builder to the meta model (``LoadOptions.shard``) before any tensor is filled."""

    def __init__(self, view, rename: Callable[[str], str], comm: Comm) -> None:
        self.view, self.rename, self.comm = view, rename, comm

    def __call__(self, model: nn.Module) -> None:
        held = {self.rename(n): n for n in self.view.names()}
        ar, w = self.view.arch, self.comm.world
        # 1. resize every parameter/buffer the rank holds to its local shape; drop experts it does not hold
        for mod_name, mod in list(model.named_modules()):
            for leaf, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                full = f"{mod_name}.{leaf}" if mod_name else leaf
                if t is None or full not in held:
                    continue
                shape = tuple(self.view.tensor_info(held[full]).shape)
                if tuple(t.shape) != shape:
                    new = torch.empty(shape, dtype=t.dtype, device="meta")
                    if leaf in mod._parameters:
                        mod._parameters[leaf] = nn.Parameter(new, requires_grad=False)
                    else:
                        mod._buffers[leaf] = new
            if isinstance(mod, Linear) and mod.weight is not None:
                mod.out_features, mod.in_features = mod.weight.shape
        # modules holding at least one of the rank's tensors (every dotted prefix of a held name)
        owners = {n[:i] for n in held for i in range(len(n)) if n[i] == "."}
        for mod_name, mod in list(model.named_modules()):
            if isinstance(mod, nn.ModuleList) and mod_name.endswith(".experts"):
                for i in range(len(mod)):
                    if f"{mod_name}.{i}" not in owners:        # another rank's routed expert
                        mod[i] = Absent()
            elif mod_name.endswith(".shared_experts") and mod_name not in owners:     # held by TP group 0 only
                parent, _, leaf = mod_name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, Absent())
        # 2. family structure: local head counts and the collectives
        tp, cm = w.tp, self.comm
        v3 = ar.family.is_v3_like
        embeds = ["model.embed_tokens"] if v3 else ["embed"]
        head = "lm_head" if v3 else "head"
        for name, mod in model.named_modules():
            if v3 and name.endswith("self_attn"):
                mod.n_heads = ar.n_heads // tp
                if tp > 1:
                    mod.o_proj.register_forward_hook(_reduce_hook(cm.all_reduce_tp))
            elif not v3 and name.endswith(".attn") and hasattr(mod, "o_groups"):
                mod.n_heads, mod.o_groups = ar.n_heads // tp, ar.o_groups // tp
                if tp > 1:
                    mod.wo_b.register_forward_hook(_reduce_hook(cm.all_reduce_tp))
            elif hasattr(mod, "experts") and hasattr(mod, "gate") and w.size > 1:        # MoE layer
                mod.register_forward_hook(_reduce_hook(cm.all_reduce_world))
            elif v3 and name.endswith(".mlp") and tp > 1:                                  # dense MLP
                mod.register_forward_hook(_reduce_hook(cm.all_reduce_tp))
        if tp > 1:
            from v4convert.families.sharding import vocab_range
            sizes = [b - a for a, b in (vocab_range(ar.vocab, tp, r) for r in range(tp))]
            lo, hi = vocab_range(ar.vocab, tp, w.tp_rank(cm.rank))
            for e in embeds:
                parent, _, leaf = e.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                old = getattr(owner, leaf)
                setattr(owner, leaf, VocabParallelEmbedding(old.weight.data, lo, hi, cm))
            model.get_submodule(head).register_forward_hook(
                _reduce_hook(lambda y: cm.all_gather_tp(y, sizes)))


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------
def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         max_seq_len: int = 4096, *, tp: int | None = None, ep: int | None = None, max_batch_size: int = 1,
         simulate_quant: bool = False, dynamic_routing=None, packed: bool = False,
         verify_checksums=True) -> nn.Module:
    """This rank's part of the model at ``path`` (a sharded layout, or any checkpoint with ``tp``/``ep``).

    Run under ``torchrun --nproc-per-node N`` (world size = max(tp, ep)); without torchrun a world of one
    rank loads everything. The model's ``forward`` is the single-process one plus the collectives; every
    rank returns the full logits. ``model.world`` / ``model.rank`` tell the layout. ``verify_checksums``: a
    layout's SHA-256 checks (``RankView``'s ``verify``: True = ``$V4CONVERT_CHECKSUMS``, default once per
    unchanged rank file; False = never; or a ``sharded_layout.Checksums``).
    """
    device = torch.device(device)
    path = Path(path)
    sharded = is_sharded_layout(path)
    n_env = env_world_size()
    # Decide the world before any collective; every rank computes the same answer from the same files.
    if sharded:
        man = Manifest.read(path)
        world = man.world
        if (tp is not None and tp != world.tp) or (ep is not None and ep != world.ep):
            raise DistributedError(f"{path}: layout is for tp={world.tp}, ep={world.ep}; --tp/--ep ask for "
                                   f"tp={tp}, ep={ep} (re-export, or omit --tp/--ep)")
    else:
        # default: every rank of the launch is a TP rank; --ep alone means pure expert parallelism
        world = World(tp if tp is not None else (1 if ep is not None else n_env), ep if ep is not None else 1)
    if world.size != n_env:
        raise DistributedError(f"{path}: needs {world.size} ranks (tp={world.tp}, ep={world.ep}) but this run has "
                               f"{n_env} (launch with torchrun --nproc-per-node {world.size} ...)")
    rank, _ = init(device)
    comm = Comm(world, rank)

    def build() -> nn.Module:
        if sharded:
            view = RankView(man, rank, verify=verify_checksums, direct=True)
        else:
            ck = Checkpoint.open(path)
            check_world(ck.arch, world)
            view = SlicedView(ck, world, rank)
        try:
            fq = FakeQuant.NONE
            if simulate_quant:
                qc = view.config.get("quantization_config") or {}
                fq = FakeQuant.FP8_BLOCK_UE8M0 if qc.get("scale_fmt") == "ue8m0" else FakeQuant.FP8_BLOCK
            from .loader import BUILDERS
            module = importlib.import_module(f".{BUILDERS[view.family]}", __package__)
            rename = getattr(module, "model_name", lambda n: n)
            opts = LoadOptions(max_batch_size=max_batch_size, fake_quant=fq, dynamic_routing=dynamic_routing,
                               packed=packed, shard=_Sharder(view, rename, comm))
            model = module.build(view, device, dtype, max_seq_len, opts)
        finally:
            view.close()
        model.world, model.rank = world, rank
        return model

    return agree(world.size, build)
