"""Bounded-memory pieces of the statistics pass: a meta-device runtime model filled one block (or one
expert) at a time from the checkpoint, and a spill store for hidden states / recorded expert rows.

``StreamedModel`` builds the family's runtime model with the family builder's own constructor on the meta
device (the builder's ``LoadOptions.shard`` hook hands the meta model over before any tensor is filled),
allocates its caches and rope tables (small: ``[batch, seq, kv_dim]`` per layer), and then materializes
exactly the tensors asked for with ``runtime.common.materialize`` — the same dequantize + cast the loader
does (float32; the family's keep-as-stored suffixes kept), so a block computes what it would in a fully
loaded model.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from v4convert.families.roles import Family

SPILL_BYTES = 256 << 20          # RAM kept per layer for hidden states + recorded expert rows before spilling


class _MetaModel(Exception):
    """Raised from the builder's shard hook to take the meta model before it is filled."""


class Spill:
    """``keep(t)`` returns ``t`` while the bytes kept since ``new_layer()`` stay within ``limit``, else a
    copy in a memory-mapped temporary file under ``directory`` (one unlinked file per layer; its disk space
    returns when the last tensor mapping it is freed). RAM: at most ``2 * limit`` (a layer's inputs and
    outputs) plus the pages of mapped files the kernel keeps resident."""

    def __init__(self, directory: str | os.PathLike | None, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.used = 0
        self.file = None
        self.size = 0

    def new_layer(self) -> None:
        self.used = 0
        self._close()

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        if self.used + n <= self.limit:
            self.used += n
            return t
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory, prefix="v4convert-calib-")
            self.size = 0
        a = t.detach().contiguous().cpu().numpy()
        off = self.size
        self.file.seek(off)
        self.file.write(a.tobytes())
        self.file.flush()
        self.size += a.nbytes
        if a.nbytes == 0:
            return t.clone()
        m = np.memmap(self.file, dtype=a.dtype, mode="c", offset=off, shape=a.shape)
        return torch.from_numpy(m)

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self._close()


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Without it the
    per-expert float32 weights (often below glibc's mmap threshold) leave the heap fragmented by the
    long-lived hidden states between them, and RSS grows by ~half a layer's experts per layer (measured:
    +100 MiB/layer on the mid-size test model; flat with this)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _to_meta(module: nn.Module) -> None:
    """Free every parameter and persistent buffer of ``module`` (replaced by meta tensors of the same shape)."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta and k not in m._non_persistent_buffers_set:
                m._buffers[k] = torch.empty_like(b, device="meta")


class _Embed(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fn(ids)


class StreamedModel:
    """The runtime model of ``ck`` on the meta device, filled on demand (float32 on the CPU)."""

    def __init__(self, ck, *, max_seq_len: int, max_batch_size: int,
                 embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        from v4convert.runtime.common import LoadOptions
        from v4convert.runtime.loader import BUILDERS
        if embed is None:
            ck.check_complete()          # as runtime.load: a model with absent layers cannot run
        self.ck = ck
        mod = importlib.import_module(f"v4convert.runtime.{BUILDERS[ck.family]}")
        got: list[nn.Module] = []

        def grab(model: nn.Module) -> None:
            got.append(model)
            raise _MetaModel

        try:
            mod.build(ck, torch.device("cpu"), torch.float32, max_seq_len, LoadOptions(max_batch_size, shard=grab))
        except _MetaModel:
            pass
        model = got[0]
        cpu = torch.device("cpu")
        if ck.family is Family.V4:
            self.rename, self.keep = mod.model_name, mod._KEEP_F32
            model.allocate(max_batch_size, max_seq_len, torch.float32, cpu)
            self.blocks = model.layers
        else:
            self.rename, self.keep = (lambda n: n), mod.FLOAT32_PARAMS
            model.allocate(max_batch_size, max_seq_len, cpu, torch.float32)
            self.blocks = model.model.layers
        self.model = model.eval()
        n_main = model.args.arch.n_layers
        self.by_layer: dict[int, list[tuple[str, int | None]]] = {}
        self.top: list[str] = []                      # non-layer tensors (embedding, final norm, head)
        for info in ck.infos():
            if info.mtp or (info.layer is not None and info.layer >= n_main):
                continue
            if info.layer is None:
                self.top.append(info.name)
            else:
                self.by_layer.setdefault(info.layer, []).append((info.name, info.expert))
        self.main_layers = sorted(self.by_layer) if embed is not None else list(range(n_main))
        self.embed_path = next(n for n, m in model.named_modules()
                               if isinstance(m, nn.Embedding) and not n.startswith(("mtp", "layers", "model.layers")))
        if embed is not None:
            parent, _, leaf = self.embed_path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, _Embed(embed))

    def _fill(self, names) -> None:
        from v4convert.runtime.common import materialize
        for n in names:
            target = self.rename(n)
            materialize(self.model, target, self.ck.dequantize(n), None if target.endswith(self.keep) else
                        torch.float32, "cpu")
            if target.endswith("tid2eid"):          # V4 hash table: int64 expert ids (as the builder does)
                gate = self.model.get_submodule(target[: -len(".tid2eid")])
                gate.tid2eid = gate.tid2eid.long()

    def capture(self, windows: torch.Tensor, batch: int, spill) -> list[tuple]:
        """Arguments of block 0's call for each batch of ``windows [W, L]`` (hidden state first, kept via
        ``spill``; the rest — positions, rope tables, mask, token ids — is what every block receives)."""
        emb = self.model.get_submodule(self.embed_path)
        if isinstance(emb, nn.Embedding):
            self._fill([n for n in self.top if self.rename(n) == self.embed_path + ".weight"])
        got: list[tuple] = []

        def grab(mod, args):
            got.append((spill.keep(args[0]),) + tuple(args[1:]))
            raise _MetaModel

        hd = self.blocks[0].register_forward_pre_hook(grab)
        try:
            for i in range(0, windows.shape[0], batch):
                try:
                    self.model(windows[i:i + batch])
                except _MetaModel:
                    pass
        finally:
            hd.remove()
            _to_meta(emb)
        return got

    def load_layer(self, li: int, experts: bool = True) -> None:
        """Materialize block ``li`` (without its routed experts unless ``experts``)."""
        self._fill(n for n, e in self.by_layer.get(li, []) if experts or e is None)

    def load_expert(self, li: int, e: int) -> nn.Module:
        self._fill(n for n, x in self.by_layer.get(li, []) if x == e)
        blk = self.blocks[li]
        return (getattr(blk, "mlp", None) or blk.ffn).experts[e]

    def free_expert(self, li: int, e: int) -> None:
        blk = self.blocks[li]
        _to_meta((getattr(blk, "mlp", None) or blk.ffn).experts[e])
        trim_heap()

    def free_layer(self, li: int) -> None:
        _to_meta(self.blocks[li])
        trim_heap()
