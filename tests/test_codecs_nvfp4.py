"""E2M1 encode and NVFP4 codec, bit-exact against ml_dtypes, torch and compressed-tensors."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from v4convert.formats.fp4 import (
    E2M1_VALUES,
    BlockShapeError,
    CodecInputError,
    NonFiniteInputError,
    e2m1_encode,
    unpack_fp4,
)
from v4convert.formats.nvfp4 import (
    NVFP4Convention,
    ScaleMethod,
    e4m3_round,
    nvfp4_dequantize,
    nvfp4_from_stored,
    nvfp4_quantize,
)

CT = NVFP4Convention.COMPRESSED_TENSORS
MO = NVFP4Convention.MODELOPT
ODD_SHAPES = [(3, 96), (576, 160), (200, 32), (200, 2048)]


def ml_e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Independent E2M1 rounding: ml_dtypes' float4_e2m1fn bytes (code in the low nibble)."""
    return x.astype(np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F


def ml_e4m3(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


def tie_values() -> torch.Tensor:
    """Every E2M1 decision bound, one float32 ulp either side, and specials, both signs."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
    up = torch.nextafter(mids, torch.full_like(mids, 10.0))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    grid = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32)
    special = torch.tensor([0.0, 6.0, 6.5, 7.0, 1e30, float("inf"), 1e-45, 1e-40, 0.1], dtype=torch.float32)
    pos = torch.cat([mids, up, down, grid, special])
    return torch.cat([pos, -pos])


def sample(shape: tuple[int, ...], seed: int, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if heavy:
        x = x * torch.exp(2.0 * torch.randn(*shape, generator=g))
    return x * torch.rand(shape[0], 1, generator=g) * 3.0


# ------------------------------------------------------------------ E2M1 ------------------------


def test_all_16_codes_round_trip() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    vals = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    assert torch.equal(e2m1_encode(vals), codes)  # -0.0 (code 8) keeps its sign
    ml_vals = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(ml_vals.view(np.uint32), vals.numpy().view(np.uint32))


def test_every_tie_and_neighbour_matches_ml_dtypes() -> None:
    x = tie_values()
    expect = torch.from_numpy(ml_e2m1_codes(x.numpy()))
    assert torch.equal(e2m1_encode(x), expect)
    # ties to even, spelled out
    got = e2m1_encode(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist()
    assert got == [0, 2, 2, 4, 4, 6, 6]


def test_random_values_match_ml_dtypes_all_dtypes() -> None:
    x = torch.cat([sample((64, 512), 1).flatten() * s for s in (0.1, 1.0, 4.0, 100.0)])
    expect = torch.from_numpy(ml_e2m1_codes(x.numpy()))
    assert torch.equal(e2m1_encode(x), expect)
    xb = x.to(torch.bfloat16)
    assert torch.equal(e2m1_encode(xb), torch.from_numpy(ml_e2m1_codes(xb.float().numpy())))
    assert torch.equal(e2m1_encode(x.double()), expect)


def test_e2m1_refuses_nan() -> None:
    with pytest.raises(NonFiniteInputError, match="my.weight"):
        e2m1_encode(torch.tensor([1.0, float("nan")]), "my.weight")


# ------------------------------------------------------------------ E4M3 scale encode ----------


def test_e4m3_round_matches_torch_and_ml_dtypes() -> None:
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = table[torch.isfinite(table)]
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties (sorted below)
    finite = finite.sort().values
    mids = (finite[:-1] + finite[1:]) / 2
    x = torch.cat([finite, mids, torch.nextafter(mids, finite[1:]), torch.rand(10000) * 448, torch.rand(10000) * 1e-2])
    ours = e4m3_round(x).view(torch.uint8)
    assert torch.equal(ours, x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert np.array_equal(ours.numpy(), ml_e4m3(x.numpy()).view(np.uint8))
    assert e4m3_round(torch.tensor([1e6, -1e6])).float().tolist() == [448.0, -448.0]  # saturates


# ------------------------------------------------------------------ NVFP4 reference -------------


def numpy_nvfp4(x: torch.Tensor, convention: NVFP4Convention, target: float = 6.0, scale_max: float = 448.0):
    """Independent NVFP4 RTN in numpy float32 + ml_dtypes: (codes, E4M3 scale bytes, global)."""
    xn = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 16)
    amax = np.float32(np.abs(xn).max())
    bam = np.abs(xn).max(-1)
    if convention is MO:
        g = np.float32(amax / np.float32(6.0 * scale_max)) if amax > 0 else np.float32(1.0)
        ws = ml_e4m3(np.minimum(bam / np.float32(target * g), np.float32(448)))
        eff = ws.astype(np.float32) * g
    else:
        # torch (and so compressed-tensors' generate_gparam) evaluates ``2688 / amax`` as
        # ``reciprocal(amax) * 2688`` (Tensor.__rtruediv__); mirror that float32 arithmetic.
        g = np.float32(np.float32(1.0) / amax) * np.float32(scale_max * 6.0) if amax > 0 else np.float32(1.0)
        ws = ml_e4m3(np.minimum(g * (bam / np.float32(target)), np.float32(448)))
        eff = ws.astype(np.float32) / g
    safe = np.where(eff == 0, np.float32(1), eff).astype(np.float32)
    codes = ml_e2m1_codes(xn / safe[..., None])
    return codes.reshape(x.shape), ws.view(np.uint8), g


def err_per_block(x: torch.Tensor, q) -> torch.Tensor:
    return (q.dequantize() - x).reshape(x.shape[0], -1, 16).square().sum(-1)


@pytest.mark.parametrize("convention", [CT, MO])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_rtn_matches_independent_numpy(convention: NVFP4Convention, shape: tuple[int, int]) -> None:
    x = sample(shape, seed=shape[0] + shape[1])
    x[0, :16] = 0.0  # all-zero block
    x[-1, 16:32] *= 1e-5  # block scale far below the global one (E4M3 subnormal or zero)
    q = nvfp4_quantize(x, convention=convention, name="w")
    codes, ws, g = numpy_nvfp4(x, convention)
    assert q.packed.shape == (shape[0], shape[1] // 2) and q.block_scale.shape == (shape[0], shape[1] // 16)
    assert q.block_scale.dtype == torch.float8_e4m3fn
    assert np.array_equal(unpack_fp4(q.packed).numpy(), codes)
    assert np.array_equal(q.block_scale.view(torch.uint8).numpy(), ws)
    assert float(q.global_scale) == float(g)


def test_subnormal_block_scales_are_exercised_and_exact() -> None:
    x = sample((8, 64), seed=3)
    x[:, 16:] *= 2.0 ** -10  # three blocks per row whose scale lands in E4M3 subnormals (< 2**-6)
    q = nvfp4_quantize(x, convention=MO)
    b = q.block_scale.view(torch.uint8)
    assert bool(((b & 0x78) == 0).any() & (b & 0x07 != 0).any())  # subnormal scale bytes present
    codes, ws, _ = numpy_nvfp4(x, MO)
    assert np.array_equal(b.numpy(), ws) and np.array_equal(unpack_fp4(q.packed).numpy(), codes)


def test_dequantize_formulas() -> None:
    x = sample((5, 48), seed=4)
    for conv in (CT, MO):
        q = nvfp4_quantize(x, convention=conv)
        vals = torch.tensor(E2M1_VALUES)[unpack_fp4(q.packed).long()].reshape(5, 3, 16)
        ws = q.block_scale.float()[..., None]
        expect = vals * (ws * q.global_scale if conv is MO else ws / q.global_scale)
        assert torch.equal(nvfp4_dequantize(q), expect.reshape(5, 48))
    a, b = nvfp4_quantize(x, convention=CT), nvfp4_quantize(x, convention=MO)
    assert torch.allclose(a.dequantize(), b.dequantize(), rtol=0.2, atol=1e-6)  # same numbers, 2 spellings
    assert abs(float(a.global_scale) * float(b.global_scale) - 1.0) < 1e-6


def test_matches_compressed_tensors_compressor() -> None:
    import compressed_tensors.compressors.nvfp4.base as ct_nvfp4
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = NVFP4A16["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    for shape in ODD_SHAPES[:3]:
        x = sample(shape, seed=7 * shape[0])
        x[1 % shape[0], :16] = 0.0
        x[-1, 16:32] *= 1e-5
        gs = generate_gparam(x.amin(), x.amax())
        xg = x.reshape(shape[0], -1, 16)
        scale, _ = calculate_qparams(xg.amin(-1), xg.amax(-1), args, global_scale=gs)
        out = ct_nvfp4.NVFP4PackedCompressor.compress(
            {"weight": x, "weight_scale": scale, "weight_global_scale": gs}, scheme)
        ours = nvfp4_quantize(x, convention=CT, name="w")
        assert float(ours.global_scale) == float(gs)
        assert torch.equal(out["weight_packed"], ours.packed)
        theirs, mine = out["weight_scale"].view(torch.uint8), ours.block_scale.view(torch.uint8)
        zero_scale = mine == 0  # all-zero blocks, and blocks whose scale rounds below E4M3's range
        assert bool(zero_scale[1 % shape[0], 0])
        # compressed-tensors stores its eps 0.125 (byte 0x20) where the E4M3 scale is 0; we store 0.
        # The codes are equal (checked above), so only those blocks' decoded values differ.
        assert torch.equal(theirs[~zero_scale], mine[~zero_scale])
        assert bool((theirs[zero_scale] == 0x20).all())
        dec = ct_nvfp4.NVFP4PackedCompressor.decompress(out, scheme)["weight"]  # bfloat16
        keep = ~zero_scale.repeat_interleave(16, 1)
        assert torch.equal(dec[keep], ours.dequantize(torch.bfloat16)[keep])


def test_zeros_and_zero_blocks() -> None:
    for conv in (CT, MO):
        z = nvfp4_quantize(torch.zeros(3, 32), convention=conv)
        assert float(z.global_scale) == 1.0 and not bool(z.packed.any())
        assert not bool(z.block_scale.view(torch.uint8).any())
        assert torch.equal(z.dequantize(), torch.zeros(3, 32))
        x = sample((4, 64), seed=5)
        x[2, 32:48] = 0.0
        q = nvfp4_quantize(x, convention=conv, method=ScaleMethod.MSE)
        d = q.dequantize()
        assert bool(torch.isfinite(d).all()) and not bool(d[2, 32:48].any())


def test_three_d_input_and_bf16() -> None:
    x = sample((6, 64), seed=6).reshape(2, 3, 64)
    q = nvfp4_quantize(x.to(torch.bfloat16))
    assert q.shape == (2, 3, 64) and q.block_scale.shape == (2, 3, 4)
    flat = nvfp4_quantize(x.reshape(6, 64).to(torch.bfloat16))
    assert torch.equal(q.packed.reshape(6, 32), flat.packed)


def test_shape_and_value_errors_name_the_tensor() -> None:
    with pytest.raises(BlockShapeError, match="layers.0.mlp.up_proj.weight"):
        nvfp4_quantize(torch.ones(4, 24), name="layers.0.mlp.up_proj.weight")
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.ones(4, 32)
        x[1, 3] = bad
        with pytest.raises(NonFiniteInputError, match="experts.7.w1"):
            nvfp4_quantize(x, name="experts.7.w1")
    with pytest.raises(CodecInputError, match="w"):
        nvfp4_quantize(torch.ones(2, 16, dtype=torch.int32), name="w")


def test_shared_global_amax_for_fused_partners() -> None:
    gate, up = sample((8, 64), 8), sample((8, 64), 9) * 4
    amax = torch.maximum(gate.abs().amax(), up.abs().amax())
    for conv in (CT, MO):
        qg = nvfp4_quantize(gate, convention=conv, global_amax=amax)
        qu = nvfp4_quantize(up, convention=conv, global_amax=amax)
        assert torch.equal(qg.global_scale, qu.global_scale)
        assert torch.equal(qu.packed, nvfp4_quantize(up, convention=conv).packed)  # up holds the amax
        with pytest.raises(CodecInputError, match="gate"):
            nvfp4_quantize(up, convention=conv, global_amax=gate.abs().amax(), name="gate")


def test_mse_search_never_worse_and_helps_outliers() -> None:
    x = sample((64, 256), seed=10, heavy=True)
    rtn = nvfp4_quantize(x, convention=MO)
    mse = nvfp4_quantize(x, convention=MO, method=ScaleMethod.MSE)
    e_rtn, e_mse = err_per_block(x, rtn), err_per_block(x, mse)
    assert bool((e_mse <= e_rtn).all())
    assert float(e_mse.sum()) < 0.99 * float(e_rtn.sum())
    only_one = nvfp4_quantize(x, convention=MO, method=ScaleMethod.MSE, clip_ratios=(1.0,))
    assert torch.equal(only_one.packed, rtn.packed) and torch.equal(only_one.block_scale, rtn.block_scale)
    with pytest.raises(CodecInputError):
        nvfp4_quantize(x, method=ScaleMethod.MSE, clip_ratios=(0.9, 0.8))


@pytest.mark.parametrize("convention", [CT, MO])
def test_four_over_six_picks_the_better_of_two_independent_candidates(convention: NVFP4Convention) -> None:
    x = sample((32, 160), seed=11, heavy=True)
    q = nvfp4_quantize(x, convention=convention, method=ScaleMethod.FOUR_OVER_SIX)
    amax = x.abs().amax()
    g_expect = amax / (6 * 256) if convention is MO else torch.reciprocal(amax) * (256 * 6)
    assert float(q.global_scale) == float(g_expect)
    lut = np.array(E2M1_VALUES, dtype=np.float32)
    xn = x.numpy().reshape(32, 10, 16)
    cands = []
    for target in (6.0, 4.0):
        codes, ws, g = numpy_nvfp4(x, convention, target=target, scale_max=256.0)
        wsf = ws.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        eff = wsf * g if convention is MO else wsf / g
        err = ((lut[codes.reshape(32, 10, 16)] * eff[..., None] - xn) ** 2).sum(-1)
        cands.append((codes.reshape(32, 10, 16), ws, err))
    (c6, w6, e6), (c4, w4, e4) = cands
    use4 = e4 < e6
    assert 0 < use4.sum() < use4.size  # both choices occur on this data
    expect_codes = np.where(use4[..., None], c4, c6).reshape(32, 160)
    assert np.array_equal(unpack_fp4(q.packed).numpy(), expect_codes)
    assert np.array_equal(q.block_scale.view(torch.uint8).numpy(), np.where(use4, w4, w6))
    # never worse than plain RTN under the same (256) global scale
    assert bool((err_per_block(x, q).numpy() <= e6 * (1 + 1e-6)).all())


def test_from_stored_round_trip() -> None:
    x = sample((4, 32), seed=12)
    for conv in (CT, MO):
        q = nvfp4_quantize(x, convention=conv)
        back = nvfp4_from_stored(q.packed, q.block_scale.view(torch.uint8), q.global_scale.reshape(1), conv, "w")
        assert torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(BlockShapeError, match="w"):
        nvfp4_from_stored(q.packed, q.block_scale[:, :1], q.global_scale, CT, "w")
