"""MoE experts over packed weights: sort tokens by expert, grouped GEMM gate/up with SwiGLU (and V4's clamp)
fused, grouped GEMM down with the routing weight fused, combine back to token order.

``out[t] = sum_j w[t, j] * down_e( silu(clamp_g(gate_e(x_t))) * clamp_u(up_e(x_t)) )``, ``e = idx[t, j]``,
``idx == -1`` = empty slot. ``limit`` (V4 ``swiglu_limit``): ``gate <= limit``, ``-limit <= up <= limit``
before the product (as ``v4convert.runtime.common.SwiGLU``); ``None`` or ``<= 0`` = no clamp (V3).

Public: :func:`moe_experts` (dispatch), the reference :func:`moe_experts_reference` (the CPU path; per expert,
tiled packed linears from :mod:`.packed`) and ``moe_triton.moe_experts_triton`` (CUDA / interpreter; Triton code
lives in ``*_triton``/``gemm`` modules imported only where it runs, so this module never imports Triton).

Triton path (all on device, no host sync):
1. :func:`sort_by_expert`: one stable argsort of the flattened expert ids (empties last), counts, offsets;
2. :func:`tile_schedule`: per BLOCK_M tile of each expert's row range ``(expert, row0, row1)``; the grid is an
   upper bound (``cdiv(S, BM) + min(E, S)`` tiles) and spare tiles have ``row0 == row1`` and loop zero times;
3. gate/up kernel: rows gather ``x[token]``, two accumulators over the same K loop, epilogue SwiGLU, store the
   activation ``[S, I]`` in ``x.dtype``;
4. down kernel: rows read the activation contiguously, epilogue multiplies the routing weight, stores float32
   ``[S, D]``; slots are scattered back and summed over ``top_k`` in slot order, then cast to ``x.dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packed import PackedWeight, PackedWeightError, packed_linear_reference


@dataclass(frozen=True)
class ExpertSort:
    """Slots sorted by expert. ``order [S]`` slot ids (``S = T * top_k``; slot = ``t * top_k + j``),
    ``token [S]`` and ``weight [S]`` (float32) of each sorted row, ``offsets [E + 1]`` int64 row ranges;
    rows ``>= offsets[E]`` are empty slots."""
    order: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    offsets: torch.Tensor


def check_moe_inputs(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: PackedWeight,
                     w_up: PackedWeight, w_down: PackedWeight) -> None:
    """Shapes/dtypes/devices: ``x [T, D]``, ``idx [T, k]`` int, ``weights [T, k]``, gate/up ``[E, I, D]``,
    down ``[E, D, I]``, one codec per matrix set."""
    if x.dim() != 2 or idx.shape != weights.shape or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise PackedWeightError(f"moe: need x [T, D], idx/weights [T, k]; got {tuple(x.shape)}, "
                                f"{tuple(idx.shape)}, {tuple(weights.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise PackedWeightError(f"moe: expert ids must be int32/int64, got {idx.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PackedWeightError(f"moe: activations must be float32/bfloat16/float16, got {x.dtype}")
    d = x.shape[1]
    for w in (w_gate, w_up, w_down):
        if len(w.shape) != 3:
            raise PackedWeightError(f"{w.name}: expert weights must be stacked [E, N, K], got {w.shape}")
        if w.device != x.device:
            raise PackedWeightError(f"{w.name}: on {w.device}, activations on {x.device}")
    e, i = w_gate.shape[0], w_gate.shape[1]
    if w_gate.shape != (e, i, d) or w_up.shape != (e, i, d) or w_down.shape != (e, d, i):
        raise PackedWeightError(f"moe: gate {w_gate.shape}, up {w_up.shape}, down {w_down.shape} do not fit "
                                f"[E, I, D], [E, I, D], [E, D, I] with D={d}")
    if w_gate.codec is not w_up.codec:
        raise PackedWeightError(f"moe: gate is {w_gate.codec.value} but up is {w_up.codec.value}")
    if idx.numel() and (int(idx.max()) >= e or int(idx.min()) < -1):
        raise PackedWeightError(f"moe: expert ids outside [-1, {e}) (got {int(idx.min())}..{int(idx.max())})")


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``silu(g) * u`` with V4's clamp (``g <= limit``, ``|u| <= limit``) when ``limit`` is set and > 0."""
    if limit is not None and limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    return F.silu(g) * u


def moe_experts_reference(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: PackedWeight,
                          w_up: PackedWeight, w_down: PackedWeight, limit: float | None = None) -> torch.Tensor:
    """Plain PyTorch: per expert with tokens, tiled packed linears in float32; ``[T, D]`` in ``x.dtype``.
    The SwiGLU activation is rounded to ``x.dtype`` before the down projection (as the kernel stores it)."""
    check_moe_inputs(x, idx, weights, w_gate, w_up, w_down)
    t, k = idx.shape
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    flat = idx.reshape(-1)
    wf = weights.reshape(-1).float()
    for e in torch.unique(flat[flat >= 0]).tolist():
        slots = (flat == e).nonzero().squeeze(1)
        tok = slots // k
        xe = x[tok].float()
        g = packed_linear_reference(xe, w_gate.expert(e))
        u = packed_linear_reference(xe, w_up.expert(e))
        h = swiglu(g, u, limit).to(x.dtype)
        y = packed_linear_reference(h, w_down.expert(e)).float() * wf[slots, None]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


def sort_by_expert(idx: torch.Tensor, weights: torch.Tensor, n_experts: int) -> ExpertSort:
    """One stable sort of the ``T * k`` slots by expert id (empty slots ``-1`` last)."""
    k = idx.shape[1]
    flat = idx.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, n_experts), flat)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_experts + 1)[:n_experts]
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return ExpertSort(order, order // k, weights.reshape(-1).float()[order], offsets)


def tile_schedule(offsets: torch.Tensor, block_m: int, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert, row0, row1)`` int32 per tile of ``block_m`` sorted rows, on device without a host sync.

    Tile count is the upper bound ``cdiv(n_slots, BM) + min(E, n_slots)``; spare tiles get ``row0 == row1 == 0``.
    """
    e = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles_e = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles_e, 0)
    n_tiles = -(-n_slots // block_m) + min(e, n_slots)
    t = torch.arange(n_tiles, device=offsets.device)
    ex = torch.searchsorted(cum, t, right=True)
    valid = ex < e
    ec = ex.clamp(max=e - 1)
    row0 = offsets[ec] + (t - (cum[ec] - tiles_e[ec])) * block_m
    row1 = offsets[ec + 1]
    zero = torch.zeros_like(row0)
    return (ec.to(torch.int32), torch.where(valid, row0, zero).to(torch.int32),
            torch.where(valid, row1, zero).to(torch.int32))


def moe_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: PackedWeight,
                w_up: PackedWeight, w_down: PackedWeight, limit: float | None = None) -> torch.Tensor:
    """Routed experts on packed weights: Triton on CUDA, :func:`moe_experts_reference` on CPU."""
    if x.is_cuda:
        from .moe_triton import moe_experts_triton
        return moe_experts_triton(x, idx, weights, w_gate, w_up, w_down, limit)
    return moe_experts_reference(x, idx, weights, w_gate, w_up, w_down, limit)
