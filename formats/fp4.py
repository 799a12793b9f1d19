"""E2M1 (FP4) codes and nibble packing as DeepSeek, torch, OCP and safetensors store them.

Code = ``sign << 3 | idx``, magnitudes ``[0, .5, 1, 1.5, 2, 3, 4, 6]`` (DESIGN §4).
Packing: byte ``j`` of a row holds element ``2j`` in the low nibble and ``2j+1`` in the high one.
(GGUF's MXFP4 block order differs; it lives in the GGUF writer.)
"""
from __future__ import annotations

import torch
from v4convert.errors import UserError

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


# ---------------------------------------------------------------------------------------------
# Encode side (quantizers). Errors shared by the NVFP4 / MXFP4 / FP8-block codecs live here too.
# ---------------------------------------------------------------------------------------------


class CodecInputError(UserError):
    """A tensor handed to a quantizer cannot be encoded (shape, dtype, or values)."""


class NonFiniteInputError(CodecInputError):
    """A tensor handed to a quantizer holds NaN or Inf values."""


class BlockShapeError(CodecInputError):
    """A tensor's shape does not fit the codec's block size."""


def _e2m1_rounding_bounds() -> tuple[tuple[float, bool], ...]:
    """Decision bounds between consecutive E2M1 magnitudes, derived from ``E2M1_VALUES``.

    Returns ``(midpoint, inclusive)`` pairs: a magnitude ``a`` moves past bound ``i`` when
    ``a > midpoint`` or, if ``inclusive``, ``a >= midpoint``. Ties go to the even code
    (round to nearest, ties to even mantissa): midpoint between codes ``i`` and ``i+1`` is
    inclusive exactly when ``i+1`` is even. Gives .25 .75 1.25 1.75 2.5 3.5 5 (DESIGN §4).
    """
    mags = E2M1_VALUES[:8]
    return tuple(((mags[i] + mags[i + 1]) / 2.0, (i + 1) % 2 == 0) for i in range(7))


def e2m1_encode(x: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Round float values (already divided by their scale) to E2M1 codes, ``uint8`` same shape.

    Round to nearest, ties to even; magnitudes above 6 saturate to 6 (code 7 / 15); the sign bit
    is kept for negative values that round to zero and for ``-0.0`` (code 8), as ml_dtypes'
    ``float4_e2m1fn`` does. Works on any device and any floating dtype (comparisons are exact).
    NaN input raises :class:`NonFiniteInputError` naming ``name``; ``±inf`` saturates.
    """
    if not x.is_floating_point():
        raise CodecInputError(f"{name}: E2M1 encode needs a floating tensor, got {x.dtype}")
    if bool(torch.isnan(x).any()):
        raise NonFiniteInputError(f"{name}: NaN values cannot be encoded as E2M1")
    idx = e2m1_magnitude_index(x)
    idx |= torch.signbit(x).to(torch.uint8) << 3
    return idx


def e2m1_magnitude_index(x: torch.Tensor) -> torch.Tensor:
    """``uint8`` index 0..7 of the nearest E2M1 magnitude of ``|x|`` (ties to even, above 6 -> 7; NaN -> 0,
    unchecked: callers that must refuse NaN check first, as :func:`e2m1_encode` does)."""
    a = x.abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for bound, inclusive in _e2m1_rounding_bounds():
        idx += (a >= bound) if inclusive else (a > bound)
    return idx
