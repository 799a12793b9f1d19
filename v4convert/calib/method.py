"""``--method`` specs: a data-free base (rtn | mse | four-over-six) optionally combined with data-driven
steps (awq: activation-weighted block-scale search; gptq: error-feedback rounding), e.g. ``gptq``,
``awq+gptq``, ``gptq+four-over-six``. ``quantize_weight`` applies one to a single ``[N, K]`` weight.

Order inside a combination is fixed: base scales -> awq's scale search (if any) -> gptq rounding (if any) on
those scales. A linear without statistics (or an expert below ``--min-expert-tokens``) gets the base alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from v4convert.errors import UserError

from . import DEFAULT_GPTQ_DAMP
from v4convert.formats.mxfp4 import MXFP4Tensor, MXScaleRule
from v4convert.formats.nvfp4 import NVFP4Convention, NVFP4Tensor, ScaleMethod

from v4convert.formats.fp4_grid import FP4Codec, rtn_grid

DATA_FREE = {m.value: m for m in ScaleMethod}
DATA_STEPS = ("awq", "gptq")


class MethodError(UserError):
    """A ``--method`` spec that cannot be built."""


@dataclass(frozen=True)
class MethodSpec:
    base: ScaleMethod = ScaleMethod.RTN
    awq: bool = False
    gptq: bool = False

    @property
    def needs_data(self) -> bool:
        return self.awq or self.gptq

    @property
    def label(self) -> str:
        parts = [s for s, on in (("awq", self.awq), ("gptq", self.gptq)) if on]
        if self.base is not ScaleMethod.RTN or not parts:
            parts.append(self.base.value)
        return "+".join(parts)

    @staticmethod
    def parse(text: str) -> MethodSpec:
        toks = [t.strip().lower() for t in text.split("+") if t.strip()]
        if not toks:
            raise MethodError("--method: empty spec")
        bases = [t for t in toks if t in DATA_FREE]
        bad = [t for t in toks if t not in DATA_FREE and t not in DATA_STEPS]
        if bad:
            raise MethodError(f"--method {text!r}: unknown part(s) {', '.join(bad)}; use "
                              f"{'|'.join(DATA_STEPS + tuple(DATA_FREE))} joined with '+'")
        if len(bases) > 1 or len(set(toks)) != len(toks):
            raise MethodError(f"--method {text!r}: at most one of {', '.join(DATA_FREE)}, each part once")
        return MethodSpec(DATA_FREE[bases[0]] if bases else ScaleMethod.RTN, "awq" in toks, "gptq" in toks)




@dataclass(frozen=True)
class GPTQSettings:
    damp: float = DEFAULT_GPTQ_DAMP
    act_order: bool = False
    scales_during: bool = False
    scales_search: bool = False      # --gptq-scales search (ScalesAt.SEARCH)
    refine: int = 0                  # coordinate-descent sweeps after GPTQ (same scales)


def quantize_weight(spec: MethodSpec, codec: FP4Codec, w: torch.Tensor, h: torch.Tensor | None, *,
                    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
                    global_amax: torch.Tensor | None = None, mx_rule: MXScaleRule = MXScaleRule.OCP_FLOOR,
                    gptq: GPTQSettings = GPTQSettings(), name: str = "tensor",
                    c: torch.Tensor | None = None) -> NVFP4Tensor | MXFP4Tensor:
    """``w [N, K]`` float -> the codec's tensor; ``h [K, K]`` (``X^T X / n``) or None = data-free base only.
    ``c [K, K]`` (``X^T X~ / n``, original x quantized-model inputs; ``--gptq-target original``): a method with gptq
    first moves ``w`` to ``gptq.original_target`` (then every step -- base scales, awq, gptq -- works on it; NVFP4:
    clipped to the original ``global_amax``, which the fused partners share)."""
    from v4convert.quant.methods.awq import awq_grid
    from v4convert.quant.methods.gptq import ScalesAt, gptq_quantize, original_target

    # MXFP4: mse = the per-block exponent search (formats.mxfp4); four-over-six has no MXFP4 form -> rtn
    base = spec.base if codec is FP4Codec.NVFP4 or spec.base is ScaleMethod.MSE else ScaleMethod.RTN
    kw = {"convention": convention, "global_amax": global_amax, "mx_rule": mx_rule, "name": name}
    if h is None or not spec.needs_data:
        grid, codes = rtn_grid(w, codec, method=base, **kw)
        return grid.tensor(codes)
    if c is not None and spec.gptq:
        w = original_target(w, h, c, gptq.damp)
        if global_amax is not None:    # NVFP4: the fused partners' global scale stays the original weights' one
            g = global_amax.to(w.dtype)
            w = torch.minimum(torch.maximum(w, -g), g)
    grid = None
    if spec.awq:
        grid, codes = awq_grid(w, torch.diagonal(h).clone(), codec, base=base, **kw)
        if not spec.gptq:
            return grid.tensor(codes)
    if gptq.scales_search:      # each block's scale searched on the updated weights (awq's candidates and d)
        scales = ScalesAt.SEARCH
    elif gptq.scales_during and grid is None:
        scales = ScalesAt.DURING
    else:
        scales = ScalesAt.BEFORE
    return gptq_quantize(w, h, codec, base=base, damp=gptq.damp, act_order=gptq.act_order, scales=scales,
                         grid=grid, refine=gptq.refine, **kw)
