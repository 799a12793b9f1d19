"""GGUF block quantizers (Q8_0, Q4_0, MXFP4) in PyTorch, byte-identical to ggml / gguf-py, and the
lossless re-pack of OCP/DeepSeek MXFP4 into GGUF MXFP4.

Block layouts (ggml ``ggml-common.h``; gguf-py ``gguf.quants``), all blocks of 32 along the last axis:
- Q8_0 (34 bytes): ``d`` float16, then 32 int8 ``q``; value = ``q * d``; ``d = amax / 127``,
  ``q = round_half_away(x / d)``.
- Q4_0 (18 bytes): ``d`` float16 (= signed max-magnitude element / -8), then 16 bytes; byte ``j`` holds
  ``q[j]`` in the low nibble and ``q[j+16]`` in the high nibble; value = ``(q - 8) * d``.
- MXFP4 (17 bytes): E8M0 exponent byte ``e``, then 16 bytes with element ``j`` in the low nibble and
  element ``j+16`` in the high nibble; value = ``kvalues[code] * 2^(e-128)`` with
  ``kvalues = {0,1,2,3,4,6,8,12}`` (sign in bit 3): the E2M1 table doubled, the scale halved.
  ``e = floor(log2(amax)) - 2 + 127`` (OCP rule); codes are nearest with ties to the lower table index.

Why not gguf-py: its numpy quantizers are the reference but slow (MXFP4 builds a 16x error tensor).
Here each block's scale is computed exactly as gguf-py does (the same numpy float32 expression, on the
per-block maxima only, so ``log2`` rounding is identical); MXFP4 codes come from one table lookup
instead of a 16-way argmin, rounding from three exact passes, and chunks run on a thread pool. ``tests/test_gguf_quants.py`` checks byte identity.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from v4convert.errors import UserError

from .blocks import GGUF_QK as QK   # elements per block for Q8_0 / Q4_0 / MXFP4
CHUNK_BLOCKS = 1 << 13       # blocks per chunk (256K elements, 1 MB float32): temporaries stay in cache

# MXFP4 code from k = ceil(2|x|/d) (d = the halved E8M0 scale, so 2|x|/d is exact): every decision
# bound of the nearest-value rule (|x|/d = .5 1.5 2.5 3.5 5 7 10) is an integer in 2|x|/d, and a value
# exactly on a bound takes the lower table index, as ggml's argmin does. Rows 0..32: x >= 0, rows
# 33..65: x < 0 (sign bit 8; -0.5d and smaller round to code 0, index 0 comes first).
_MXFP4_MAG = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6] + [7] * 12, dtype=np.uint8)
_MXFP4_LUT = np.concatenate([_MXFP4_MAG, np.where(_MXFP4_MAG > 0, _MXFP4_MAG | 8, 0).astype(np.uint8)])
_MXFP4_NEG = len(_MXFP4_MAG)      # 33
# kvalues of ggml's MXFP4 (the E2M1 table doubled); used by the exact fallback path.
_MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


class QuantError(UserError):
    """Input a GGUF block quantizer cannot encode (wrong row length, non-finite values, bad scales)."""


def block_bytes(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype`` (gguf-py's table)."""
    return GGML_QUANT_SIZES[qtype]


def _blocks(x: torch.Tensor, name: str) -> torch.Tensor:
    """float32 ``[..., K]`` -> ``[n_blocks, 32]`` (K must be a multiple of 32, values finite)."""
    if x.shape[-1] % QK != 0:
        raise QuantError(f"tensor {name}: row length {x.shape[-1]} is not a multiple of {QK}")
    return x.to(torch.float32).contiguous().reshape(-1, QK)


def _out_shape(x: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[int, ...]:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return (*x.shape[:-1], x.shape[-1] // bs * ts)


# Chunk kernels: numpy on [n_blocks, 32] float32 views, writing into a preallocated uint8 output. numpy
# releases the GIL, so chunks run on a thread pool (no OpenMP barriers, which stall badly when the
# machine is oversubscribed). Every float operation is the one gguf-py performs, in float32.
def _q8_0_chunk(b: np.ndarray, out: np.ndarray) -> bool:
    amax = np.abs(b).max(axis=1, keepdims=True)          # NaN/inf anywhere in a block shows here
    if not np.isfinite(amax).all():
        return False
    d = amax / np.float32(127)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    v = b * inv
    # gguf-py np_roundf (round half away from zero) as trunc(v) + trunc(2 * (v - trunc(v))): every step
    # is exact in float32, so the result equals floor|v| + floor(2 frac|v|) with v's sign.
    tv = np.trunc(v)
    v -= tv
    v *= 2
    np.trunc(v, out=v)
    v += tv
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = v.astype(np.int8).view(np.uint8)
    return True


def _q4_0_chunk(b: np.ndarray, out: np.ndarray) -> bool:
    imax = np.abs(b).argmax(axis=1)[:, None]             # first index of the largest magnitude (or a NaN)
    mx = np.take_along_axis(b, imax, axis=1)
    if not np.isfinite(mx).all():
        return False
    d = mx / np.float32(-8)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    v = b * inv
    v += np.float32(8.5)
    q = np.trunc(v, out=v).astype(np.uint8).clip(0, 15)   # trunc, cast, then clip, as gguf-py
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return True


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml ``ggml_e8m0_to_fp32_half``: 2^(e-128) as float32 (subnormal below e = 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


def _mxfp4_exponents(amax: np.ndarray) -> np.ndarray:
    """Per-block E8M0 byte, with gguf-py's exact numpy float32 expression (so log2 rounds identically)."""
    with np.errstate(divide="ignore"):
        return np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)


def _mxfp4_codes_exact(b: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Reference rule (argmin of |d*kvalue - x|, first index on ties) for blocks with subnormal scales."""
    errs = np.abs(d.reshape(-1, 1, 1) * _MXFP4_KVALUES - b[:, :, None])
    return errs.argmin(axis=-1).astype(np.uint8)


def _mxfp4_chunk(b: np.ndarray, out: np.ndarray) -> bool:
    a = np.abs(b)
    amax = a.max(axis=1)
    if not np.isfinite(amax).all():
        return False
    e = _mxfp4_exponents(amax)
    d = _e8m0_half(e)
    with np.errstate(over="ignore", invalid="ignore"):   # e < 2 rows are redone below
        a *= (np.float32(2) / d)[:, None]                 # exact: d is a power of two (normal for e >= 2)
        np.ceil(a, out=a)
        np.minimum(a, _MXFP4_NEG - 1, out=a)
        k = a.astype(np.uint8)
    k += np.signbit(b).view(np.uint8) * np.uint8(_MXFP4_NEG)
    codes = _MXFP4_LUT[k]
    low = e < 2
    if low.any():                            # subnormal scale: 2|x|/d is not exact, use the reference rule
        codes[low] = _mxfp4_codes_exact(b[low], d[low])
    out[:, 0] = e
    out[:, 1:] = codes[:, :16] | (codes[:, 16:] << np.uint8(4))
    return True


_CHUNK_FN = {
    GGMLQuantizationType.Q8_0: _q8_0_chunk,
    GGMLQuantizationType.Q4_0: _q4_0_chunk,
    GGMLQuantizationType.MXFP4: _mxfp4_chunk,
}


def quantize(x: torch.Tensor, qtype: GGMLQuantizationType, name: str = "?", threads: int | None = None) -> torch.Tensor:
    """Quantize float ``x [..., K]`` to GGUF ``qtype`` blocks: uint8 ``[..., K/32*bytes_per_block]``.

    Supports F32, F16, BF16 (plain casts; BF16 rounds to nearest even like ggml) and Q8_0, Q4_0, MXFP4.
    Byte-identical to ``gguf.quants.quantize`` (and so to ggml's reference quantizers). ``threads``:
    worker threads over chunks (default: the CPU count).
    """
    if qtype == GGMLQuantizationType.F32:
        return x.to(torch.float32).contiguous().view(torch.uint8)
    if qtype == GGMLQuantizationType.F16:
        return x.to(torch.float16).contiguous().view(torch.uint8)
    if qtype == GGMLQuantizationType.BF16:
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)
    fn = _CHUNK_FN.get(qtype)
    if fn is None:
        raise QuantError(f"tensor {name}: no built-in quantizer for {qtype.name} (use llama.cpp's quantizer)")
    bn = _blocks(x, name).numpy()
    out = np.empty((bn.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    starts = range(0, bn.shape[0], CHUNK_BLOCKS)
    n = min(threads or os.cpu_count() or 1, len(starts))
    if n <= 1:
        ok = all([fn(bn[i:i + CHUNK_BLOCKS], out[i:i + CHUNK_BLOCKS]) for i in starts])
    else:
        with ThreadPoolExecutor(n) as pool:
            ok = all(list(pool.map(lambda i: fn(bn[i:i + CHUNK_BLOCKS], out[i:i + CHUNK_BLOCKS]), starts)))
    if not ok:
        raise QuantError(f"tensor {name}: non-finite values cannot be block-quantized")
    return torch.from_numpy(out).reshape(_out_shape(x, qtype))


def repack_mxfp4(packed: torch.Tensor, scale: torch.Tensor, name: str = "?") -> torch.Tensor:
    """OCP / DeepSeek MXFP4 -> GGUF MXFP4 blocks, moving bits only (zero requantization error).

    ``packed``: int8/uint8 ``[..., K/2]``, byte ``i`` = element ``2i`` (low nibble) | ``2i+1`` (high);
    ``scale``: E8M0 bytes ``[..., K/32]`` (uint8 or float8_e8m0fnu). Returns uint8 ``[..., K/32*17]``.
    The E2M1 codes keep their meaning (ggml's kvalues are the E2M1 table doubled, its scale halved).
    E8M0 255 (NaN in OCP) has no GGUF equivalent and raises.
    """
    p = packed.contiguous().view(torch.uint8)
    s = scale.contiguous().view(torch.uint8)
    k = p.shape[-1] * 2
    if k % QK != 0 or tuple(s.shape) != (*p.shape[:-1], k // QK):
        raise QuantError(f"tensor {name}: MXFP4 scale shape {tuple(s.shape)} does not match packed "
                         f"shape {tuple(p.shape)} (expected {(*p.shape[:-1], k // QK)})")
    if bool((s == 255).any()):
        raise QuantError(f"tensor {name}: MXFP4 scale byte 255 (NaN) cannot be stored in GGUF")
    lead = p.shape[:-1]
    src = p.reshape(-1, k // QK, 16)
    # element 2i = low nibble of byte i, 2i+1 = high nibble -> codes in element order [n, blocks, 32]
    codes = torch.stack((src & 0x0F, src >> 4), dim=-1).reshape(-1, k // QK, QK)
    out = torch.empty((src.shape[0], k // QK, 17), dtype=torch.uint8)
    out[..., 0] = s.reshape(-1, k // QK)
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(*lead, k // QK * 17)


def dequantize(data: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Float32 values of GGUF ``data`` (uint8 blocks or a plain float array), via gguf-py's reference."""
    from gguf import quants
    arr = data.numpy() if isinstance(data, torch.Tensor) else data
    if qtype == GGMLQuantizationType.BF16:
        u = arr.view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32)
    return quants.dequantize(arr, qtype).astype(np.float32, copy=False)
