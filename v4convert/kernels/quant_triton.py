"""Triton NVFP4 RTN quantization kernel; bit-identical to :func:`v4convert.kernels.quant.nvfp4_quantize_reference`
(same float32 operations in the same order; roundings done on bit patterns, divisions with ``div_rn``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4convert.formats.blocks import NVFP4_BLOCK

from .gemm import check_device
from .quant import NVFP4Form, check_quant_input, global_scale


@triton.jit
def _e4m3_rne(s):
    """float32 ``0 <= s <= 448`` -> (nearest E4M3 value, ties to even, as float32; its byte as int32)."""
    bits = s.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    rb = (bits + 0x7FFFF + lsb) & -1048576                       # keep 3 mantissa bits, round half to even
    byte_n = ((((rb >> 23) & 255) - 120) << 3) | ((rb >> 20) & 7)
    m = s * 512.0                                                 # subnormal units of 2**-9 (exact)
    fl = m.to(tl.int32)                                           # floor (m >= 0)
    frac = m - fl.to(tl.float32)
    q = fl + ((frac > 0.5) | ((frac == 0.5) & ((fl & 1) == 1))).to(tl.int32)
    sub = s < 0.015625                                            # below 2**-6: subnormal grid
    val = tl.where(sub, q.to(tl.float32) * 0.001953125, rb.to(tl.float32, bitcast=True))
    return val, tl.where(sub, q, byte_n)


@triton.jit
def _e2m1_rne(q):
    """float32 -> int32 E2M1 codes (bounds .25 .75 1.25 1.75 2.5 3.5 5; inclusive where the upper code is even)."""
    a = tl.abs(q)
    idx = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    sign = (q.to(tl.int32, bitcast=True) < 0).to(tl.int32)
    return idx | (sign << 3)


@triton.jit
def _nvfp4_quant_kernel(x_ptr, g_ptr, q_ptr, s_ptr, R, K, stride_xr, DIVISOR: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCKS: tl.constexpr):
    """Program: BLOCK_R rows x BLOCKS 16-blocks. Even/odd elements are loaded apart (low/high nibbles)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * (BLOCKS * 8) + tl.arange(0, BLOCKS * 8)      # byte index in the row
    mask = (rows < R)[:, None] & (2 * j < K)[None, :]
    base = x_ptr + rows[:, None].to(tl.int64) * stride_xr + 2 * j[None, :]
    xe = tl.reshape(tl.load(base, mask=mask, other=0.0).to(tl.float32), (BLOCK_R, BLOCKS, 8))
    xo = tl.reshape(tl.load(base + 1, mask=mask, other=0.0).to(tl.float32), (BLOCK_R, BLOCKS, 8))
    bamax = tl.maximum(tl.max(tl.abs(xe), axis=2), tl.max(tl.abs(xo), axis=2))   # [BLOCK_R, BLOCKS]
    g = tl.load(g_ptr)
    if DIVISOR:
        s = g * tl.math.div_rn(bamax, tl.full(bamax.shape, 6.0, tl.float32))
    else:
        s = tl.math.div_rn(bamax, tl.full(bamax.shape, 6.0, tl.float32) * g)
    ws, wbyte = _e4m3_rne(tl.minimum(s, 448.0))
    if DIVISOR:
        eff = tl.math.div_rn(ws, tl.full(ws.shape, 1.0, tl.float32) * g)
    else:
        eff = ws * g
    safe = tl.where(eff == 0.0, 1.0, eff)[:, :, None]
    ce = _e2m1_rne(tl.math.div_rn(xe, tl.broadcast_to(safe, xe.shape)))
    co = _e2m1_rne(tl.math.div_rn(xo, tl.broadcast_to(safe, xo.shape)))
    packed = tl.reshape(ce | (co << 4), (BLOCK_R, BLOCKS * 8))
    tl.store(q_ptr + rows[:, None].to(tl.int64) * (K // 2) + j[None, :], packed.to(tl.uint8), mask=mask)
    nb = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    smask = (rows < R)[:, None] & (nb * 16 < K)[None, :]
    tl.store(s_ptr + rows[:, None].to(tl.int64) * (K // 16) + nb[None, :], wbyte.to(tl.uint8), mask=smask)


def nvfp4_quantize_triton(x: torch.Tensor, form: NVFP4Form = NVFP4Form.COMPRESSED_TENSORS,
                          amax: torch.Tensor | None = None, name: str = "tensor"
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract and bytes as :func:`v4convert.kernels.quant.nvfp4_quantize_reference`."""
    own = check_quant_input(x, name)
    check_device(x, name)
    g = global_scale(own if amax is None else amax, form).to(x.device).reshape(1)
    r, k = x.shape
    x = x.contiguous()
    packed = torch.empty(r, k // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(r, k // NVFP4_BLOCK, dtype=torch.uint8, device=x.device)
    if r:
        block_r, blocks = 16, 8
        grid = (triton.cdiv(r, block_r), triton.cdiv(k // NVFP4_BLOCK, blocks))
        _nvfp4_quant_kernel[grid](x, g, packed, scale, r, k, x.stride(0), DIVISOR=form is NVFP4Form.COMPRESSED_TENSORS,
                                  BLOCK_R=block_r, BLOCKS=blocks)
    return packed, scale, g.reshape(())
