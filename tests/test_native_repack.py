"""Native C MXFP4 -> NVFP4 re-pack: bit-exact against the torch codec ``mxfp4_to_nvfp4`` (packed codes, E4M3
block scales, global scale, amax, every RepackReport field) on odd shapes, extreme E8M0 exponents, zero blocks,
forced RTN fallback, inf-decoding inputs, fused parts, both conventions and 1/2/3 threads."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from v4convert.formats.fp4 import CodecInputError
from v4convert.formats.mxfp4 import mxfp4_from_deepseek_native, mxfp4_to_nvfp4
from v4convert.formats.nvfp4 import NVFP4Convention
from v4convert.kernels.native.repack import mxfp4_to_nvfp4_native

CONVS = list(NVFP4Convention)


def random_mxfp4(n: int, k: int, g: torch.Generator, e_lo: int = 0, e_hi: int = 254) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes (with a random magnitude cap per 16-half-block, so every block maximum index occurs) and
    E8M0 bytes in [e_lo, e_hi]; includes an all-zero 32-block and a -0 code."""
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    cap = torch.randint(0, 8, (n, k // 16, 1), generator=g, dtype=torch.uint8)
    codes = ((codes.view(n, -1, 16) & 8) | torch.minimum(codes.view(n, -1, 16) & 7, cap)).view(n, k)
    codes[0, :32] = 0
    codes[-1, -1] = 8
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scale = torch.randint(e_lo, e_hi + 1, (n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return packed.view(torch.int8), scale.view(torch.float8_e8m0fnu)


def assert_same(parts: list[tuple[torch.Tensor, torch.Tensor]], conv: NVFP4Convention, threads: int) -> int:
    """Native vs torch on the row-concatenation of ``parts``; returns the reference's inexact block count."""
    packed = torch.cat([p for p, _ in parts])
    scale = torch.cat([s for _, s in parts])
    ref, rrep = mxfp4_to_nvfp4(mxfp4_from_deepseek_native(packed, scale, "t"), conv, "t")
    outs, rep = mxfp4_to_nvfp4_native(parts, conv, threads=threads, name="t")
    assert rep == rrep
    assert torch.equal(torch.cat([o.packed for o in outs]), ref.packed)
    assert torch.equal(torch.cat([o.block_scale.view(torch.uint8) for o in outs]), ref.block_scale.view(torch.uint8))
    for o in outs:
        assert o.global_scale.dtype == torch.float32 and torch.equal(o.global_scale, ref.global_scale)
        assert torch.equal(o.amax, ref.amax) and o.convention is conv
    return rrep.inexact_blocks


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,k", [(1, 32), (3, 96), (129, 96), (1, 7168), (3, 7168), (129, 32)])
def test_full_exponent_range(n: int, k: int, threads: int, conv: NVFP4Convention) -> None:
    """Bytes 0..252 (no inf): large spread, so many blocks take the 2**-9 / RTN fallback."""
    g = torch.Generator().manual_seed(n * 7919 + k)
    assert_same([random_mxfp4(n, k, g, 0, 252)], conv, threads)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("threads", [1, 3])
def test_narrow_range_is_exact(conv: NVFP4Convention, threads: int) -> None:
    """A real-weight-like spread (15 exponents): every block exact, no fallback."""
    g = torch.Generator().manual_seed(3)
    p, s = random_mxfp4(129, 7168, g, 110, 124)
    assert assert_same([(p, s)], conv, threads) == 0


@pytest.mark.parametrize("conv", CONVS)
def test_fallback_heavy(conv: NVFP4Convention) -> None:
    """One block at byte 254 (finite: magnitudes <= 1.5), the rest at 0..140: 2**-9 clamps nearly everywhere."""
    g = torch.Generator().manual_seed(11)
    p, s = random_mxfp4(129, 96, g, 0, 140)
    codes = p.view(torch.uint8)
    codes[5, :16] = 0x33                 # 1.5, 1.5 ...
    s.view(torch.uint8)[5, 0] = 254
    assert assert_same([(p, s)], conv, 2) > 0
    # the C kernel keeps 2**rel codes on inexact blocks because the torch codec's RTN fallback never wins
    # (argument in mxfp4_nvfp4.c): here too, every torch block scale is 0 or a power of two
    ref, _ = mxfp4_to_nvfp4(mxfp4_from_deepseek_native(p, s, "t"), conv, "t")
    b = ref.block_scale.view(torch.uint8).int()
    pow2 = ((b >> 3) > 0) & ((b & 7) == 0) | ((b >> 3) == 0) & ((b & 7) & ((b & 7) - 1) == 0)
    assert bool(pow2.all())


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("byte", [0, 1, 127, 253, 254])
def test_single_exponent(byte: int, conv: NVFP4Convention) -> None:
    """Every scale byte equal (extremes included; 253/254 with large codes decode to inf: torch's semantics)."""
    g = torch.Generator().manual_seed(byte)
    p, s = random_mxfp4(3, 96, g, byte, byte)
    assert_same([(p, s)], conv, 2)


@pytest.mark.parametrize("conv", CONVS)
def test_inf_input_matches_torch(conv: NVFP4Convention) -> None:
    g = torch.Generator().manual_seed(5)
    p, s = random_mxfp4(4, 64, g, 100, 130)
    p.view(torch.uint8)[2, 3] = 0x07     # code 6 ...
    s.view(torch.uint8)[2, 0] = 254      # ... * 2**127 = inf
    assert_same([(p, s)], conv, 2)


@pytest.mark.parametrize("conv", CONVS)
def test_all_zero(conv: NVFP4Convention) -> None:
    p = torch.zeros(3, 48, dtype=torch.uint8)
    p[1, 2] = 0x88                       # -0, -0
    s = torch.randint(0, 255, (3, 3), dtype=torch.int32).to(torch.uint8)
    assert_same([(p, s)], conv, 3)


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_parts_share_exponent(conv: NVFP4Convention, threads: int) -> None:
    """gate + up as separate parts: one global exponent over both (the larger part decides)."""
    g = torch.Generator().manual_seed(9)
    a = random_mxfp4(129, 96, g, 100, 120)
    b = random_mxfp4(3, 96, g, 110, 135)
    assert_same([a, b], conv, threads)
    assert_same([b, a, b], conv, threads)


def test_nan_scale_refused_like_torch() -> None:
    g = torch.Generator().manual_seed(1)
    p, s = random_mxfp4(3, 64, g, 100, 120)
    s.view(torch.uint8)[1, 1] = 255
    with pytest.raises(CodecInputError) as ref:
        mxfp4_to_nvfp4(mxfp4_from_deepseek_native(p, s, "t"), NVFP4Convention.MODELOPT, "t")
    with pytest.raises(CodecInputError) as got:
        mxfp4_to_nvfp4_native([(p, s)], NVFP4Convention.MODELOPT, name="t")
    assert str(got.value) == str(ref.value)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), nb=st.integers(1, 5), lo=st.integers(0, 254), span=st.integers(0, 254),
       seed=st.integers(0, 2**31 - 1), conv=st.sampled_from(CONVS), threads=st.integers(1, 3))
def test_property(n: int, nb: int, lo: int, span: int, seed: int, conv: NVFP4Convention, threads: int) -> None:
    g = torch.Generator().manual_seed(seed)
    assert_same([random_mxfp4(n, nb * 32, g, lo, min(254, lo + span))], conv, threads)
