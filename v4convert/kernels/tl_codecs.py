"""Triton device functions shared by the kernels: exact FP4/FP8 decoding in registers and the K loop of
a packed ``x @ W.T`` tile.

Decoders build the float32 bit pattern from the code's fields (no lookup table, no float8 dtypes, so
they run identically compiled and under ``TRITON_INTERPRET=1``), DESIGN §4:

* E2M1 ``c = s<<3 | e<<1 | m``: ``e > 0`` -> ``(1 + m/2) * 2**(e-1)`` = bits ``(e+126)<<23 | m<<22``;
  ``e == 0`` -> ``m * 0.5`` (bits ``126<<23`` or 0); sign bit 31.
* E4M3 ``b = s<<7 | e<<3 | m``: ``e > 0`` -> bits ``(e+120)<<23 | m<<20``; ``e == 0`` -> ``m * 2**-9``;
  ``0x7F``/``0xFF`` NaN.
* E8M0 ``b``: ``2**(b-127)`` = bits ``b<<23`` (``b == 0``: the subnormal ``2**-127`` = bits ``1<<22``;
  ``b == 255``: NaN).

Codec ids (``CODEC`` constexpr) come from :data:`CODEC_ID`; dot precisions (``DOT``) from :data:`DOT_ID`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import Codec

# Codec -> constexpr id used inside kernels (one table).
CODEC_ID: dict[Codec, int] = {Codec.FP8_BLOCK: 0, Codec.NVFP4: 1, Codec.MXFP4: 2}
# Operand dtype of tl.dot -> constexpr id. float32 is always IEEE (never TF32).
DOT_ID: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def e2m1_to_f32(c):
    """int32 codes 0..15 -> float32 E2M1 values (exact, signed zero kept)."""
    s = (c >> 3) & 1
    e = (c >> 1) & 3
    m = c & 1
    mag = tl.where(e == 0, m * (126 << 23), ((e + 126) << 23) | (m << 22))
    return (mag | (s << 31)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_f32(b):
    """int32 bytes 0..255 -> float32 E4M3 values (exact; 0x7F/0xFF -> NaN)."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    val = tl.where(((b >> 7) & 1) == 1, -mag, mag)
    nan = tl.full(b.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where((b & 127) == 127, nan, val)


@triton.jit
def e8m0_to_f32(b):
    """int32 bytes 0..255 -> float32 ``2**(b-127)`` (exact; 255 -> NaN)."""
    bits = tl.where(b == 0, 1 << 22, tl.where(b == 255, 0x7FC00000, b << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mma(a, w_nk, acc, DOT: tl.constexpr):
    """``acc + a [BM, BK] @ w_nk [BN, BK].T`` with operands cast to the DOT precision, fp32 accumulation."""
    if DOT == 1:
        out = tl.dot(a.to(tl.bfloat16), tl.trans(w_nk.to(tl.bfloat16)), acc)
    elif DOT == 2:
        out = tl.dot(a.to(tl.float16), tl.trans(w_nk.to(tl.float16)), acc)
    else:
        out = tl.dot(a.to(tl.float32), tl.trans(w_nk.to(tl.float32)), acc, input_precision="ieee")
    return out


@triton.jit
def packed_tile_dot(acc, x_ptr, rows, row_mask, stride_xm, w_ptr, s_ptr, offs_n, n_mask, stride_wn, stride_sn,
                    k_lo, k_hi, K, CODEC: tl.constexpr, KB: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT: tl.constexpr):
    """``acc [BM, BN] += x[rows, k_lo:k_hi] @ W[offs_n, k_lo:k_hi].T`` with W packed (``CODEC``, block ``KB``).

    ``x`` rows are ``x_ptr + rows * stride_xm`` with unit stride along K. FP4: ``w`` uint8 ``[N, K/2]``
    (row stride ``stride_wn``), ``s`` uint8 ``[N, K/KB]``; the tile is split in even/odd elements (low/high
    nibbles) so that no interleave is needed: two dots of ``BLOCK_K/2``. FP8: ``w`` uint8 ``[N, K]``, ``s``
    float32 ``[ceil(N/128), ceil(K/128)]``; ``128 % BLOCK_K == 0`` so one scale per (row block, K tile), applied
    to the partial product (the dot operands are then exact E4M3 values in any DOT precision).
    The NVFP4 per-row global scale is *not* applied here (the caller multiplies the finished sum).
    """
    if CODEC == 0:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                        mask=row_mask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                        mask=n_mask[:, None] & kmask[None, :], other=0).to(tl.int32)
            part = mma(a, e4m3_to_f32(b), tl.zeros(acc.shape, tl.float32), DOT)
            sc = tl.load(s_ptr + (offs_n // 128) * stride_sn + k0 // 128, mask=n_mask, other=0.0)
            acc += part * sc[None, :]
    else:
        offs_j = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + 2 * offs_j                                  # even element of each byte
            kmask = kk < K
            xm = row_mask[:, None] & kmask[None, :]
            wm = n_mask[:, None] & kmask[None, :]
            xe = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=xm, other=0.0)
            xo = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] + 1, mask=xm, other=0.0)
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (kk // 2)[None, :], mask=wm, other=0).to(tl.int32)
            sb = tl.load(s_ptr + offs_n[:, None] * stride_sn + (kk // KB)[None, :], mask=wm, other=0).to(tl.int32)
            if CODEC == 1:
                sc = e4m3_to_f32(sb)
            else:
                sc = e8m0_to_f32(sb)
            acc = mma(xe, e2m1_to_f32(b & 15) * sc, acc, DOT)
            acc = mma(xo, e2m1_to_f32(b >> 4) * sc, acc, DOT)
    return acc
