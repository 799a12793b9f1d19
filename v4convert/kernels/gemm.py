"""Packed-weight GEMM ``y = x @ W.T`` (W4A16 NVFP4/MXFP4 and FP8 block-128) and the dequantize kernel.

Public wrappers (check, allocate, launch): :func:`packed_gemm`, :func:`dequantize`. Their PyTorch references
sit in :mod:`v4convert.kernels.packed`: :func:`~v4convert.kernels.packed.packed_linear_reference` and
:meth:`~v4convert.kernels.packed.PackedWeight.dequantize`.

Kernel shape: one program per (BLOCK_M rows of x, BLOCK_N rows of W, K split); the K loop loads packed bytes
and scales, decodes them in registers (:mod:`.tl_codecs`) and feeds ``tl.dot`` with fp32 accumulation;
NVFP4's per-row global multiplier scales the finished sum. With ``split_k > 1`` each split writes a float32
partial ``[split, M, N]`` and the splits are summed by torch (decode shapes need many programs: N/BLOCK_N
alone leaves most SMs idle). Tile sizes are fixed heuristics (not autotuned: no GPU was available when this
was written; ``bench/gpu_check.sh`` measures them).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Under the interpreter the dot
operands are float32 (its bf16 ``tl.dot`` is wrong, DESIGN §6).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import Codec, PackedWeight, PackedWeightError
from .tl_codecs import CODEC_ID, DOT_ID, e2m1_to_f32, e4m3_to_f32, e8m0_to_f32, packed_tile_dot


def interpreting() -> bool:
    """True when the kernels of this module were built by the Triton interpreter (``TRITON_INTERPRET=1``)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_gemm_kernel, InterpretedFunction)


def check_device(t: torch.Tensor, name: str) -> None:
    if not t.is_cuda and not interpreting():
        raise PackedWeightError(f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def dot_precision(x_dtype: torch.dtype, codec: Codec) -> int:
    """DOT id for activations of ``x_dtype``: the activation's own 16-bit type when every decoded weight value
    fits it exactly (bf16: all codecs; fp16: E4M3 and NVFP4 ``E2M1*E4M3``, not MXFP4's 2**±127 range),
    else float32. Always float32 under the interpreter."""
    if interpreting() or (x_dtype == torch.float16 and codec is Codec.MXFP4):
        return DOT_ID[torch.float32]
    return DOT_ID[x_dtype]


def gemm_blocks(m: int, codec: Codec) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for ``m`` rows: 16-row tiles for decode, larger for prefill."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 64 else 128
    return bm, bn, 128


def default_split_k(m: int, n: int, k: int, bm: int, bn: int, bk: int, device: torch.device) -> int:
    """Splits of K so that the grid has about two programs per SM (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(k, bk), 16))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, r_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 stride_ys, k_per_split, CODEC: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = packed_tile_dot(acc, x_ptr, offs_m, m_mask, stride_xm, w_ptr, s_ptr, offs_n, n_mask, stride_wn,
                          stride_sn, k_lo, k_hi, K, CODEC, KB, BLOCK_K, DOT)
    r = tl.load(r_ptr + offs_n, mask=n_mask, other=0.0)
    acc = acc * r[None, :]
    ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def packed_gemm(x: torch.Tensor, pw: PackedWeight, split_k: int | None = None,
                blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` in ``x.dtype`` (float32 accumulation), ``W`` a single packed ``[N, K]``.

    ``split_k``/``blocks`` override the heuristics (tests use them to reach every code path).
    """
    if x.dim() != 2 or len(pw.shape) != 2:
        raise PackedWeightError(f"{pw.name}: packed_gemm needs x [M, K] and W [N, K], got {tuple(x.shape)}, {pw.shape}")
    if x.dtype not in DOT_ID:
        raise PackedWeightError(f"{pw.name}: activations must be float32/bfloat16/float16, got {x.dtype}")
    if x.shape[1] != pw.k:
        raise PackedWeightError(f"{pw.name}: input K {x.shape[1]} != weight K {pw.k}")
    if x.device != pw.device:
        raise PackedWeightError(f"{pw.name}: input on {x.device}, weight on {pw.device}")
    check_device(x, pw.name)
    m, k = x.shape
    n = pw.n
    x = x.contiguous()
    bm, bn, bk = blocks or gemm_blocks(m, pw.codec)
    if pw.codec is Codec.FP8_BLOCK and 128 % bk:
        raise PackedWeightError(f"{pw.name}: FP8-block GEMM needs BLOCK_K dividing 128, got {bk}")
    if pw.codec.is_fp4 and bk % pw.codec.k_block:
        raise PackedWeightError(f"{pw.name}: BLOCK_K {bk} is not a multiple of the {pw.codec.value} block")
    if m == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    splits = split_k or default_split_k(m, n, k, bm, bn, bk, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    _gemm_kernel[grid](x, pw.data, pw.scale, pw.row_scale, y, m, n, k, x.stride(0), pw.data.stride(0),
                       pw.scale.stride(0), n, m * n, k_per_split, CODEC=CODEC_ID[pw.codec], KB=pw.codec.k_block,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT=dot_precision(x.dtype, pw.codec), num_warps=4)
    return y if splits == 1 else y.sum(0).to(x.dtype)


# ---------------------------------------------------------------------- dequantize
@triton.jit
def _dequant_kernel(w_ptr, s_ptr, r_ptr, y_ptr, N, K, stride_wn, stride_sn, CODEC: tl.constexpr,
                    KB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    if CODEC == 0:
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.int32)
        sc = tl.load(s_ptr + (offs_n // 128)[:, None] * stride_sn + (offs_k // 128)[None, :], mask=mask, other=0.0)
        val = e4m3_to_f32(b) * sc
    else:
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (offs_k // 2)[None, :], mask=mask, other=0).to(tl.int32)
        code = tl.where(offs_k[None, :] % 2 == 0, b & 15, b >> 4)
        sb = tl.load(s_ptr + offs_n[:, None] * stride_sn + (offs_k // KB)[None, :], mask=mask, other=0).to(tl.int32)
        if CODEC == 1:
            r = tl.load(r_ptr + offs_n, mask=offs_n < N, other=0.0)
            val = (e2m1_to_f32(code) * e4m3_to_f32(sb)) * r[:, None]
        else:
            val = e2m1_to_f32(code) * e8m0_to_f32(sb)
    tl.store(y_ptr + offs_n[:, None] * K + offs_k[None, :], val, mask=mask)


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """float32 ``[N, K]`` values of a single packed matrix, bit-identical to ``PackedWeight.dequantize``
    (same operation order: ``(E2M1 * blockscale) * row_scale`` for NVFP4)."""
    if len(pw.shape) != 2:
        raise PackedWeightError(f"{pw.name}: dequantize needs a [N, K] weight, shape {pw.shape}")
    check_device(pw.data, pw.name)
    n, k = pw.shape
    y = torch.empty(n, k, dtype=torch.float32, device=pw.device)
    bn, bk = 32, 128
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        pw.data, pw.scale, pw.row_scale, y, n, k, pw.data.stride(0), pw.scale.stride(0),
        CODEC=CODEC_ID[pw.codec], KB=pw.codec.k_block, BLOCK_N=bn, BLOCK_K=bk)
    return y
