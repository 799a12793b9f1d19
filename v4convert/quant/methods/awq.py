"""Activation-weighted block-scale search ("AWQ-style") for one linear on an FP4 grid.

AWQ (Lin et al., arXiv 2306.00978) protects the input channels with large activations. The containers
we write cannot carry AWQ's per-input-channel weight scaling for MoE experts (it would have to be folded into
the RMSNorm that the router and every expert share), so this method keeps the grid as the codecs define it
and spends the activation statistics on the *choice of each block's scale*: per block it tries candidate
scales and keeps the one with the lowest activation-weighted squared error

    err(block) = sum_j d_j * (w_j - q_j)^2,     d_j = mean over calibration tokens of x_j^2   (= diag H)

which is the layer-output error ``E|x (w - q)|^2`` of that block with the cross-channel terms dropped.
The data-free scale (RTN, or four-over-six's 6 with ``base=FOUR_OVER_SIX``) is the first candidate and wins
ties, so the search is never worse than it on this objective.

Candidates. NVFP4: block amax x ratio (``CLIP_RATIOS``) mapped onto 6, plus (four-over-six) onto 4, under
one global scale (448-based, or 256-based for four-over-six). MXFP4: exponents ``e + {0, -1, +1}`` around
the rule's ``e`` (finer with clipping / coarser without).
"""
from __future__ import annotations

import torch
from v4convert.formats.fp4 import E2M1_MAX, e2m1_lut
from v4convert.formats.fp8 import E8M0_BIAS
from v4convert.formats.mxfp4 import MX_MAX_FINITE_EXP, MXFP4Tensor, MXScaleRule
from v4convert.formats.nvfp4 import (
    DEFAULT_CLIP_RATIOS,
    NVFP4Convention,
    NVFP4Tensor,
    ScaleMethod,
    _block_scale,
)

from v4convert.formats.fp4_grid import FP4Codec, Grid, rtn_grid

CLIP_RATIOS = DEFAULT_CLIP_RATIOS        # 1.00, 0.95, ... 0.50
MX_EXP_STEPS = (0, -1, 1)


def weighted_block_error(w: torch.Tensor, deq: torch.Tensor, d: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``[N, K/block]``: ``sum_j d_j (w_j - deq_j)^2`` per block (``d [K]`` channel weights)."""
    n, k = w.shape
    return ((w - deq).square() * d[None, :]).view(n, k // block, block).sum(-1)


def _candidates(grid: Grid, w: torch.Tensor, base: ScaleMethod):
    """Yield candidate grids (first = the data-free scales themselves)."""
    yield grid
    b = grid.block
    n, k = w.shape
    if grid.codec is FP4Codec.NVFP4:
        block_amax = w.abs().view(n, k // b, b).amax(-1)
        targets = (E2M1_MAX, 4.0) if base is ScaleMethod.FOUR_OVER_SIX else (E2M1_MAX,)
        for t in targets:
            for r in CLIP_RATIOS:
                ws = _block_scale(block_amax * r, grid.gscale, grid.convention, t)
                yield Grid(grid.codec, ws=ws, gscale=grid.gscale, convention=grid.convention, amax=grid.amax)
    else:
        for s in MX_EXP_STEPS[1:]:
            yield Grid(grid.codec, exp=(grid.exp + s).clamp(-E8M0_BIAS, MX_MAX_FINITE_EXP))


def awq_quantize(w: torch.Tensor, d: torch.Tensor, codec: FP4Codec, **kw) -> NVFP4Tensor | MXFP4Tensor:
    """Quantize ``w [N, K]`` choosing each block's scale by the activation-weighted error (``d [K] >= 0``);
    keywords as :func:`awq_grid`."""
    grid, codes = awq_grid(w, d, codec, **kw)
    return grid.tensor(codes)


def awq_grid(w: torch.Tensor, d: torch.Tensor, codec: FP4Codec, *,
             convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
             base: ScaleMethod = ScaleMethod.RTN, global_amax: torch.Tensor | None = None,
             mx_rule: MXScaleRule = MXScaleRule.OCP_FLOOR, name: str = "tensor") -> tuple[Grid, torch.Tensor]:
    """(grid with the searched block scales, codes uint8 [N, K])."""
    k = w.shape[1]
    if d.shape != (k,):
        raise ValueError(f"{name}: channel statistics shape {tuple(d.shape)} does not match in-features {k}")
    w = w.detach().float()
    d = d.float()
    grid, codes = rtn_grid(w, codec, convention=convention, method=base, global_amax=global_amax,
                           mx_rule=mx_rule, name=name)
    b = grid.block
    lut = e2m1_lut()
    best = weighted_block_error(w, lut[codes.long()] * grid.eff().repeat_interleave(b, 1), d, b)
    for cand in list(_candidates(grid, w, base))[1:]:   # built before grid is updated below
        c_codes, deq = cand.encode(w, 0, name=name)
        err = weighted_block_error(w, deq, d, b)
        better = err < best
        best = torch.where(better, err, best)
        codes = torch.where(better.repeat_interleave(b, 1), c_codes, codes)
        if codec is FP4Codec.NVFP4:
            grid.ws = torch.where(better, cand.ws.float(), grid.ws.float()).to(torch.float8_e4m3fn)
        else:
            grid.exp = torch.where(better, cand.exp, grid.exp)
    return grid, codes


def block_candidates(grid: Grid, x: torch.Tensor, base: ScaleMethod = ScaleMethod.RTN,
                     mx_rule: MXScaleRule = MXScaleRule.OCP_FLOOR, name: str = "tensor") -> list[Grid]:
    """The search's candidate grids (``[N, 1]`` scales) for one block's current values ``x [N, block]``: first
    the RTN scale of ``x`` (MXFP4: the base's, i.e. with mse the searched exponent), then the others of
    :func:`awq_grid`. NVFP4: under ``grid``'s global scale (GPTQ's updates may take ``x`` past the original
    amax; E4M3 rounding saturates as in "scales during")."""
    if grid.codec is FP4Codec.NVFP4:
        ws = _block_scale(x.abs().amax(1, keepdim=True), grid.gscale, grid.convention, E2M1_MAX)
        sub = Grid(grid.codec, ws=ws, gscale=grid.gscale, convention=grid.convention, amax=grid.amax)
    else:
        sub, _ = rtn_grid(x, grid.codec, method=base, mx_rule=mx_rule, name=name)
    return list(_candidates(sub, x, base))
