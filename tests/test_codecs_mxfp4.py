"""MXFP4 codec (OCP floor / round-up rules), V4-native decode, and exact MXFP4 -> NVFP4 re-pack."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from v4convert.formats.fp4 import BlockShapeError, CodecInputError, NonFiniteInputError, unpack_fp4
from v4convert.formats.fp8 import e8m0_to_float32
from v4convert.formats.mxfp4 import (
    MXFP4Tensor,
    MXScaleRule,
    mxfp4_from_deepseek_native,
    mxfp4_quantize,
    mxfp4_to_nvfp4,
)
from v4convert.formats.nvfp4 import NVFP4Convention

CONVENTIONS = [NVFP4Convention.COMPRESSED_TENSORS, NVFP4Convention.MODELOPT]


def sample(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(shape[0], 1, generator=g))


def numpy_mxfp4(x: torch.Tensor, rule: MXScaleRule) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: exponent from float64 log2, codes from ml_dtypes' E2M1 (saturating)."""
    xn = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xn).max(-1).astype(np.float64)
    with np.errstate(divide="ignore"):
        if rule is MXScaleRule.OCP_FLOOR:
            e = np.floor(np.log2(amax)) - 2
        else:
            e = np.ceil(np.log2(amax / 6.0))
    # documented caps: E8M0 floor 2**-127; 2**125 top so that 6 * 2**e stays finite in float32
    e = np.where(amax > 0, e, 0).clip(-127, 125).astype(np.int64)
    q = (xn / np.exp2(e)[..., None].astype(np.float32)).astype(np.float32)  # exact: power of two
    codes = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    return codes.reshape(x.shape), (e + 127).astype(np.uint8)


def test_all_256_e8m0_bytes_decode() -> None:
    b = torch.arange(256, dtype=torch.uint8)
    ours = e8m0_to_float32(b)
    ml = b.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    th = b.view(torch.float8_e8m0fnu).float()
    assert np.array_equal(ours.numpy(), ml, equal_nan=True)
    assert torch.equal(ours[:255], th[:255]) and bool(torch.isnan(ours[255])) and bool(torch.isnan(th[255]))
    assert float(ours[0]) == 2.0 ** -127 and float(ours[127]) == 1.0 and float(ours[254]) == 2.0 ** 127


@pytest.mark.parametrize("rule", list(MXScaleRule))
@pytest.mark.parametrize("shape", [(3, 96), (576, 160), (200, 32)])
def test_quantize_matches_independent_reference(rule: MXScaleRule, shape: tuple[int, int]) -> None:
    x = sample(shape, seed=shape[0])
    x[0, :32] = 0.0
    x[-1, :32] = torch.tensor([6.0 * 2.0 ** 5] + [0.1] * 31)  # amax exactly 6 * 2**k: both rules agree
    q = mxfp4_quantize(x, rule=rule, name="w")
    codes, scale = numpy_mxfp4(x, rule)
    assert q.packed.shape == (shape[0], shape[1] // 2) and q.scale.shape == (shape[0], shape[1] // 32)
    assert np.array_equal(unpack_fp4(q.packed).numpy(), codes)
    assert np.array_equal(q.scale.numpy(), scale)
    assert int(q.scale[0, 0]) == 127 and not bool(unpack_fp4(q.packed)[0, :32].any())
    assert int(q.scale[-1, 0]) == 127 + 5


def test_rules_differ_as_specified() -> None:
    x = sample((64, 128), seed=1)
    floor = mxfp4_quantize(x, rule=MXScaleRule.OCP_FLOOR)
    up = mxfp4_quantize(x, rule=MXScaleRule.ROUND_UP)
    amax = x.abs().reshape(64, 4, 32).amax(-1)
    s_up = e8m0_to_float32(up.scale)
    assert bool((amax <= 6 * s_up).all())  # round-up never clips
    assert bool((amax > 3 * s_up).all())  # and is the smallest such power of two
    d = up.scale.int() - floor.scale.int()
    assert set(d.unique().tolist()) <= {0, 1} and bool((d == 1).any())
    s_fl = e8m0_to_float32(floor.scale)
    assert bool(((amax >= 4 * s_fl) & (amax < 8 * s_fl)).all())  # OCP: 4*2**e <= amax < 8*2**e


def test_extreme_exponents() -> None:
    x = torch.zeros(2, 64)
    ramp = (torch.arange(32, dtype=torch.float64) - 15.5) / 15.5
    x[0, :32] = (ramp * 3e38).float()
    x[0, 32:] = (ramp * 1e-39).float()  # float32 subnormals
    x[1, :32] = 1e-44
    for rule in MXScaleRule:
        q = mxfp4_quantize(x, rule=rule)
        codes, scale = numpy_mxfp4(x, rule)
        assert np.array_equal(q.scale.numpy(), scale)
        assert np.array_equal(unpack_fp4(q.packed).numpy(), codes)
        assert bool(torch.isfinite(q.dequantize()).all())


def test_errors_name_the_tensor() -> None:
    with pytest.raises(BlockShapeError, match="layers.3.ffn.experts.1.w2"):
        mxfp4_quantize(torch.ones(2, 48), name="layers.3.ffn.experts.1.w2")
    for bad in (float("nan"), float("inf")):
        x = torch.ones(2, 32)
        x[1, 1] = bad
        with pytest.raises(NonFiniteInputError, match="exp.w3"):
            mxfp4_quantize(x, name="exp.w3")


def test_v4_native_decode_matches_ml_dtypes() -> None:
    g = torch.Generator().manual_seed(2)
    n, k = 200, 160
    w_i8 = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
    scale = torch.randint(100, 140, (n, k // 32), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    mx = mxfp4_from_deepseek_native(w_i8, scale, "layers.0.ffn.experts.0.w1.weight")
    ours = mx.dequantize()
    # independent decode: nibbles as ml_dtypes float4_e2m1fn, scale as ml_dtypes float8_e8m0fnu
    b = w_i8.numpy().view(np.uint8)
    nib = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, k)
    vals = nib.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    s = scale.view(torch.uint8).numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    expect = vals * np.repeat(s, 32, axis=1)
    assert np.array_equal(ours.numpy(), expect)
    native = mx.to_deepseek_native()
    assert native["weight"].dtype == torch.int8 and native["scale"].dtype == torch.float8_e8m0fnu
    assert torch.equal(native["weight"], w_i8) and torch.equal(native["scale"].view(torch.uint8), scale.view(torch.uint8))
    with pytest.raises(BlockShapeError, match="w1"):
        mxfp4_from_deepseek_native(w_i8, scale[:, :2], "w1")
    bad = scale.view(torch.uint8).clone()
    bad[0, 0] = 255
    with pytest.raises(CodecInputError, match="NaN"):
        mxfp4_from_deepseek_native(w_i8, bad, "w1")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_repack_exact_when_exponents_span_at_most_17(convention: NVFP4Convention) -> None:
    """V4-like experts: random codes, block exponents over a 17-wide range -> lossless NVFP4."""
    g = torch.Generator().manual_seed(3)
    n, k = 576, 160
    w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(110, 128, (n, k // 32), generator=g, dtype=torch.uint8)  # 18 values: 110..127
    mx = MXFP4Tensor(packed=w, scale=scale)
    nv, rep = mxfp4_to_nvfp4(mx, convention)
    assert rep.exact and rep.inexact_blocks == 0 and rep.max_abs_error == 0.0 and rep.blocks == n * k // 16
    assert torch.equal(nv.dequantize(), mx.dequantize())
    q = mxfp4_quantize(torch.randn(200, 96, generator=g))  # Gaussian weights: narrow exponent span
    nv2, rep2 = mxfp4_to_nvfp4(q, convention)
    assert rep2.exact and torch.equal(nv2.dequantize(), q.dequantize())


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_repack_boundary_and_counting(convention: NVFP4Convention) -> None:
    """Top half-block ``6 * 2**e_top``; other half-blocks ``0.5 * 2**e``. Any NVFP4 encoding that keeps
    the top exact has block scale <= 448 * G, so its smallest non-zero magnitude is >= 2**-10 * G >=
    2**(e_top - 10) / 448 > 2**(e_top - 19): a half-block at ``e <= e_top - 18`` (value <=
    2**(e_top - 19)) cannot be exact; at ``e_top - 17`` it can, and the re-pack must find it."""
    e_top = 10
    rows = []
    for d in (0, 5, 17, 18, 25):  # distance below the top of the row's second MX block
        codes = torch.full((64,), 1, dtype=torch.uint8)  # 0.5 everywhere
        codes[:16] = 7  # first half-block: 6.0
        scale = torch.tensor([127 + e_top, 127 + e_top - d], dtype=torch.uint8)
        rows.append((codes, scale))
    codes = torch.stack([r[0] for r in rows])
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scale = torch.stack([r[1] for r in rows])
    mx = MXFP4Tensor(packed=packed, scale=scale)
    nv, rep = mxfp4_to_nvfp4(mx, convention)
    back, ref = nv.dequantize(), mx.dequantize()
    exact_hb = (back == ref).reshape(5, 4, 16).all(-1)
    # rows d=0,5,17: everything exact; d=18,25: the two half-blocks of the low MX block are not
    assert exact_hb[:3].all() and exact_hb[3:, :2].all() and not exact_hb[3:, 2:].any()
    assert rep.inexact_blocks == 4 and rep.blocks == 20 and rep.max_abs_error > 0


def test_zero_tensor_repack() -> None:
    mx = mxfp4_quantize(torch.zeros(3, 64))
    nv, rep = mxfp4_to_nvfp4(mx)
    assert rep.exact and not bool(nv.dequantize().any())
