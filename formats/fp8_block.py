"""FP8 block codec: E4M3 weights with one scale per 128x128 block (edge blocks partial).

``W[i, j] = fp8[i, j] * scale[i // 128, j // 128]`` in float32, scale shape ``[ceil(N/128),
ceil(K/128)]`` (DESIGN §3). Scale formats (:class:`FP8ScaleFormat`):

* ``F32``: ``weight_scale_inv = amax / 448`` as float32 (DeepSeek V3/R1 ``weight_quant``).
* ``F32_POW2``: float32 holding ``2**ceil(log2(amax / 448))`` (V3.1 ``scale_fmt: "ue8m0"``).
* ``E8M0``: the same power of two as ``float8_e8m0fnu`` bytes (V4 ``.scale``).

Power-of-two scales round up, so ``amax / scale <= 448`` and nothing clips. An all-zero block gets
scale 1.0 in every format. :func:`fp8_block_to_nvfp4` re-quantizes an FP8-block tensor to NVFP4
(RTN) without materialising the float32 weight: it equals
``nvfp4_quantize(fp8_block_dequantize(t))`` byte for byte, and is the engine's hot path.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .fp4 import BlockShapeError, CodecInputError, NonFiniteInputError
from .fp8 import E4M3_MAX, E8M0_BIAS, E8M0_NAN, e4m3_to_float32, e8m0_to_float32
from .nvfp4 import (
    NVFP4_BLOCK,
    Backend,
    NVFP4Convention,
    NVFP4Tensor,
    _raise_non_finite,
    encode_fp8_blocks_to_packed,
    fp8_block_amax_from_mag,
    fp8_block_mag_max,
    nvfp4_rtn_scales_from_block_amax,
    nvfp4_global_scale,
)

from .blocks import FP8_BLOCK
E4M3_NAN_MAG = 0x7F  # byte & 0x7F == 0x7F is NaN in E4M3 (no infinities)


class FP8ScaleFormat(enum.Enum):
    F32 = "f32"
    F32_POW2 = "f32-pow2"
    E8M0 = "e8m0"


@dataclass(frozen=True)
class FP8BlockTensor:
    """``weight`` ``float8_e4m3fn`` ``[N, K]``; ``scale`` float32 or ``float8_e8m0fnu``
    ``[ceil(N/128), ceil(K/128)]``."""

    weight: torch.Tensor
    scale: torch.Tensor
    fmt: FP8ScaleFormat

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))

    def scale_f32(self) -> torch.Tensor:
        if self.fmt is FP8ScaleFormat.E8M0:
            return e8m0_to_float32(self.scale.view(torch.uint8))
        return self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fp8_block_dequantize(self, dtype)


def _nblocks(n: int) -> int:
    return (n + FP8_BLOCK - 1) // FP8_BLOCK


def expand_block_scale(scale: torch.Tensor, n: int, k: int, col_block: int = 1) -> torch.Tensor:
    """``[B(n), B(k)]`` -> ``[n, k / col_block]``: each row/column group's 128-block scale."""
    per = FP8_BLOCK // col_block
    return scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(per, 1)[:, : k // col_block]


def _pow2_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``t`` = smallest exponent with ``amax <= 448 * 2**t`` (exact; amax > 0)."""
    a = amax.double()
    _, e = torch.frexp(a)  # a in [2**(e-1), 2**e)
    t = (e - 1 - 8).to(torch.int32)  # 256 * 2**t <= a < 512 * 2**t
    return t + (a > torch.ldexp(torch.full_like(a, E4M3_MAX), t)).to(torch.int32)


def fp8_block_quantize(
    x: torch.Tensor, *, fmt: FP8ScaleFormat = FP8ScaleFormat.F32, name: str = "tensor"
) -> FP8BlockTensor:
    """Quantize a 2-D float tensor ``[N, K]`` (any N, K) to E4M3 with 128x128 block scales."""
    if not x.is_floating_point() or x.dim() != 2:
        raise CodecInputError(f"{name}: FP8 block quantize needs a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")
    n, k = x.shape
    if n == 0 or k == 0:
        raise BlockShapeError(f"{name}: empty tensor {tuple(x.shape)}")
    xf = x.detach().to(torch.float32)
    bn, bk = _nblocks(n), _nblocks(k)
    padded = torch.nn.functional.pad(xf.abs(), (0, bk * FP8_BLOCK - k, 0, bn * FP8_BLOCK - n))
    amax = padded.view(bn, FP8_BLOCK, bk, FP8_BLOCK).amax(dim=(1, 3))  # NaN propagates
    if not bool(torch.isfinite(amax).all()):
        _raise_non_finite(x, name)
    pos = amax > 0
    if fmt is FP8ScaleFormat.F32:
        s = torch.where(pos, amax / E4M3_MAX, torch.ones_like(amax))
        stored = s
    else:
        t = torch.where(pos, _pow2_scale_exponent(torch.where(pos, amax, torch.ones_like(amax))), 0)
        if bool((t < -E8M0_BIAS).any()) or bool((t > E8M0_BIAS).any()):
            raise CodecInputError(f"{name}: block amax outside the E8M0 scale range")
        s = torch.ldexp(torch.ones_like(amax), t.float())
        stored = (t + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu) if fmt is FP8ScaleFormat.E8M0 else s
    q = xf / expand_block_scale(s, n, k)
    weight = q.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8BlockTensor(weight=weight, scale=stored, fmt=fmt)


def fp8_block_dequantize(t: FP8BlockTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fp8 * scale[i//128, j//128]`` in float32, then ``dtype``."""
    n, k = t.shape
    w = t.weight.float() if t.weight.dtype == torch.float8_e4m3fn else e4m3_to_float32(t.weight)
    return (w * expand_block_scale(t.scale_f32(), n, k)).to(dtype)


def fp8_block_from_stored(weight: torch.Tensor, scale: torch.Tensor, name: str = "tensor") -> FP8BlockTensor:
    """Wrap tensors read from a checkpoint: ``F8_E4M3 [N, K]`` + F32 or ``F8_E8M0`` ``[B(N), B(K)]``."""
    w = weight.view(torch.float8_e4m3fn) if weight.dtype in (torch.uint8, torch.int8) else weight
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        raise CodecInputError(f"{name}: FP8 block weight must be 2-D F8_E4M3, got {weight.dtype} {tuple(weight.shape)}")
    n, k = w.shape
    if tuple(scale.shape) != (_nblocks(n), _nblocks(k)):
        raise BlockShapeError(
            f"{name}: scale shape {tuple(scale.shape)} does not match weight {tuple(w.shape)} "
            f"(expected {(_nblocks(n), _nblocks(k))})"
        )
    if scale.dtype == torch.float32:
        return FP8BlockTensor(weight=w, scale=scale, fmt=FP8ScaleFormat.F32)
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        s = scale.view(torch.float8_e8m0fnu)
        if bool((s.view(torch.uint8) == E8M0_NAN).any()):
            raise NonFiniteInputError(f"{name}: E8M0 scale byte 0xFF (NaN) present")
        return FP8BlockTensor(weight=w, scale=s, fmt=FP8ScaleFormat.E8M0)
    raise CodecInputError(f"{name}: unsupported FP8 block scale dtype {scale.dtype}")


def fp8_block_to_nvfp4(
    t: FP8BlockTensor,
    *,
    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
    global_amax: torch.Tensor | float | None = None,
    backend: Backend = Backend.AUTO,
    name: str = "tensor",
) -> NVFP4Tensor:
    """FP8-block -> NVFP4 RTN, equal to ``nvfp4_quantize(fp8_block_dequantize(t))`` byte for byte.

    Reads the E4M3 bytes twice (block amax on the magnitude bytes, then encode), never holding a
    float32 copy of the whole weight on the compiled path.
    """
    n, k = t.shape
    if k % NVFP4_BLOCK:
        raise BlockShapeError(f"{name}: NVFP4 needs K % {NVFP4_BLOCK} == 0, got shape {(n, k)}")
    raw = t.weight.view(torch.uint8)
    s_f32 = t.scale_f32().float()
    if not bool(torch.isfinite(s_f32).all()):
        raise NonFiniteInputError(f"{name}: non-finite FP8 block scale")
    # Block amax from magnitude bytes: E4M3 magnitude is monotonic in (byte & 0x7F), and
    # rounding fp8 * s (s >= 0) is monotonic, so max|fp8 * s| = decode(max mag byte) * s exactly.
    mag_max = fp8_block_mag_max(raw, backend=backend)  # uint8 [N, K/16]
    if bool((mag_max == E4M3_NAN_MAG).any()):
        bad = int(((raw & 0x7F) == E4M3_NAN_MAG).sum())
        raise NonFiniteInputError(f"{name}: {bad} NaN E4M3 values in tensor of shape {(n, k)}; refusing to quantize")
    s16 = expand_block_scale(s_f32, n, k, NVFP4_BLOCK).contiguous()  # float32 [N, K/16]
    block_amax, amax = fp8_block_amax_from_mag(mag_max, s16, backend=backend)
    if not bool(torch.isfinite(amax)):
        _raise_non_finite(block_amax, name)
    if global_amax is not None:
        g_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=raw.device).reshape(())
        if not bool(torch.isfinite(g_amax)) or bool(g_amax < amax):
            raise CodecInputError(
                f"{name}: supplied global amax {float(g_amax)} is below the tensor's amax {float(amax)} (or not finite)"
            )
        amax = g_amax
    gscale = nvfp4_global_scale(amax, convention)
    ws, safe = nvfp4_rtn_scales_from_block_amax(block_amax, gscale, convention, backend=backend)
    packed = encode_fp8_blocks_to_packed(raw, s16, safe, backend=backend)
    return NVFP4Tensor(packed=packed, block_scale=ws, global_scale=gscale, convention=convention, amax=amax.reshape(()))
