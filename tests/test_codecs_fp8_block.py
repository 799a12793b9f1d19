"""FP8 block codec (E4M3 + F32 / power-of-two / E8M0 128x128 scales) and the fused FP8 -> NVFP4 path."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from v4convert.formats.fp4 import BlockShapeError, CodecInputError, NonFiniteInputError
from v4convert.formats.fp8 import e4m3_to_float32
from v4convert.formats.fp8_block import (
    FP8BlockTensor,
    FP8ScaleFormat,
    fp8_block_dequantize,
    fp8_block_from_stored,
    fp8_block_quantize,
    fp8_block_to_nvfp4,
)
from v4convert.formats.nvfp4 import Backend, NVFP4Convention, nvfp4_quantize

SHAPES = [(576, 200), (3, 96), (200, 160), (256, 384)]
NV_SHAPES = [(576, 208), (3, 96), (200, 160), (256, 384)]  # K % 16 == 0, partial 128-blocks


def sample(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))


def numpy_fp8_block(x: torch.Tensor, fmt: FP8ScaleFormat) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: per-block amax in numpy, E4M3 rounding by ml_dtypes."""
    xn = x.numpy().astype(np.float32)
    n, k = xn.shape
    bn, bk = -(-n // 128), -(-k // 128)
    s = np.ones((bn, bk), dtype=np.float32)
    for i in range(bn):
        for j in range(bk):
            a = np.abs(xn[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()
            if a == 0:
                continue
            if fmt is FP8ScaleFormat.F32:
                s[i, j] = np.float32(a / np.float32(448.0))
            else:
                s[i, j] = np.float32(2.0 ** np.ceil(np.log2(np.float64(a) / 448.0)))
    full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    q = np.clip(xn / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q.view(np.uint8), s


def test_all_256_e4m3_bytes_decode() -> None:
    b = torch.arange(256, dtype=torch.uint8)
    ours = e4m3_to_float32(b)
    ml = b.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(ours.numpy(), ml, equal_nan=True)
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(b.view(torch.float8_e4m3fn).float()))


@pytest.mark.parametrize("fmt", list(FP8ScaleFormat))
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_independent_reference(fmt: FP8ScaleFormat, shape: tuple[int, int]) -> None:
    x = sample(shape, seed=shape[0] * 7 + shape[1])
    x[:128, :128] = 0.0  # an all-zero block -> scale 1.0, zero weights
    t = fp8_block_quantize(x, fmt=fmt, name="w")
    q, s = numpy_fp8_block(x, fmt)
    assert t.weight.dtype == torch.float8_e4m3fn and t.weight.shape == shape
    assert np.array_equal(t.weight.view(torch.uint8).numpy(), q)
    assert np.array_equal(t.scale_f32().numpy(), s)
    if fmt is FP8ScaleFormat.E8M0:
        assert t.scale.dtype == torch.float8_e8m0fnu
        assert np.array_equal(t.scale.view(torch.uint8).numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32), s)
    else:
        assert t.scale.dtype == torch.float32
    # dequant: fp8 * scale[i // 128, j // 128], float32
    full = np.repeat(np.repeat(s, 128, 0), 128, 1)[: shape[0], : shape[1]]
    expect = q.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * full
    assert np.array_equal(fp8_block_dequantize(t).numpy(), expect)


def test_power_of_two_scales_never_clip() -> None:
    x = sample((300, 260), seed=1)
    for fmt in (FP8ScaleFormat.F32_POW2, FP8ScaleFormat.E8M0):
        t = fp8_block_quantize(x, fmt=fmt)
        s = t.scale_f32()
        bam = torch.nn.functional.pad(x.abs(), (0, 124, 0, 84)).view(3, 128, 3, 128).amax((1, 3))
        assert bool((bam <= 448 * s).all()) and bool((bam > 224 * s).all())
        assert bool((torch.frexp(s).mantissa == 0.5).all())  # powers of two


def test_from_stored_checks() -> None:
    t = fp8_block_quantize(sample((200, 160), 2))
    again = fp8_block_from_stored(t.weight.view(torch.uint8), t.scale, "w")
    assert torch.equal(again.dequantize(), t.dequantize())
    with pytest.raises(BlockShapeError, match="model.layers.1.self_attn.kv_a_proj_with_mqa.weight"):
        fp8_block_from_stored(t.weight, t.scale[:1], "model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
    e = fp8_block_quantize(sample((200, 160), 2), fmt=FP8ScaleFormat.E8M0)
    bad = e.scale.view(torch.uint8).clone()
    bad[0, 0] = 0xFF
    with pytest.raises(NonFiniteInputError, match="w"):
        fp8_block_from_stored(e.weight, bad.view(torch.float8_e8m0fnu), "w")
    with pytest.raises(CodecInputError, match="w"):
        fp8_block_from_stored(e.weight, e.scale.float().double(), "w")


def test_quantize_refuses_nan_and_inf() -> None:
    for bad in (float("nan"), float("-inf")):
        x = torch.ones(130, 140)
        x[129, 139] = bad
        with pytest.raises(NonFiniteInputError, match="layers.2.attn.wq_a.weight"):
            fp8_block_quantize(x, name="layers.2.attn.wq_a.weight")


def special_fp8(shape: tuple[int, int], seed: int, fmt: FP8ScaleFormat = FP8ScaleFormat.F32) -> FP8BlockTensor:
    """FP8-block tensor with -0.0 bytes, E4M3 subnormals, ±448, a zero block and a zero scale."""
    t = fp8_block_quantize(sample(shape, seed), fmt=fmt)
    raw = t.weight.view(torch.uint8).clone()
    n, k = shape
    raw[0, :16] = 0x80  # -0.0
    raw[0, 16:32] = torch.arange(16, dtype=torch.uint8) % 8 + torch.tensor([0, 128] * 8, dtype=torch.uint8)  # subnormals
    raw[n - 1, :16] = torch.tensor([0x7E, 0xFE] * 8, dtype=torch.uint8)  # ±448
    raw[n // 2, 32:48] = 0
    scale = t.scale.clone()
    if fmt is not FP8ScaleFormat.E8M0 and scale.shape[1] > 1:
        scale[-1, -1] = 0.0  # a zero FP8 block scale
    return FP8BlockTensor(weight=raw.view(torch.float8_e4m3fn), scale=scale, fmt=fmt)


@pytest.mark.parametrize("convention", list(NVFP4Convention))
@pytest.mark.parametrize("shape", NV_SHAPES)
def test_fused_to_nvfp4_equals_dequant_then_quantize(convention: NVFP4Convention, shape: tuple[int, int]) -> None:
    for fmt in (FP8ScaleFormat.F32, FP8ScaleFormat.E8M0):
        t = special_fp8(shape, seed=shape[1], fmt=fmt)
        ref = nvfp4_quantize(fp8_block_dequantize(t), convention=convention)
        got = fp8_block_to_nvfp4(t, convention=convention, backend=Backend.EAGER, name="w")
        assert torch.equal(got.packed, ref.packed)
        assert torch.equal(got.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))
        assert torch.equal(got.global_scale, ref.global_scale)


def test_fused_compiled_backend_equals_reference() -> None:
    """The torch.compile path (the engine's hot path on CPU), on a tensor spanning 2 chunks."""
    t = special_fp8((2304, 2048), seed=5)  # 294912 16-blocks: one full chunk + a tail
    for convention in NVFP4Convention:
        ref = nvfp4_quantize(fp8_block_dequantize(t), convention=convention)
        got = fp8_block_to_nvfp4(t, convention=convention, backend=Backend.COMPILED)
        assert torch.equal(got.packed, ref.packed)
        assert torch.equal(got.block_scale.view(torch.uint8), ref.block_scale.view(torch.uint8))


def test_fused_refuses_nan_bytes_and_bad_shapes() -> None:
    t = special_fp8((200, 160), seed=6)
    raw = t.weight.view(torch.uint8).clone()
    raw[150, 7] = 0xFF  # E4M3 NaN
    bad = FP8BlockTensor(weight=raw.view(torch.float8_e4m3fn), scale=t.scale, fmt=t.fmt)
    with pytest.raises(NonFiniteInputError, match="model.layers.5.mlp.experts.3.up_proj.weight"):
        fp8_block_to_nvfp4(bad, name="model.layers.5.mlp.experts.3.up_proj.weight")
    odd = fp8_block_quantize(sample((4, 200), 7))
    with pytest.raises(BlockShapeError, match="w"):
        fp8_block_to_nvfp4(odd, name="w")


def test_fused_shared_global_amax() -> None:
    gate = special_fp8((200, 160), seed=8)
    up = special_fp8((200, 160), seed=9)
    amax = torch.maximum(fp8_block_dequantize(gate).abs().amax(), fp8_block_dequantize(up).abs().amax())
    for t in (gate, up):
        got = fp8_block_to_nvfp4(t, global_amax=amax, backend=Backend.EAGER)
        ref = nvfp4_quantize(fp8_block_dequantize(t), global_amax=amax)
        assert torch.equal(got.packed, ref.packed) and torch.equal(got.global_scale, ref.global_scale)
