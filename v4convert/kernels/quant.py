"""NVFP4 round-to-nearest quantization of a tensor ``[R, K]`` (K % 16 == 0): the PyTorch reference and the
dispatch to the Triton kernel (:mod:`.quant_triton`, bit-identical).

Arithmetic, in float32 and in this order (the producers' own orders, DESIGN §4, so that the bytes equal
ModelOpt's / compressed-tensors' and ``v4convert.formats.nvfp4`` RTN):

* global scale ``g``: ModelOpt ``amax / 2688`` (multiplier), compressed-tensors ``2688 / amax`` (divisor);
  ``amax == 0`` -> 1;
* block scale ``ws = e4m3_rne(min(s, 448))`` with ``s = bamax / (6 * g)`` (ModelOpt) or ``g * (bamax / 6)``
  (c-t), ``bamax`` = max |x| of the 16-block;
* ``eff = ws * g`` (ModelOpt) or ``ws / g`` (c-t); codes ``e2m1_rne(x / eff)`` (``eff == 0``: ``x / 1``),
  ties to even, saturating at 6, sign kept for negative zeros.

Outputs: packed uint8 ``[R, K/2]`` (low nibble = even element), block scales uint8 E4M3 bytes ``[R, K/16]``,
global scale float32 0-dim (in the form's own convention).
"""
from __future__ import annotations


import torch

from v4convert.formats import fp4
from v4convert.formats.fp8 import E4M3_MAX
from v4convert.formats.nvfp4 import NVFP4Convention
from v4convert.formats.blocks import NVFP4_BLOCK

from .packed import PackedWeightError


# Which global scale is produced (they are reciprocals): MODELOPT weight_scale_2 = amax / (6 * 448), a multiplier;
# COMPRESSED_TENSORS weight_global_scale = 6 * 448 / amax, a divisor. One enum with the codec's.
NVFP4Form = NVFP4Convention


def global_scale(amax: torch.Tensor, form: NVFP4Form) -> torch.Tensor:
    """float32 0-dim global scale for ``max|x| = amax`` (1.0 when amax is 0)."""
    a = amax.detach().float().reshape(())
    g = a / (fp4.E2M1_MAX * E4M3_MAX) if form is NVFP4Form.MODELOPT else (E4M3_MAX * fp4.E2M1_MAX) / a
    return torch.where(a > 0, g, torch.ones_like(g))


def e2m1_encode_reference(q: torch.Tensor) -> torch.Tensor:
    """float32 -> uint8 E2M1 codes, nearest with ties to even, saturating; bounds from ``fp4.E2M1_VALUES``."""
    mags = fp4.E2M1_VALUES[:8]
    a = q.abs()
    idx = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for i in range(7):
        mid = (mags[i] + mags[i + 1]) / 2
        idx += (a >= mid) if (i + 1) % 2 == 0 else (a > mid)     # a tie goes to the even code
    return idx | (torch.signbit(q).to(torch.uint8) << 3)


def check_quant_input(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x [R, K]`` floating, K a positive multiple of 16, finite; returns its float32 amax (0-dim)."""
    if x.dim() != 2 or x.shape[1] == 0 or x.shape[1] % NVFP4_BLOCK:
        raise PackedWeightError(f"{name}: NVFP4 quantization needs [R, K] with K a multiple of {NVFP4_BLOCK}, "
                                f"got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PackedWeightError(f"{name}: NVFP4 quantization needs float32/bfloat16/float16, got {x.dtype}")
    amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    if not bool(torch.isfinite(amax)):
        raise PackedWeightError(f"{name}: non-finite values in tensor of shape {tuple(x.shape)}; refusing to quantize")
    return amax


def nvfp4_quantize_reference(x: torch.Tensor, form: NVFP4Form = NVFP4Form.COMPRESSED_TENSORS,
                             amax: torch.Tensor | None = None, name: str = "tensor"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch NVFP4 RTN: ``(packed [R, K/2], block_scale_bytes [R, K/16], global_scale)``.

    ``amax`` overrides the tensor's own max (fused partners share one global scale)."""
    own = check_quant_input(x, name)
    g = global_scale(own if amax is None else amax, form)
    r, k = x.shape
    xb = x.float().reshape(r, k // NVFP4_BLOCK, NVFP4_BLOCK)
    bamax = xb.abs().amax(-1)
    s = bamax / (fp4.E2M1_MAX * g) if form is NVFP4Form.MODELOPT else g * (bamax / fp4.E2M1_MAX)
    ws = s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)          # torch's cast: nearest, ties to even
    eff = ws.float() * g if form is NVFP4Form.MODELOPT else ws.float() / g
    safe = torch.where(eff == 0, torch.ones_like(eff), eff)
    codes = e2m1_encode_reference(xb / safe[..., None]).reshape(r, k)
    return fp4.pack_fp4(codes), ws.view(torch.uint8), g


def nvfp4_quantize(x: torch.Tensor, form: NVFP4Form = NVFP4Form.COMPRESSED_TENSORS,
                   amax: torch.Tensor | None = None, name: str = "tensor"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 RTN of ``x [R, K]``: the Triton kernel on CUDA, the reference on CPU (identical bytes)."""
    if x.is_cuda:
        from .quant_triton import nvfp4_quantize_triton
        return nvfp4_quantize_triton(x, form, amax, name)
    return nvfp4_quantize_reference(x, form, amax, name)
