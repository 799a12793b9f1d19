"""4-bit integer block quantization in onnxruntime's ``MatMulNBits`` / ``QMoE`` layout (no zero points).

Codes are unsigned 4-bit ``q in [0, 15]`` with the implicit zero point 8 of both ops (their default when the
``zero_points`` input is omitted): ``w ~= (q - 8) * scale``. Blocks of ``block`` elements run along K (the
input-feature dim of a ``[N, K]`` weight); a K that is not a multiple of ``block`` is zero-padded to whole blocks
(MatMulNBits' ``k_blocks = ceil(K / block)``). Packing: two codes per byte, element ``2j`` in the low nibble
(onnxruntime ``MatMulNBits`` doc: "the first 4 bits are stored in the lower 4 bits of a byte").

Rounding (RTN, symmetric): ``scale = amax(|w_block|) / 7``, ``q = clamp(round_half_even(w / scale), -8, 7) + 8``;
an all-zero block gets scale 0 (codes 8). This is the whole recipe: no calibration, no MSE search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ZERO_POINT = 8          # implicit 4-bit zero point of MatMulNBits / QMoE
Q_MAX = 7               # largest positive code offset


@dataclass(frozen=True)
class Int4Blocks:
    """``codes`` uint8 ``[N, k_blocks, block // 2]`` (packed pairs), ``scales`` float32 ``[N, k_blocks]``."""
    codes: torch.Tensor
    scales: torch.Tensor
    k: int
    block: int


def quantize_int4(w: torch.Tensor, block: int) -> Int4Blocks:
    """RTN-quantize ``w [N, K]`` (float) per ``block`` along K; see the module doc for the exact rule.

    One float temporary of ``w``'s size (the scaled values, rounded and clamped in place); no padding copy when
    ``K`` is a multiple of ``block``."""
    N, K = w.shape
    pad = (-K) % block
    wf = w.float()
    if pad:
        wf = torch.nn.functional.pad(wf, (0, pad))
    wf = wf.reshape(N, (K + pad) // block, block)
    scale = torch.maximum(wf.amax(-1), wf.amin(-1).neg_()).div_(Q_MAX)                       # [N, k_blocks]
    inv = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.div(wf, inv[..., None]).round_().clamp_(-8, Q_MAX).add_(ZERO_POINT).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return Int4Blocks(packed.contiguous(), scale.contiguous(), K, block)


def dequantize_int4(b: Int4Blocks) -> torch.Tensor:
    """The float32 ``[N, K]`` weight that onnxruntime computes with: ``(q - 8) * scale``."""
    lo, hi = b.codes & 0x0F, b.codes >> 4
    q = torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.float32) - ZERO_POINT   # [N, k_blocks, block]
    return (q * b.scales[..., None]).flatten(1)[:, : b.k]


def fake_quant_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """``dequantize_int4(quantize_int4(w, block))``: the exact weight an int4 export runs with."""
    return dequantize_int4(quantize_int4(w, block))
