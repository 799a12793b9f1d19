"""``load(path, ...)``: any checkpoint ``v4convert.checkpoint.Checkpoint`` opens -> a runnable model.

Dispatch is one table ``Family -> builder module``; each builder exposes
``build(ck, device, dtype, max_seq_len, opts: LoadOptions) -> nn.Module`` and fills a meta-device model
tensor by tensor (dequantized float, cast to ``dtype``), so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from v4convert.checkpoint import Checkpoint
from v4convert.families.roles import Family
from v4convert.sharded_layout import is_sharded_layout

from .common import DynamicRouting, FakeQuant, LoadOptions, RuntimeLoadError, packed_linears

# Family -> module (inside v4convert.runtime) whose ``build`` makes the model. Imported lazily so a family's
# code is only loaded when used.
BUILDERS: dict[Family, str] = {
    Family.V3: "deepseek_v3",
    Family.V32: "deepseek_v3",
    Family.V4: "deepseek_v4",
}

DEFAULT_MAX_SEQ_LEN = 4096


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         max_seq_len: int = DEFAULT_MAX_SEQ_LEN, *, max_batch_size: int = 1, simulate_quant: bool = False,
         dynamic_routing: DynamicRouting | None = None, packed: bool = False, tp: int | None = None,
         ep: int | None = None, act_quant: bool = True) -> nn.Module:
    """Build the model of the checkpoint at ``path``.

    ``simulate_quant``: opt-in DeepSeek FP8 activation fake-quant on linears stored quantized (scale rounded to
    powers of two when the config says ``scale_fmt: ue8m0``). ``dynamic_routing``: opt-in variable experts per
    token. ``packed``: keep FP8/FP4 linear weights packed as stored and run them through
    ``v4convert.kernels.packed`` (Triton on CUDA, tiled on CPU) instead of dequantizing at load. Returns a module with ``model(input_ids [B,T], start_pos=0) -> float32 logits [B,T,V]``,
    ``.max_seq_len``, ``.family``. ``act_quant`` (default on): simulate the W4A4 activation quantization an
    artifact's config declares (``runtime/act_quant.py``; no-op for W4A16 / FP8 / unquantized checkpoints). ``tp``/``ep``: tensor/expert parallel (``runtime/distributed.py``; run under
    torchrun); a sharded layout directory (``export --sharded``) always loads that way.
    """
    if max_seq_len < 1 or max_batch_size < 1:
        raise RuntimeLoadError(f"max_seq_len and max_batch_size must be >= 1 (got {max_seq_len}, {max_batch_size})")
    # distributed (``tp``/``ep``, a sharded layout, or launched by torchrun): each rank builds its part
    from . import distributed
    if tp is not None or ep is not None or is_sharded_layout(path) or distributed.env_world_size() > 1:
        return distributed.load(path, device, dtype, max_seq_len, tp=tp, ep=ep, max_batch_size=max_batch_size,
                                simulate_quant=simulate_quant, dynamic_routing=dynamic_routing, packed=packed)
    ck = Checkpoint.open(path)
    try:
        ck.check_complete()      # a model with absent layers cannot run (one line: count and first names)
        fq = FakeQuant.NONE
        if simulate_quant:
            qc = ck.config.get("quantization_config") or {}
            fq = FakeQuant.FP8_BLOCK_UE8M0 if qc.get("scale_fmt") == "ue8m0" else FakeQuant.FP8_BLOCK
        opts = LoadOptions(max_batch_size=max_batch_size, fake_quant=fq, dynamic_routing=dynamic_routing,
                           packed=packed, act_quant=act_quant)
        module = importlib.import_module(f".{BUILDERS[ck.family]}", __package__)
        model = module.build(ck, torch.device(device), dtype, max_seq_len, opts)
        if packed:
            want = sum(1 for i in ck.infos() if i.storage.is_quantized and len(i.shape) == 2)
            got = packed_linears(model)
            if got != want:      # never a silent dense fallback
                raise RuntimeLoadError(f"{path}: packed=True kept {got} of {want} quantized linear weights packed "
                                       f"(the {ck.family.value} builder must pass opts.packed to fill_from_checkpoint)")
        return model
    finally:
        ck.close()
