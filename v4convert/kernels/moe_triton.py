"""Triton grouped GEMMs for :mod:`v4convert.kernels.moe` (see its docstring for the algorithm); the reference is
:func:`v4convert.kernels.moe.moe_experts_reference`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import check_device, dot_precision
from .moe import check_moe_inputs, sort_by_expert, tile_schedule
from .packed import Codec, PackedWeight, PackedWeightError
from .tl_codecs import CODEC_ID, packed_tile_dot


@triton.jit
def _moe_gemm_kernel(x_ptr, tok_ptr, rw_ptr, w_ptr, s_ptr, r_ptr, w2_ptr, s2_ptr, r2_ptr, y_ptr,
                     tile_e_ptr, tile_r0_ptr, tile_r1_ptr, N, K, stride_xm, stride_we, stride_wn, stride_se,
                     stride_sn, stride_re, stride_ym, limit, CODEC: tl.constexpr, KB: tl.constexpr,
                     GATHER: tl.constexpr, SWIGLU: tl.constexpr, CLAMP: tl.constexpr, WEIGHTED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """One (tile of sorted rows of one expert, BLOCK_N outputs). ``GATHER``: row r reads ``x[tok[r]]``, else
    ``x[r]``. ``SWIGLU``: second weight set (up) in a second accumulator, output ``silu(g) * u`` (``CLAMP``:
    V4 clamp by ``limit``). ``WEIGHTED``: output row r times ``rw[r]``. Output rows are the sorted rows."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_e_ptr + t).to(tl.int64)
    r0 = tl.load(tile_r0_ptr + t)
    r1 = tl.load(tile_r1_ptr + t)
    rows = r0 + tl.arange(0, BLOCK_M)
    row_mask = rows < r1
    k_end = tl.where(r1 > r0, K, 0)                 # spare tiles run no K iterations
    if GATHER:
        src = tl.load(tok_ptr + rows, mask=row_mask, other=0)
    else:
        src = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = packed_tile_dot(acc, x_ptr, src, row_mask, stride_xm, w_ptr + e * stride_we, s_ptr + e * stride_se,
                          offs_n, n_mask, stride_wn, stride_sn, 0, k_end, K, CODEC, KB, BLOCK_K, DOT)
    acc = acc * tl.load(r_ptr + e * stride_re + offs_n, mask=n_mask, other=0.0)[None, :]
    if SWIGLU:
        up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        up = packed_tile_dot(up, x_ptr, src, row_mask, stride_xm, w2_ptr + e * stride_we, s2_ptr + e * stride_se,
                             offs_n, n_mask, stride_wn, stride_sn, 0, k_end, K, CODEC, KB, BLOCK_K, DOT)
        up = up * tl.load(r2_ptr + e * stride_re + offs_n, mask=n_mask, other=0.0)[None, :]
        if CLAMP:
            acc = tl.minimum(acc, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        acc = acc * tl.sigmoid(acc) * up
    if WEIGHTED:
        acc = acc * tl.load(rw_ptr + rows, mask=row_mask, other=0.0)[:, None]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


def moe_blocks(rows_per_expert: float) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) from the mean rows per active expert (decode: 16-row tiles)."""
    bm = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64
    return bm, 64, 128


def _launch(x, tok, rw, w: PackedWeight, w2: PackedWeight | None, y, sched, bm, bn, bk, limit, gather, weighted):
    e_t, r0, r1 = sched
    n, k = w.shape[1], w.shape[2]
    w2 = w2 or w
    clamp = limit is not None and limit > 0
    grid = (e_t.numel(), triton.cdiv(n, bn))
    _moe_gemm_kernel[grid](x, tok, rw, w.data, w.scale, w.row_scale, w2.data, w2.scale, w2.row_scale, y,
                           e_t, r0, r1, n, k, x.stride(0), w.data.stride(0), w.data.stride(1), w.scale.stride(0),
                           w.scale.stride(1), w.row_scale.stride(0), y.stride(0), float(limit) if clamp else 0.0,
                           CODEC=CODEC_ID[w.codec], KB=w.codec.k_block, GATHER=gather, SWIGLU=w2 is not w,
                           CLAMP=clamp, WEIGHTED=weighted, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           DOT=dot_precision(x.dtype, w.codec), num_warps=4)


def moe_experts_triton(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w_gate: PackedWeight,
                       w_up: PackedWeight, w_down: PackedWeight, limit: float | None = None,
                       blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Routed experts ``[T, D]`` in ``x.dtype`` (see :mod:`.moe`); ``blocks`` overrides the tile sizes."""
    check_moe_inputs(x, idx, weights, w_gate, w_up, w_down)
    check_device(x, w_gate.name)
    for w in (w_gate, w_up, w_down):
        if not (w.data.is_contiguous() and w.scale.is_contiguous() and w.row_scale.is_contiguous()):
            raise PackedWeightError(f"{w.name}: stacked expert tensors must be contiguous")
    t, k = idx.shape
    n_exp, inter, d = w_gate.shape
    if t == 0:
        return torch.zeros(0, d, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    srt = sort_by_expert(idx, weights, n_exp)
    s = t * k
    bm, bn, bk = blocks or moe_blocks(s / max(1, min(n_exp, s)))
    for w in (w_gate, w_down):
        if w.codec is Codec.FP8_BLOCK and 128 % bk or w.codec.is_fp4 and bk % w.codec.k_block:
            raise PackedWeightError(f"{w.name}: BLOCK_K {bk} does not fit the {w.codec.value} block")
    sched = tile_schedule(srt.offsets, bm, s)
    tok = srt.token.to(torch.int32)
    act = torch.empty(s, inter, dtype=x.dtype, device=x.device)
    _launch(x, tok, srt.weight, w_gate, w_up, act, sched, bm, bn, bk, limit, gather=True, weighted=False)
    y_sorted = torch.zeros(s, d, dtype=torch.float32, device=x.device)
    _launch(act, tok, srt.weight, w_down, None, y_sorted, sched, bm, bn, bk, None, gather=False, weighted=True)
    y_slots = torch.empty_like(y_sorted)
    y_slots[srt.order] = y_sorted
    return y_slots.view(t, k, d).sum(1).to(x.dtype)
