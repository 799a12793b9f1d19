"""MLX's quantized weight layouts (``mx.quantize`` / ``mx.dequantize``), encoded and decoded in torch.

A quantized linear ``[out, in]`` is stored by MLX as (names as mlx-lm saves them):

* ``weight``  U32 ``[out, in * bits / 32]``: codes packed from the low bits up, element ``k`` of a word
  in bits ``k*bits .. k*bits+bits-1`` (little-endian words, so for 4 bits byte ``j`` is
  ``code[2j] | code[2j+1] << 4`` -- the same bytes as DeepSeek's / OCP's FP4 pairs).
* ``scales``  one per group of ``group_size`` along ``in``: affine -> the float dtype of the model;
  ``mxfp4`` -> E8M0 bytes (U8, ``2^(s-127)``); ``nvfp4`` -> E4M3 bytes (U8).
* ``biases``  (affine only) same shape/dtype as ``scales``.

Values: affine ``w = scales * q + biases`` (``q`` unsigned, ``bits`` wide); ``mxfp4`` / ``nvfp4``
``w = E2M1[code] * scale``. Source: ``mlx/backend/cpu/quantized.cpp`` (``quantize``, ``fp_qmm``,
``dequantize_scale``) and ``mx.quantize``'s documentation, mlx 0.32; ``tests/test_mlx_export.py`` checks
every encoder here byte-for-byte against ``mx.quantize`` and every decoder against ``mx.dequantize``.

Affine rule (MLX's, which keeps 0 exactly representable): per group ``lo, hi = min, max``;
``s = max((hi - lo) / (2^b - 1), 1e-7)``, negated unless ``|lo| > |hi|``; ``edge = lo if |lo| > |hi|
else hi``; ``q0 = rint(edge / s)``; if ``q0 != 0``: ``s = edge / q0``, ``bias = edge`` else ``bias = 0``;
``q = clip(rint((w - bias) / s), 0, 2^b - 1)``. All in float32; ``scales``/``biases`` are then cast to the
model dtype (MLX quantizes with the unrounded float32 scale and stores the rounded one).
MX rule (E2M1 ties toward zero, zeros +0: :func:`e2m1_encode_mlx`): ``mxfp4`` scale exponent ``ceil(log2(amax / 6))`` (round up: never clips); ``nvfp4`` scale
``e4m3(amax / 6)`` with no tensor scale (MLX's plain ``QuantizedLinear`` has none).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .fp4 import CodecInputError, decode_fp4, pack_fp4
from .fp8 import e4m3_to_float32, e8m0_to_float32
from .mxfp4 import MXScaleRule, mxfp4_block_exponents

MX_GROUP = 32            # mxfp4 / mxfp8 group size (fixed by MLX)
NV_GROUP = 16            # nvfp4 group size (fixed by MLX)
AFFINE_GROUPS = (128, 64, 32)   # group sizes MLX's affine kernels take (its qmm dispatch)
AFFINE_BITS = (4, 8)
_AFFINE_EPS = 1e-7       # MLX's lower bound on an affine scale


class MLXMode(enum.Enum):
    """MLX quantization modes (``mode=`` of ``mx.quantize``)."""
    AFFINE = "affine"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"


class MLXCodecError(CodecInputError):
    """A tensor that cannot be put in the requested MLX layout (shape / group mismatch, non-finite values)."""


@dataclass(frozen=True)
class MLXQuant:
    """One module's quantization, as mlx-lm's config names it: ``{"group_size", "bits", "mode"}``."""
    mode: MLXMode
    bits: int
    group_size: int

    def config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode.value}

    def check(self) -> None:
        if self.mode is MLXMode.AFFINE:
            if self.bits not in AFFINE_BITS or self.group_size not in AFFINE_GROUPS:
                raise MLXCodecError(f"affine needs bits in {AFFINE_BITS} and group size in {AFFINE_GROUPS}, "
                                    f"got {self.bits} bits, group {self.group_size}")
        elif (self.bits, self.group_size) != (4, MX_GROUP if self.mode is MLXMode.MXFP4 else NV_GROUP):
            raise MLXCodecError(f"{self.mode.value} is 4 bits in groups of "
                                f"{MX_GROUP if self.mode is MLXMode.MXFP4 else NV_GROUP}")


@dataclass
class MLXPacked:
    """Stored parts of one MLX-quantized tensor ``[..., K]``: ``weight`` is uint8 bytes ``[..., K*bits/8]``
    (write it as U32 ``[..., K*bits/32]``), ``scales`` (and affine ``biases``) ``[..., K/group]``."""
    weight: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor | None = None


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[..., K]`` (< 2^bits) -> uint8 bytes ``[..., K*bits/8]`` in MLX's word order."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 4:
        return pack_fp4(codes.to(torch.uint8))
    raise MLXCodecError(f"packing {bits}-bit codes is not supported (4 or 8)")


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes ``[..., K*bits/8]`` -> codes ``[..., K]`` (uint8)."""
    b = packed.view(torch.uint8)
    if bits == 8:
        return b
    if bits == 4:
        return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    raise MLXCodecError(f"unpacking {bits}-bit codes is not supported (4 or 8)")


def _groups(w: torch.Tensor, g: int, name: str) -> torch.Tensor:
    if w.dim() < 2 or w.shape[-1] % g:
        raise MLXCodecError(f"{name}: MLX quantization needs >= 2 dims and the last dim a multiple of "
                            f"{g}, got shape {tuple(w.shape)}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def affine_quantize(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype,
                    name: str = "tensor") -> MLXPacked:
    """MLX affine quantization of ``w`` ``[..., K]`` as ``mx.quantize(w.astype(dtype), group_size, bits)``
    computes it (``w`` is first rounded to ``dtype``, the model dtype; scales/biases stored in ``dtype``)."""
    MLXQuant(MLXMode.AFFINE, bits, group_size).check()
    x = _groups(w.detach().to(dtype).to(torch.float32), group_size, name)
    n_bins = float((1 << bits) - 1)
    lo, hi = x.amin(-1), x.amax(-1)
    neg_edge = lo.abs() > hi.abs()
    s = torch.clamp((hi - lo) / n_bins, min=_AFFINE_EPS)
    s = torch.where(neg_edge, s, -s)
    edge = torch.where(neg_edge, lo, hi)
    q0 = torch.round(edge / s)
    shift = q0 != 0
    s = torch.where(shift, edge / torch.where(shift, q0, 1.0), s)
    bias = torch.where(shift, edge, torch.zeros_like(edge))
    q = torch.round((x - bias[..., None]) / s[..., None]).clamp(0, n_bins).to(torch.uint8)
    return MLXPacked(pack_codes(q.reshape(w.shape), bits), s.to(dtype), bias.to(dtype))


_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)     # midpoints between E2M1 magnitudes


def e2m1_encode_mlx(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes as MLX rounds (measured against ``mx.quantize``, mlx 0.32.4): to nearest, ties toward
    zero (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3; IEEE/ml_dtypes round them to even), saturating at 6, and
    every zero is +0 (code 0; ml_dtypes keeps -0). Magnitude index = number of bounds strictly below."""
    a = x.abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for b in _E2M1_BOUNDS:
        idx += a > b
    neg = torch.signbit(x) & (idx > 0)
    return idx | (neg.to(torch.uint8) << 3)


def mxfp4_encode(w: torch.Tensor, name: str = "tensor") -> MLXPacked:
    """MLX ``mxfp4`` of float ``w`` ``[..., K]``: E8M0 exponent ``ceil(log2(amax/6))`` per 32, E2M1 codes."""
    _groups(w, MX_GROUP, name)
    x = _groups(w.detach().to(torch.float32), MX_GROUP, name)
    amax = x.abs().amax(-1)
    if not bool(torch.isfinite(amax).all()):
        raise MLXCodecError(f"{name}: non-finite values cannot be quantized")
    e = mxfp4_block_exponents(amax, MXScaleRule.ROUND_UP)
    q = torch.ldexp(x, (-e)[..., None].to(torch.float32))          # exact: a power-of-two scaling
    return MLXPacked(pack_fp4(e2m1_encode_mlx(q).reshape(w.shape)), (e + 127).to(torch.uint8))


def mxfp4_repack(packed: torch.Tensor, scale: torch.Tensor, name: str = "tensor") -> MLXPacked:
    """DeepSeek-native / OCP MXFP4 (``I8`` or ``U8`` ``[..., K/2]`` pairs, low nibble = even element, E8M0
    scale ``[..., K/32]``) -> MLX ``mxfp4``: the same bytes (lossless, no arithmetic)."""
    if packed.shape[-1] * 2 != scale.shape[-1] * MX_GROUP or packed.shape[:-1] != scale.shape[:-1]:
        raise MLXCodecError(f"{name}: MXFP4 weight {tuple(packed.shape)} and scale {tuple(scale.shape)} "
                            f"do not match (need [..., K/2] and [..., K/32])")
    return MLXPacked(packed.contiguous().view(torch.uint8), scale.contiguous().view(torch.uint8))


def nvfp4_encode(w: torch.Tensor, name: str = "tensor") -> MLXPacked:
    """MLX ``nvfp4`` without a tensor scale: E4M3 scale ``amax/6`` per 16 (round to nearest), E2M1 codes of
    ``w / scale`` (0 where the scale is 0)."""
    x = _groups(w.detach().to(torch.float32), NV_GROUP, name)
    amax = x.abs().amax(-1)
    if not bool(torch.isfinite(amax).all()):
        raise MLXCodecError(f"{name}: non-finite values cannot be quantized")
    s8 = (amax / 6.0).clamp(max=448.0).to(torch.float8_e4m3fn)
    s = s8.to(torch.float32)[..., None]
    q = torch.where(s == 0, torch.zeros_like(x), x / torch.where(s == 0, 1.0, s))
    codes = e2m1_encode_mlx(q).reshape(w.shape)
    return MLXPacked(pack_fp4(codes), s8.view(torch.uint8))


def encode(w: torch.Tensor, q: MLXQuant, dtype: torch.dtype, name: str = "tensor") -> MLXPacked:
    """Float ``w`` ``[..., K]`` -> MLX parts for ``q`` (``dtype``: the model dtype of affine scales)."""
    q.check()
    if q.mode is MLXMode.AFFINE:
        return affine_quantize(w, q.bits, q.group_size, dtype, name)
    if q.mode is MLXMode.MXFP4:
        return mxfp4_encode(w, name)
    return nvfp4_encode(w, name)


def decode(p: MLXPacked, q: MLXQuant) -> torch.Tensor:
    """MLX parts -> float32 values ``[..., K]`` (``scale * E2M1`` or ``scales * q + biases``, one rounding)."""
    codes = unpack_codes(p.weight, q.bits)
    g = q.group_size
    if q.mode is MLXMode.AFFINE:
        if p.biases is None:
            raise MLXCodecError("affine parts need biases")
        # in the scales' dtype, as MLX does (a bfloat16 model's weights are bfloat16: each op rounds)
        dt = p.scales.dtype
        x = codes.to(dt).reshape(*codes.shape[:-1], -1, g)
        out = x * p.scales[..., None] + p.biases.to(dt)[..., None]
        return out.reshape(codes.shape).to(torch.float32)
    sb = p.scales.view(torch.uint8)
    s = e8m0_to_float32(sb) if q.mode is MLXMode.MXFP4 else e4m3_to_float32(sb)
    return decode_fp4(pack_fp4(codes)) * s.repeat_interleave(g, -1)


def fits(q: MLXQuant, k: int) -> bool:
    """Whether a row length ``k`` can be stored with ``q`` (a whole number of groups)."""
    return k > 0 and k % q.group_size == 0
