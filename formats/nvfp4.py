"""NVFP4: E2M1 codes in blocks of 16 along the last dim, an E4M3 scale per block, one FP32 scale.

Two on-disk conventions of the same numbers (DESIGN §4):

* ModelOpt: ``weight_scale_2 = amax / (6 * 448)``;
  ``weight_scale = e4m3(block_amax / (6 * weight_scale_2))``; value ``= code * (weight_scale * weight_scale_2)``.
* compressed-tensors: ``weight_global_scale = 448 * 6 / amax`` (the reciprocal);
  ``weight_scale = e4m3(weight_global_scale * (block_amax / 6))``; value ``= code * (weight_scale / weight_global_scale)``.

Each convention is computed in its own producer's order of float operations, so that our bytes
equal that producer's bytes (compressed-tensors: ``calculate_qparams`` + ``_quantize``;
ModelOpt: ``NVFP4QTensor``). An all-zero tensor gets global scale 1.0 (as compressed-tensors'
``generate_gparam``); an all-zero block gets block scale 0 and decodes to zeros (no NaN).

Scale choice (:class:`ScaleMethod`): RTN from the block amax; MSE search over clipping ratios per
block; "four over six" (arXiv 2512.02010): per block try max->6 and max->4 and keep the lower
squared error, with the global scale computed with 256 instead of 448 so that ``block_amax/4``
still fits E4M3.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .fp4 import (
    E2M1_MAX,
    BlockShapeError,
    CodecInputError,
    NonFiniteInputError,
    _e2m1_rounding_bounds,
    e2m1_encode,
    e2m1_lut,
    pack_fp4,
    unpack_fp4,
)
from .fp8 import E4M3_MAX, e4m3_to_float32

from .blocks import NVFP4_BLOCK  # noqa: F401 (re-exported)
FOUR_OVER_SIX_SCALE_MAX = 256.0  # E4M3 range used for the global scale by "four over six"
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ... 0.50
_E2M1_BOUNDS = _e2m1_rounding_bounds()


class NVFP4Convention(enum.Enum):
    """Which scale tensors a checkpoint stores (they are reciprocals of each other)."""

    MODELOPT = "modelopt"  # weight_scale_2 = amax / 2688
    COMPRESSED_TENSORS = "compressed-tensors"  # weight_global_scale = 2688 / amax


class ScaleMethod(enum.Enum):
    RTN = "rtn"
    MSE = "mse"
    FOUR_OVER_SIX = "four-over-six"


@dataclass(frozen=True)
class NVFP4Tensor:
    """One NVFP4-quantized tensor of logical shape ``shape = (..., K)``.

    ``packed``: uint8 ``[..., K/2]`` (low nibble = even element); ``block_scale``:
    ``float8_e4m3fn`` ``[..., K/16]``; ``global_scale``: float32 0-dim tensor, ``weight_scale_2``
    (ModelOpt) or ``weight_global_scale`` (compressed-tensors) according to ``convention``;
    ``amax``: float32 0-dim, the global amax the scales were derived from (None when read
    from disk, where it is not stored).
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    convention: NVFP4Convention
    amax: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    def effective_block_scale(self) -> torch.Tensor:
        """float32 ``[..., K/16]``: the factor each block's E2M1 values are multiplied by."""
        return _effective_scale(self.block_scale.float(), self.global_scale, self.convention)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nvfp4_dequantize(self, dtype)


def _effective_scale(ws: torch.Tensor, gscale: torch.Tensor, convention: NVFP4Convention) -> torch.Tensor:
    """ws float32 (E4M3 values) -> per-block factor in the convention's operation order."""
    if convention is NVFP4Convention.MODELOPT:
        return ws * gscale
    return ws / gscale


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> ``float8_e4m3fn``, round to nearest even, saturating at ±448 (never NaN)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def checked_amax(x: torch.Tensor, name: str) -> torch.Tensor:
    """float32 0-dim ``max|x|``; raises :class:`NonFiniteInputError` naming ``name`` on NaN/Inf.

    Use it to build the shared global amax of fused partners (gate/up; q/k/v).
    """
    if x.numel() == 0:
        raise CodecInputError(f"{name}: empty tensor {tuple(x.shape)}")
    amax = x.detach().abs().amax().float()
    if not bool(torch.isfinite(amax)):
        _raise_non_finite(x, name)
    return amax


def _raise_non_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    n_nan = int(torch.isnan(x).sum())
    raise NonFiniteInputError(
        f"{name}: {int(bad.sum())} non-finite values ({n_nan} NaN) in tensor of shape "
        f"{tuple(x.shape)}; refusing to quantize"
    )


def nvfp4_global_scale(
    amax: torch.Tensor, convention: NVFP4Convention, scale_max: float = E4M3_MAX
) -> torch.Tensor:
    """float32 0-dim global scale for a tensor (or fused group) whose ``max|x| = amax``.

    ``scale_max`` is 448 for RTN/MSE and 256 for four-over-six. amax 0 gives 1.0.
    """
    amax = amax.detach().float().reshape(())
    if convention is NVFP4Convention.MODELOPT:
        g = amax / (E2M1_MAX * scale_max)
    else:
        g = (scale_max * E2M1_MAX) / amax
    return torch.where(amax > 0, g, torch.ones_like(g))


def _block_scale(
    block_amax: torch.Tensor, gscale: torch.Tensor, convention: NVFP4Convention, target: float
) -> torch.Tensor:
    """E4M3 scale mapping ``block_amax`` onto E2M1 magnitude ``target`` (6, or 4 for 4/6)."""
    if convention is NVFP4Convention.MODELOPT:
        s = block_amax / (target * gscale)
    else:
        s = gscale * (block_amax / target)
    return e4m3_round(s)


def _encode_blocks(
    xb: torch.Tensor, ws: torch.Tensor, gscale: torch.Tensor, convention: NVFP4Convention, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """xb float32 ``[R, B, 16]``, ws e4m3 ``[R, B]`` -> (codes uint8 ``[R, B, 16]``, eff ``[R, B]``)."""
    eff = _effective_scale(ws.float(), gscale, convention)
    safe = torch.where(eff == 0, torch.ones_like(eff), eff)  # zero blocks: ±0 / 1 = ±0
    return e2m1_encode(xb / safe[..., None], name), eff


def _block_sq_error(xb: torch.Tensor, codes: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per block, float32 ``[R, B]``, in the dequantizer's arithmetic."""
    deq = e2m1_lut(device=xb.device)[codes.long()] * eff[..., None]
    return (deq - xb).square().sum(-1)


def nvfp4_quantize(
    x: torch.Tensor,
    *,
    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
    method: ScaleMethod = ScaleMethod.RTN,
    global_amax: torch.Tensor | float | None = None,
    clip_ratios: Sequence[float] = DEFAULT_CLIP_RATIOS,
    name: str = "tensor",
) -> NVFP4Tensor:
    """Quantize ``x`` ``[..., K]`` (any float dtype, any device; K % 16 == 0) to NVFP4.

    ``global_amax``: use this amax instead of ``max|x|`` for the global scale (fused partners share
    one); it must be >= ``max|x|``. ``clip_ratios`` (MSE only): block amax multipliers to try, the
    first is used on ties; it must contain 1.0 so the search is never worse than RTN.
    """
    if not x.is_floating_point():
        raise CodecInputError(f"{name}: NVFP4 quantize needs a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % NVFP4_BLOCK or x.shape[-1] == 0:
        raise BlockShapeError(
            f"{name}: NVFP4 needs the last dim to be a positive multiple of {NVFP4_BLOCK}, "
            f"got shape {tuple(x.shape)}"
        )
    xb = x.detach().to(torch.float32).reshape(-1, x.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = xb.abs().amax(-1)  # [R, B]; NaN propagates
    amax = block_amax.amax()
    if not bool(torch.isfinite(amax)):
        _raise_non_finite(x, name)
    if global_amax is not None:
        g_amax = torch.as_tensor(global_amax, dtype=torch.float32, device=x.device).reshape(())
        if not bool(torch.isfinite(g_amax)) or bool(g_amax < amax):
            raise CodecInputError(
                f"{name}: supplied global amax {float(g_amax)} is below the tensor's amax "
                f"{float(amax)} (or not finite)"
            )
        amax = g_amax

    scale_max = FOUR_OVER_SIX_SCALE_MAX if method is ScaleMethod.FOUR_OVER_SIX else E4M3_MAX
    gscale = nvfp4_global_scale(amax, convention, scale_max)

    if method is ScaleMethod.RTN:
        ws = _block_scale(block_amax, gscale, convention, E2M1_MAX)
        codes, _ = _encode_blocks(xb, ws, gscale, convention, name)
    elif method is ScaleMethod.FOUR_OVER_SIX:
        ws = _block_scale(block_amax, gscale, convention, E2M1_MAX)
        codes, eff = _encode_blocks(xb, ws, gscale, convention, name)
        ws4 = _block_scale(block_amax, gscale, convention, 4.0)
        codes4, eff4 = _encode_blocks(xb, ws4, gscale, convention, name)
        use4 = _block_sq_error(xb, codes4, eff4) < _block_sq_error(xb, codes, eff)
        ws = torch.where(use4, ws4.float(), ws.float()).to(torch.float8_e4m3fn)
        codes = torch.where(use4[..., None], codes4, codes)
    elif method is ScaleMethod.MSE:
        ratios = [float(r) for r in clip_ratios]
        if 1.0 not in ratios or any(not 0.0 < r <= 1.0 for r in ratios):
            raise CodecInputError(f"{name}: clip ratios must lie in (0, 1] and include 1.0, got {ratios}")
        ws = codes = best = None
        for r in ratios:
            ws_r = _block_scale(block_amax * r, gscale, convention, E2M1_MAX)
            codes_r, eff_r = _encode_blocks(xb, ws_r, gscale, convention, name)
            err = _block_sq_error(xb, codes_r, eff_r)
            if best is None:
                ws, codes, best = ws_r, codes_r, err
                continue
            better = err < best
            best = torch.where(better, err, best)
            ws = torch.where(better, ws_r.float(), ws.float()).to(torch.float8_e4m3fn)
            codes = torch.where(better[..., None], codes_r, codes)
    else:  # pragma: no cover - enum is closed
        raise CodecInputError(f"{name}: unknown scale method {method}")

    lead = tuple(x.shape[:-1])
    return NVFP4Tensor(
        packed=pack_fp4(codes.reshape(*lead, x.shape[-1])),
        block_scale=ws.reshape(*lead, x.shape[-1] // NVFP4_BLOCK),
        global_scale=gscale,
        convention=convention,
        amax=amax.reshape(()),
    )


def nvfp4_dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4 -> ``[..., K]`` values: ``E2M1[code] * eff[block]`` in float32, then ``dtype``."""
    codes = unpack_fp4(t.packed)
    vals = e2m1_lut(device=codes.device)[codes.long()]
    eff = t.effective_block_scale()
    out = vals.reshape(*eff.shape, NVFP4_BLOCK) * eff[..., None]
    return out.reshape(t.shape).to(dtype)


def nvfp4_from_stored(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    convention: NVFP4Convention,
    name: str = "tensor",
) -> NVFP4Tensor:
    """Wrap tensors read from a checkpoint (``weight_packed``/``weight``, ``weight_scale``,
    ``weight_global_scale``/``weight_scale_2``), checking dtypes and shapes."""
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    s = block_scale.view(torch.float8_e4m3fn) if block_scale.dtype == torch.uint8 else block_scale
    if p.dtype != torch.uint8 or s.dtype != torch.float8_e4m3fn:
        raise CodecInputError(f"{name}: NVFP4 needs uint8 packed + E4M3 scale, got {packed.dtype}, {block_scale.dtype}")
    if tuple(s.shape) != (*p.shape[:-1], p.shape[-1] * 2 // NVFP4_BLOCK) or (p.shape[-1] * 2) % NVFP4_BLOCK:
        raise BlockShapeError(f"{name}: NVFP4 scale shape {tuple(s.shape)} does not fit packed {tuple(p.shape)}")
    g = global_scale.detach().float().reshape(())
    return NVFP4Tensor(packed=p, block_scale=s, global_scale=g, convention=convention, amax=None)


# ---------------------------------------------------------------------------------------------
# Fast path: FP8 (E4M3) bytes x per-block factors -> packed NVFP4 codes, in fixed-size chunks.
#
# Measured on the 2-core AVX2 build machine (torch 2.13 inductor, single thread CPU time per
# 7168x2048 expert): inductor's own Float8->float conversion is scalar-ish (76 ms) and bit casts
# inside a compiled graph are scalar (260-350 ms), so the E4M3 -> FP16 re-bias is a separate small
# integer kernel (E4M3 magnitude bits << 7 are the FP16 bits of value / 256, subnormals included),
# the view as float16 happens between kernels (free), and FP16 -> FP32 uses F16C. Packing views
# the uint8 codes as int16 pairs (little endian: low byte = even element).
# ---------------------------------------------------------------------------------------------

FAST_CHUNK_BLOCKS = 1 << 18  # 16-blocks per chunk (4 Mi elements): bounds temporaries to ~20 MiB


class Backend(enum.Enum):
    AUTO = "auto"  # compiled on CPU for large tensors, eager otherwise
    EAGER = "eager"
    COMPILED = "compiled"


def _fp8_to_half_bits(raw: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 bytes -> int16 FP16 bit patterns of ``value / 256`` (exact for all non-NaN)."""
    b = raw.to(torch.int16)
    return ((b & 0x80) << 8) | ((b & 0x7F) << 7)


def _codes_from_half(h: torch.Tensor, s16: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """float16 ``[M, 16]`` (fp8 / 256), float32 ``[M, 1]`` block factors -> uint8 E2M1 codes.

    ``q = (fp8 * s16) / eff`` in float32 exactly as :func:`nvfp4_quantize` after
    :func:`fp8_block_dequantize`; the ``where`` chain is :func:`e2m1_encode`'s bounds.
    """
    hf = h.float()
    q = ((hf * 256.0) * s16) / eff
    a = q.abs()
    idx = torch.zeros_like(a)
    for code, (bound, inclusive) in enumerate(_E2M1_BOUNDS, start=1):
        idx = torch.where((a >= bound) if inclusive else (a > bound), float(code), idx)
    neg = torch.copysign(torch.ones_like(hf), hf) < 0  # keeps -0.0 (byte 0x80) -> code 8
    return torch.where(neg, idx + 8.0, idx).to(torch.uint8)


def _fp8_mag_block_max(raw: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 bytes ``[M, 16]`` -> int16 ``[M]``: largest magnitude byte (``b & 0x7F``) per block."""
    return (raw.to(torch.int16) & 0x7F).amax(-1)


def _pack_pairs(codes_i16: torch.Tensor) -> torch.Tensor:
    """int16 view of uint8 codes (low byte = even element) -> packed uint8."""
    return (codes_i16 | (codes_i16 >> 4)).to(torch.uint8)


def _block_amax_from_mag(mag_max: torch.Tensor, s16: torch.Tensor, lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 max magnitude byte per 16-block, float32 FP8 scale per 16-block -> (block amax, amax)."""
    block_amax = lut[mag_max.long()] * s16
    return block_amax, block_amax.amax()


def _scales_modelopt(block_amax: torch.Tensor, gscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _scales_and_safe_eff(block_amax, gscale, NVFP4Convention.MODELOPT)


def _scales_ct(block_amax: torch.Tensor, gscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _scales_and_safe_eff(block_amax, gscale, NVFP4Convention.COMPRESSED_TENSORS)


def _scales_and_safe_eff(
    block_amax: torch.Tensor, gscale: torch.Tensor, convention: NVFP4Convention
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN E4M3 block scales and their float32 factors (zeros replaced by 1 for division)."""
    ws = _block_scale(block_amax, gscale, convention, E2M1_MAX)
    eff = _effective_scale(ws.float(), gscale, convention)
    return ws, torch.where(eff == 0, torch.ones_like(eff), eff)


def nvfp4_rtn_scales_from_block_amax(
    block_amax: torch.Tensor, gscale: torch.Tensor, convention: NVFP4Convention, *, backend: Backend = Backend.AUTO
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 block scales, float32 safe factors) for RTN, as :func:`nvfp4_quantize` computes them."""
    if _use_compiled(backend, block_amax):
        fn = _compiled("scales_mo" if convention is NVFP4Convention.MODELOPT else "scales_ct")
        return fn(block_amax, gscale)
    return _scales_and_safe_eff(block_amax, gscale, convention)


def fp8_block_amax_from_mag(
    mag_max: torch.Tensor, s16: torch.Tensor, *, backend: Backend = Backend.AUTO
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max magnitude byte per 16-block and FP8 scale per 16-block -> (float32 block amax, amax).

    Exact: rounding ``fp8 * s`` (s >= 0) is monotonic in ``|fp8|``.
    """
    lut = e4m3_to_float32(torch.arange(128, dtype=torch.uint8, device=mag_max.device))
    fn = _compiled("amax") if _use_compiled(backend, mag_max) else _block_amax_from_mag
    return fn(mag_max, s16, lut)


@functools.lru_cache(maxsize=None)
def _compiled(fn_name: str):  # noqa: ANN202 - returns a torch.compile wrapper
    fns = {"half": _fp8_to_half_bits, "codes": _codes_from_half, "pack": _pack_pairs, "magmax": _fp8_mag_block_max,
           "amax": _block_amax_from_mag, "scales_mo": _scales_modelopt, "scales_ct": _scales_ct}
    return torch.compile(fns[fn_name], dynamic=True)


def _use_compiled(backend: Backend, t: torch.Tensor) -> bool:
    if backend is Backend.AUTO:
        return t.device.type == "cpu" and t.numel() >= (1 << 16)
    return backend is Backend.COMPILED


def fp8_block_mag_max(raw: torch.Tensor, *, backend: Backend = Backend.AUTO) -> torch.Tensor:
    """E4M3 bytes ``[N, K]`` (uint8, K % 16 == 0) -> uint8 ``[N, K/16]`` largest magnitude byte per
    16-block. E4M3 magnitude is monotonic in ``byte & 0x7F`` (0x7F is NaN)."""
    n, k = raw.shape
    m = n * (k // NVFP4_BLOCK)
    rb = raw.reshape(m, NVFP4_BLOCK)
    fn = _compiled("magmax") if _use_compiled(backend, raw) else _fp8_mag_block_max
    out = torch.empty(m, dtype=torch.int16, device=raw.device)
    for a in range(0, m, FAST_CHUNK_BLOCKS):
        b = min(m, a + FAST_CHUNK_BLOCKS)
        out[a:b] = fn(rb[a:b])
    return out.to(torch.uint8).reshape(n, k // NVFP4_BLOCK)


def encode_fp8_blocks_to_packed(
    raw: torch.Tensor, s16: torch.Tensor, eff: torch.Tensor, *, backend: Backend = Backend.AUTO
) -> torch.Tensor:
    """E4M3 bytes ``[N, K]`` (uint8), FP8 scale per 16-block ``s16`` and NVFP4 factor ``eff``
    (float32 ``[N, K/16]``, zeros already replaced by 1) -> packed NVFP4 codes uint8 ``[N, K/2]``.

    Codes equal ``e2m1_encode((fp8 * s16) / eff)`` exactly, on every backend.
    """
    n, k = raw.shape
    m = n * (k // NVFP4_BLOCK)
    rb = raw.reshape(m, NVFP4_BLOCK)
    sb = s16.reshape(m, 1)
    eb = eff.reshape(m, 1)
    out = torch.empty(m, NVFP4_BLOCK // 2, dtype=torch.uint8, device=raw.device)
    compiled = _use_compiled(backend, raw)
    half_k = _compiled("half") if compiled else _fp8_to_half_bits
    codes_k = _compiled("codes") if compiled else _codes_from_half
    pack_k = _compiled("pack") if compiled else _pack_pairs
    for a in range(0, m, FAST_CHUNK_BLOCKS):
        b = min(m, a + FAST_CHUNK_BLOCKS)
        h = half_k(rb[a:b]).view(torch.float16)
        codes = codes_k(h, sb[a:b], eb[a:b])
        out[a:b] = pack_k(codes.view(torch.int16))
    return out.reshape(n, k // 2)
