"""MXFP4 (OCP MX v1.0): E2M1 codes in blocks of 32 along the last dim, one E8M0 scale per block.

Value ``= E2M1[code] * 2**(e - 127)`` with ``e`` the E8M0 byte (bias 127, 0xFF = NaN). This is
DeepSeek V4's native expert format: ``I8 [out, in/2]`` (two codes per byte, low nibble = even
element) plus ``F8_E8M0 [out, in/32]`` ``.scale`` (DESIGN §3, §4).

Scale rules (:class:`MXScaleRule`), for a block with ``amax = max|x|``:

* ``OCP_FLOOR``: ``e = floor(log2 amax) - 2`` (OCP MX v1.0 §6.3); values above 6 saturate.
* ``ROUND_UP``: ``e = ceil(log2(amax / 6))``, the smallest power of two that clips nothing.

Exponents are computed exactly from the float32 bit pattern (``frexp``), never with ``log2``.
An all-zero block gets byte 127 (scale 1); exponents are clamped to [-127, 125] (below: E8M0's
range; above: 6 * 2**126 would decode to inf in float32, so ROUND_UP clips blocks past 2e38).

:func:`mxfp4_to_nvfp4` re-packs MXFP4 into NVFP4 without re-rounding where it can, and counts
the 16-blocks whose values it could not keep exactly (checked, not assumed).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .fp4 import BlockShapeError, CodecInputError, E2M1_MAX, e2m1_encode, e2m1_lut, pack_fp4, unpack_fp4
from .fp8 import E8M0_BIAS, E8M0_NAN, e8m0_to_float32
from .nvfp4 import (
    NVFP4_BLOCK,
    NVFP4Convention,
    NVFP4Tensor,
    _block_scale,
    _effective_scale,
    _raise_non_finite,
    e4m3_round,
    nvfp4_dequantize,
)

from .blocks import MXFP4_BLOCK
E8M0_MIN_EXP = -127  # byte 0
E8M0_MAX_EXP = 127  # byte 254 (255 is NaN)
MX_MAX_FINITE_EXP = 125  # 6 * 2**125 is the largest block maximum that decodes finite in float32
E4M3_POW2_MIN_EXP = -9  # smallest E4M3 power of two (subnormal 2**-9)
E4M3_POW2_MAX_EXP = 8  # largest E4M3 power of two (256; 448 is not a power of two)


class MXScaleRule(enum.Enum):
    """The E8M0 exponent rule (values are quantize's ``--mx-rule`` spellings)."""
    OCP_FLOOR = "floor"        # OCP MX v1.0: floor(log2 amax) - emax of E2M1 (may clip the block max)
    ROUND_UP = "round-up"      # smallest exponent with no clipping
    FLOOR = "floor"            # alias of OCP_FLOOR (the CLI's name)


@dataclass(frozen=True)
class MXFP4Tensor:
    """``packed`` uint8 ``[..., K/2]`` (low nibble = even element); ``scale`` uint8 E8M0 bytes
    ``[..., K/32]``."""

    packed: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mxfp4_dequantize(self, dtype)

    def to_deepseek_native(self) -> dict[str, torch.Tensor]:
        """V4 layout: ``weight`` int8 ``[out, in/2]``, ``scale`` ``float8_e8m0fnu`` ``[out, in/32]``."""
        return {"weight": self.packed.view(torch.int8), "scale": self.scale.view(torch.float8_e8m0fnu)}


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2 a)`` as int32 for finite ``a > 0`` (float32, subnormals included)."""
    _, e = torch.frexp(a.double())  # a = m * 2**e, m in [0.5, 1)
    return (e - 1).to(torch.int32)


def mxfp4_block_exponents(block_amax: torch.Tensor, rule: MXScaleRule) -> torch.Tensor:
    """Unbiased int32 block exponents (clamped to [-127, 127]); zero blocks get 0."""
    a = block_amax.double()
    pos = a > 0
    safe = torch.where(pos, a, torch.ones_like(a))
    e = _floor_log2(safe) - 2  # 4 * 2**e <= amax < 8 * 2**e
    if rule is MXScaleRule.ROUND_UP:
        e = e + (safe > torch.ldexp(torch.full_like(safe, E2M1_MAX), e)).to(torch.int32)
    e = torch.where(pos, e, torch.zeros_like(e))
    # ROUND_UP of amax > 6 * 2**125 would give 2**126, whose 6 * 2**126 overflows float32 on
    # decode; cap there (such a block then clips, as OCP_FLOOR does for every block).
    return e.clamp(E8M0_MIN_EXP, MX_MAX_FINITE_EXP)


# Exponent steps the block-scale search tries around the rule's ``e`` (first = the rule's own, wins ties):
# e - 1 clips the block max harder (finer grid), e + 1 never clips (coarser grid).
MX_SEARCH_STEPS = (0, -1, 1)


def mxfp4_search_exponents(xb: torch.Tensor, e: torch.Tensor, weight: torch.Tensor | None = None,
                           steps: tuple[int, ...] = MX_SEARCH_STEPS) -> torch.Tensor:
    """Per block the exponent among ``e + s`` (``s`` in ``steps``, clamped to the finite range) with the least
    ``sum_j weight_j (x_j - q_j)^2`` (``weight`` float32 ``[32 * nb]`` per element of the last dim, None = 1:
    plain squared error); ties keep the earlier step. ``xb`` float32 ``[R, nb, 32]``, ``e`` int32 ``[R, nb]``
    -> int32 ``[R, nb]``. Zero blocks keep ``e`` (every candidate errs 0)."""
    lut = e2m1_lut(device=xb.device)
    wb = None if weight is None else weight.to(torch.float32).reshape(1, -1, MXFP4_BLOCK)
    best_e, best = e, None
    for s in steps:
        c = (e + s).clamp(E8M0_MIN_EXP, MX_MAX_FINITE_EXP)
        sc = c[..., None].to(torch.float32)
        deq = torch.ldexp(lut[e2m1_encode(torch.ldexp(xb, -sc)).long()], sc)
        d2 = (xb - deq).square()
        err = (d2 if wb is None else d2 * wb).sum(-1)
        if best is None:
            best_e, best = c, err
        else:
            better = err < best
            best_e, best = torch.where(better, c, best_e), torch.where(better, err, best)
    return best_e


def mxfp4_quantize(
    x: torch.Tensor, *, rule: MXScaleRule = MXScaleRule.OCP_FLOOR, name: str = "tensor", mse: bool = False
) -> MXFP4Tensor:
    """Quantize ``x`` ``[..., K]`` (K % 32 == 0, any float dtype/device) to MXFP4. ``mse``: each block's
    exponent is the rule's ``e`` or ``e -/+ 1``, whichever has the least squared error
    (:func:`mxfp4_search_exponents`; same format, the data-free ``--method mse``)."""
    if not x.is_floating_point():
        raise CodecInputError(f"{name}: MXFP4 quantize needs a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % MXFP4_BLOCK or x.shape[-1] == 0:
        raise BlockShapeError(
            f"{name}: MXFP4 needs the last dim to be a positive multiple of {MXFP4_BLOCK}, "
            f"got shape {tuple(x.shape)}"
        )
    xb = x.detach().to(torch.float32).reshape(-1, x.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    block_amax = xb.abs().amax(-1)
    if not bool(torch.isfinite(block_amax).all()):
        _raise_non_finite(x, name)
    e = mxfp4_block_exponents(block_amax, rule)
    if mse:
        e = mxfp4_search_exponents(xb, e)
    # x / 2**e is exact (power-of-two scaling of values < 8 * 2**e); E2M1 rounding saturates.
    q = torch.ldexp(xb, (-e)[..., None].to(torch.float32))
    codes = e2m1_encode(q, name)
    lead = tuple(x.shape[:-1])
    return MXFP4Tensor(
        packed=pack_fp4(codes.reshape(*lead, x.shape[-1])),
        scale=(e + E8M0_BIAS).to(torch.uint8).reshape(*lead, x.shape[-1] // MXFP4_BLOCK),
    )


def mxfp4_dequantize(t: MXFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 -> ``[..., K]`` values ``E2M1[code] * 2**(e-127)`` (float32 math, then ``dtype``)."""
    codes = unpack_fp4(t.packed)
    vals = e2m1_lut(device=codes.device)[codes.long()]
    s = e8m0_to_float32(t.scale)
    out = vals.reshape(*s.shape, MXFP4_BLOCK) * s[..., None]
    return out.reshape(t.shape).to(dtype)


def mxfp4_from_deepseek_native(
    weight: torch.Tensor, scale: torch.Tensor, name: str = "tensor", *, check_nan: bool = True
) -> MXFP4Tensor:
    """Wrap a V4 expert as stored: ``weight`` I8/U8 ``[out, in/2]``, ``scale`` F8_E8M0/U8 ``[out, in/32]``.
    ``check_nan=False``: skip the scan for byte 0xFF (the native re-pack finds it in its own pass)."""
    p = weight.view(torch.uint8) if weight.dtype == torch.int8 else weight
    s = scale.view(torch.uint8) if scale.dtype in (torch.float8_e8m0fnu, torch.int8) else scale
    if p.dtype != torch.uint8 or s.dtype != torch.uint8:
        raise CodecInputError(f"{name}: MXFP4 needs I8/U8 codes and E8M0 scales, got {weight.dtype}, {scale.dtype}")
    if tuple(s.shape) != (*p.shape[:-1], p.shape[-1] * 2 // MXFP4_BLOCK) or (p.shape[-1] * 2) % MXFP4_BLOCK:
        raise BlockShapeError(f"{name}: MXFP4 scale shape {tuple(s.shape)} does not fit codes {tuple(p.shape)}")
    if check_nan and bool((s == E8M0_NAN).any()):
        raise CodecInputError(f"{name}: E8M0 scale byte 0xFF (NaN) present")
    return MXFP4Tensor(packed=p, scale=s)


@dataclass(frozen=True)
class RepackReport:
    """How an MXFP4 -> NVFP4 re-pack went, counted by comparing decoded values."""

    blocks: int  # NVFP4 16-blocks in the tensor
    inexact_blocks: int  # 16-blocks whose NVFP4 values differ from the MXFP4 values
    max_abs_error: float  # over the whole tensor (0.0 when exact)
    global_exponent: int  # NVFP4 global scale is 2**global_exponent (ModelOpt form)

    @property
    def exact(self) -> bool:
        return self.inexact_blocks == 0


def mxfp4_to_nvfp4(
    t: MXFP4Tensor,
    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
    name: str = "tensor",
) -> tuple[NVFP4Tensor, RepackReport]:
    """Re-pack MXFP4 as NVFP4 with a power-of-two global scale, keeping values where possible.

    Each 16-half-block with values ``v = c * 2**e`` gets block scale ``2**(t - g)`` where
    ``t = ceil(log2(max|v| / 6))`` (v / 2**t stays on the E2M1 grid: it is ``c`` times a power of
    two that keeps it <= 6) and ``g = max(t) - 8`` so the largest block scale is 256, the largest
    E4M3 power of two. Blocks with ``t - g < -9`` fall below E4M3's smallest power of two: they
    get 2**-9 if that still encodes them exactly, otherwise the RTN NVFP4 scale of their values;
    every block is then checked by decoding and counted in the report. (The RTN scale of such a block
    rounds to 0 and never has the lower error: ``v4convert/kernels/native/mxfp4_nvfp4.c`` has the argument.)
    """
    v = mxfp4_dequantize(t)  # exact float32 (2**-127 * 6 etc. are representable)
    k = v.shape[-1]
    vb = v.reshape(-1, k // NVFP4_BLOCK, NVFP4_BLOCK)
    hb_amax = vb.abs().amax(-1)
    nz = hb_amax > 0
    tt = mxfp4_block_exponents(hb_amax, MXScaleRule.ROUND_UP)  # int32 [R, B]
    g = int(tt[nz].max()) - E4M3_POW2_MAX_EXP if bool(nz.any()) else 0
    g = max(-126, min(126, g))  # 2**g and 2**-g must both be normal float32
    rel = (tt - g).clamp(min=E4M3_POW2_MIN_EXP)
    ws_pow2 = torch.where(nz, torch.ldexp(torch.ones_like(hb_amax), rel.float()), torch.zeros_like(hb_amax))
    ws_pow2 = e4m3_round(ws_pow2)  # exact: 2**-9 .. 2**8 are E4M3 values
    g_t = torch.ldexp(torch.ones((), dtype=torch.float32, device=v.device), torch.tensor(float(g), device=v.device))
    gscale = g_t if convention is NVFP4Convention.MODELOPT else torch.reciprocal(g_t)  # exact: power of two

    def encode(ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eff = _effective_scale(ws.float(), gscale, convention)
        safe = torch.where(eff == 0, torch.ones_like(eff), eff)
        codes = e2m1_encode(vb / safe[..., None], name)
        deq = e2m1_lut(device=v.device)[codes.long()] * eff[..., None]
        return codes, deq

    codes, deq = encode(ws_pow2)
    exact = (deq == vb).all(-1)
    ws = ws_pow2
    if not bool(exact.all()):
        ws_rtn = _block_scale(hb_amax, gscale, convention, E2M1_MAX)
        codes_rtn, deq_rtn = encode(ws_rtn)
        err_p = (deq - vb).square().sum(-1)
        err_r = (deq_rtn - vb).square().sum(-1)
        use_rtn = ~exact & (err_r < err_p)
        ws = torch.where(use_rtn, ws_rtn.float(), ws_pow2.float()).to(torch.float8_e4m3fn)
        codes = torch.where(use_rtn[..., None], codes_rtn, codes)

    lead = tuple(v.shape[:-1])
    g_amax = hb_amax.amax() if hb_amax.numel() else torch.zeros((), device=v.device)
    out = NVFP4Tensor(
        packed=pack_fp4(codes.reshape(*lead, k)),
        block_scale=ws.reshape(*lead, k // NVFP4_BLOCK),
        global_scale=gscale,
        convention=convention,
        amax=g_amax.float().reshape(()),
    )
    back = nvfp4_dequantize(out).reshape(vb.shape)  # verify with the real decoder
    diff = (back - vb).abs()
    report = RepackReport(
        blocks=int(vb.shape[0] * vb.shape[1]),
        inexact_blocks=int((diff > 0).any(-1).sum()),
        max_abs_error=float(diff.max()) if diff.numel() else 0.0,
        global_exponent=g,
    )
    return out, report


def mxfp4_to_nvfp4_parts(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
    name: str = "tensor",
) -> tuple[list[NVFP4Tensor], RepackReport]:
    """:func:`mxfp4_to_nvfp4` of fused partners (V4-native codes ``[n_i, K/2]`` + E8M0 scales ``[n_i, K/32]``)
    concatenated along rows, so they share one global scale; returns one NVFP4Tensor per part."""
    packed = torch.cat([p.view(torch.uint8) if p.dtype == torch.int8 else p for p, _ in parts])
    scale = torch.cat([s.view(torch.uint8) if s.dtype in (torch.float8_e8m0fnu, torch.int8) else s for _, s in parts])
    q, rep = mxfp4_to_nvfp4(mxfp4_from_deepseek_native(packed, scale, name), convention, name)
    outs, r0 = [], 0
    for p, _ in parts:
        n = p.shape[0]
        outs.append(NVFP4Tensor(packed=q.packed[r0:r0 + n].contiguous(), block_scale=q.block_scale[r0:r0 + n].contiguous(),
                                global_scale=q.global_scale, convention=convention, amax=q.amax))
        r0 += n
    return outs, rep
