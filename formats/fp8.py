"""FP8 scalar codecs used by DeepSeek checkpoints.

* E4M3 (``F8_E4M3`` in safetensors, torch ``float8_e4m3fn``): 1 sign, 4 exponent (bias 7),
  3 mantissa bits, no infinities, ``0x7F``/``0xFF`` are NaN, max finite 448.
* E8M0 (``F8_E8M0``, torch ``float8_e8m0fnu``, OCP MX v1.0 scale): 8 exponent bits, bias 127,
  value ``2**(e-127)``; ``0xFF`` is NaN. No sign, no zero.

Decoders take the raw bytes as ``uint8`` tensors so they work on anything read from disk.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E8M0_BIAS = 127
E8M0_NAN = 0xFF


def e4m3_table() -> torch.Tensor:
    """All 256 E4M3 byte values as float32 (index = byte), built from the bit layout."""
    b = torch.arange(256, dtype=torch.int32)
    sign = torch.where(b >= 128, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).to(torch.float32)
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).to(torch.float32))
    sub = (man / 8.0) * 2.0 ** -6
    val = sign * torch.where(exp == 0, sub, normal)
    val[(b & 0x7F) == 0x7F] = float("nan")
    return val.to(torch.float32)


def e4m3_to_float32(raw: torch.Tensor) -> torch.Tensor:
    """Decode E4M3 bytes (uint8/int8 or float8_e4m3fn tensor, any shape) to float32, exactly."""
    if raw.dtype == torch.float8_e4m3fn:
        raw = raw.view(torch.uint8)
    if raw.dtype == torch.int8:
        raw = raw.view(torch.uint8)
    if raw.dtype != torch.uint8:
        raise TypeError(f"E4M3 decode needs uint8 bytes, got {raw.dtype}")
    # torch's float8_e4m3fn -> float32 conversion is exact (every E4M3 value is a float32) and
    # maps 0x7F/0xFF to NaN; tests check it against ml_dtypes and ``e4m3_table()`` on all 256 bytes.
    return raw.view(torch.float8_e4m3fn).to(torch.float32)


def e8m0_to_float32(raw: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 scale bytes to float32: ``2**(e-127)``; byte 0xFF decodes to NaN.

    ``2**-127`` is a float32 subnormal and is represented exactly.
    """
    if raw.dtype == getattr(torch, "float8_e8m0fnu", None):
        raw = raw.view(torch.uint8)
    if raw.dtype == torch.int8:
        raw = raw.view(torch.uint8)
    if raw.dtype != torch.uint8:
        raise TypeError(f"E8M0 decode needs uint8 bytes, got {raw.dtype}")
    e = raw.to(torch.int32)
    out = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - E8M0_BIAS)
    return torch.where(e == E8M0_NAN, torch.full_like(out, float("nan")), out)
