"""E2M1 (FP4) codes and nibble packing as DeepSeek, torch, OCP and safetensors store them.

Code = ``sign << 3 | idx``, magnitudes ``[0, .5, 1, 1.5, 2, 3, 4, 6]`` (DESIGN §4).
Packing: byte ``j`` of a row holds element ``2j`` in the low nibble and ``2j+1`` in the high one.
(GGUF's MXFP4 block order differs; it lives in the GGUF writer.)
"""
from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0


def e2m1_lut(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry decode table, index = 4-bit code."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K/2]`` uint8/int8 bytes -> ``[..., K]`` uint8 codes (low nibble first)."""
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    if p.dtype != torch.uint8:
        raise TypeError(f"packed FP4 must be uint8/int8, got {packed.dtype}")
    lo = p & 0x0F
    hi = p >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` codes (0..15, K even) -> ``[..., K/2]`` uint8, low nibble = even element."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def decode_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes -> float32 E2M1 values (unscaled), ``[..., K]``."""
    return e2m1_lut()[unpack_fp4(packed).long()]
