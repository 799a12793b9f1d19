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
per-block maxima only, so ``log2`` rounding is identical) and the per-element work is done with torch
(threaded), with the same float32 operations. ``tests/test_gguf_quants.py`` checks byte identity.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = 32                      # elements per block for Q8_0 / Q4_0 / MXFP4
CHUNK_BLOCKS = 1 << 16       # blocks per torch chunk (2M elements): bounds temporaries to ~50 MB

# MXFP4 code from k = ceil(2|x|/d) (d = the halved E8M0 scale, so 2|x|/d is exact): every decision
# bound of the nearest-value rule (|x|/d = .5 1.5 2.5 3.5 5 7 10) is an integer in 2|x|/d, and a value
# exactly on a bound takes the lower table index, as ggml's argmin does. Rows 0..32: x >= 0, rows
# 33..65: x < 0 (sign bit 8; -0.5d and smaller round to code 0, index 0 comes first).
_MXFP4_MAG = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6] + [7] * 12, dtype=np.uint8)
_MXFP4_LUT = np.concatenate([_MXFP4_MAG, np.where(_MXFP4_MAG > 0, _MXFP4_MAG | 8, 0).astype(np.uint8)])
_MXFP4_NEG = len(_MXFP4_MAG)      # 33
# kvalues of ggml's MXFP4 (the E2M1 table doubled); used by the exact fallback path.
_MXFP4_KVALUES = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)


class QuantError(ValueError):
    """Input a GGUF block quantizer cannot encode (wrong row length, non-finite values, bad scales)."""


def block_bytes(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype`` (gguf-py's table)."""
    return GGML_QUANT_SIZES[qtype]


def _blocks(x: torch.Tensor, name: str) -> torch.Tensor:
    """float32 ``[..., K]`` -> ``[n_blocks, 32]`` (K must be a multiple of 32, values finite)."""
    if x.shape[-1] % QK != 0:
        raise QuantError(f"tensor {name}: row length {x.shape[-1]} is not a multiple of {QK}")
    return x.to(torch.float32).contiguous().reshape(-1, QK)


def _check_finite(b: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(b).all()):
        raise QuantError(f"tensor {name}: non-finite values cannot be block-quantized")


def _out_shape(x: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[int, ...]:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return (*x.shape[:-1], x.shape[-1] // bs * ts)


# ---------------------------------------------------------------------------------------------- Q8_0
def _q8_0_chunk(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = b * inv
    # gguf-py np_roundf (round half away from zero) as trunc(v) + trunc(2 * (v - trunc(v))): every step
    # is exact in float32, so the result equals floor|v| + floor(2 frac|v|) with v's sign.
    tv = torch.trunc(v)
    q = v.sub_(tv).mul_(2).trunc_().add_(tv).to(torch.int8)
    out = torch.empty((b.shape[0], 34), dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:] = q.view(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------- Q4_0
def _q4_0_chunk(b: torch.Tensor) -> torch.Tensor:
    imax = b.abs().argmax(dim=1, keepdim=True)          # first index of the largest magnitude
    mx = torch.gather(b, 1, imax)
    d = mx / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp_(0, 15).to(torch.uint8)   # trunc then clip, as gguf-py
    out = torch.empty((b.shape[0], 18), dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


# --------------------------------------------------------------------------------------------- MXFP4
def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """ggml ``ggml_e8m0_to_fp32_half``: 2^(e-128) as float32 (subnormal below e = 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


def _mxfp4_exponents(amax: torch.Tensor) -> np.ndarray:
    """Per-block E8M0 byte, computed with gguf-py's exact numpy float32 expression (uint8 [n])."""
    d = amax.numpy()
    with np.errstate(divide="ignore"):
        return np.where(d > 0, np.floor(np.log2(d)) - 2 + 127, 0).astype(np.uint8)


def _mxfp4_codes_exact(b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Reference rule (argmin of |d*kvalue - x|, first index on ties) for blocks with subnormal scales."""
    errs = (d[:, :, None] * _MXFP4_KVALUES - b[:, :, None]).abs()
    return errs.argmin(dim=-1).to(torch.uint8)


def _mxfp4_chunk(b: torch.Tensor) -> torch.Tensor:
    a = b.abs()
    e = _mxfp4_exponents(a.amax(dim=1))
    d = torch.from_numpy(_e8m0_half(e)).reshape(-1, 1)
    k = a.mul_(2 / d).ceil_().clamp_(max=_MXFP4_NEG - 1).to(torch.uint8)
    k.add_(torch.signbit(b).to(torch.uint8).mul_(_MXFP4_NEG))
    codes = torch.from_numpy(_MXFP4_LUT[k.numpy()])
    low = torch.from_numpy(e < 2)
    if bool(low.any()):                      # subnormal scale: 2|x|/d is not exact, use the reference rule
        codes[low] = _mxfp4_codes_exact(b[low], d[low])
    out = torch.empty((b.shape[0], 17), dtype=torch.uint8)
    out[:, 0] = torch.from_numpy(e)
    out[:, 1:] = codes[:, :16] | (codes[:, 16:] << 4)
    return out


_CHUNK_FN = {
    GGMLQuantizationType.Q8_0: _q8_0_chunk,
    GGMLQuantizationType.Q4_0: _q4_0_chunk,
    GGMLQuantizationType.MXFP4: _mxfp4_chunk,
}


def quantize(x: torch.Tensor, qtype: GGMLQuantizationType, name: str = "?") -> torch.Tensor:
    """Quantize float ``x [..., K]`` to GGUF ``qtype`` blocks: uint8 ``[..., K/32*bytes_per_block]``.

    Supports F32, F16, BF16 (plain casts; BF16 rounds to nearest even like ggml) and Q8_0, Q4_0, MXFP4.
    Byte-identical to ``gguf.quants.quantize`` (and so to ggml's reference quantizers).
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
    b = _blocks(x, name)
    _check_finite(b, name)
    parts = [fn(b[i:i + CHUNK_BLOCKS]) for i in range(0, b.shape[0], CHUNK_BLOCKS)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(_out_shape(x, qtype))


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
