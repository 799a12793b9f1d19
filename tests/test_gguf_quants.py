"""GGUF block codecs: byte identity with gguf-py's reference quantizers (which are byte-identical to
ggml's C reference), and the lossless MXFP4 re-pack checked against an independent decode."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from v4convert.formats import gguf_quants as gq
from v4convert.formats.fp4 import decode_fp4
from v4convert.formats.fp8 import e8m0_to_float32

# gguf-py's numpy reference (and numpy casts) warn on the extreme values used here on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _awkward(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Normal values over 12 decades per row, plus blocks of exact ties, zeros and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.logspace(-6, 6, x.shape[-2]).reshape(-1, 1)
    flat = x.reshape(-1, 32)
    flat[0] = 0.0
    flat[1] = -0.0
    # MXFP4 block with amax 4 (d = 0.5): every element on a decision bound, both signs
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    flat[2] = torch.cat([torch.tensor([4.0]), bounds * 0.5, -bounds * 0.5, bounds, -bounds, torch.tensor([-0.0, 6.0, 5.0])])
    # Q8_0 / Q4_0 ties: amax 127 -> d = 1, halves round away from zero; Q4_0 max/-8 = 1 with .5 ties
    flat[3] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])
    flat[4] = torch.tensor([-8.0] + [k + 0.5 for k in range(-8, 7)] * 2 + [3.0])
    flat[5] = torch.full((32,), 1.0)            # all equal: Q4_0 picks the first max
    return x


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.MXFP4])
@pytest.mark.parametrize("shape", [(3, 7, 96), (129, 160), (33, 2080)])
def test_block_quantizers_byte_identical_to_gguf_py(qtype: Q, shape: tuple[int, ...]) -> None:
    x = _awkward(shape[-1] + len(shape), shape)
    ours = gq.quantize(x, qtype).numpy()
    ref = quants.quantize(x.numpy(), qtype)
    assert ours.shape == ref.shape
    bad = np.nonzero((ours != ref).reshape(-1, ours.shape[-1]).any(axis=1))[0]
    assert bad.size == 0, f"{qtype.name}: rows {bad[:5]} differ"


def test_mxfp4_tiny_and_subnormal_blocks_match_gguf_py() -> None:
    """Blocks whose E8M0 scale is (near) subnormal take the reference argmin path; still identical."""
    x = torch.zeros(6, 32)
    x[0] = 1e-38 * torch.linspace(-1, 1, 32)
    x[1] = 3e-39
    x[2] = torch.linspace(-2e-37, 1e-37, 32)
    x[3] = 1e30 * torch.linspace(-1, 1, 32)
    x[4, 5] = 1e-45
    x[5] = 6.0
    assert np.array_equal(gq.quantize(x, Q.MXFP4).numpy(), quants.quantize(x.numpy(), Q.MXFP4))


def test_float_types_are_plain_casts() -> None:
    x = _awkward(7, (5, 64))
    assert np.array_equal(gq.quantize(x, Q.F32).numpy().view(np.float32), x.numpy())
    assert np.array_equal(gq.quantize(x, Q.F16).numpy().view(np.float16), x.numpy().astype(np.float16))
    bf = gq.quantize(x, Q.BF16).numpy().view(np.uint16)
    assert np.array_equal(bf, x.numpy().astype(ml_dtypes.bfloat16).view(np.uint16))


def test_quantize_rejects_bad_rows_and_non_finite() -> None:
    with pytest.raises(gq.QuantError, match="blk.0.w: row length 48"):
        gq.quantize(torch.ones(2, 48), Q.Q8_0, "blk.0.w")
    bad = torch.ones(2, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(gq.QuantError, match="non-finite"):
        gq.quantize(bad, Q.MXFP4, "x")
    with pytest.raises(gq.QuantError, match="Q4_K"):
        gq.quantize(torch.ones(2, 256), Q.Q4_K, "x")


def test_mxfp4_repack_is_lossless() -> None:
    """DeepSeek/OCP MXFP4 (I8 pairs, low nibble = even element; E8M0 per 32) -> GGUF MXFP4: gguf-py's
    dequantization of our bytes equals the source values decoded independently (as values: ggml's
    table has no -0, so E2M1 code 8 reads back as +0; scale 254 overflows to +-inf on both sides)."""
    g = torch.Generator().manual_seed(3)
    rows, k = 37, 160
    packed = torch.randint(0, 256, (rows, k // 2), generator=g, dtype=torch.int32).to(torch.uint8).view(torch.int8)
    scale = torch.randint(100, 150, (rows, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    scale[0] = 0
    scale[1] = 254
    scale[3] = 1
    scale[2] = 127
    ref = decode_fp4(packed) * e8m0_to_float32(scale).repeat_interleave(32, 1)
    blocks = gq.repack_mxfp4(packed, scale, "e")
    assert blocks.shape == (rows, k // 32 * 17)
    got = quants.dequantize(blocks.numpy(), Q.MXFP4)
    assert np.array_equal(got, ref.numpy())
    # the 3-D (stacked experts) form re-packs row by row
    b3 = gq.repack_mxfp4(packed.reshape(1, rows, k // 2), scale.reshape(1, rows, k // 32))
    assert torch.equal(b3[0], blocks)


def test_mxfp4_requantize_of_exact_values_reproduces_codes() -> None:
    """Values already on the MXFP4 grid with the OCP exponent come back with the same bytes."""
    blocks = gq.quantize(_awkward(11, (8, 96)), Q.MXFP4)
    vals = torch.from_numpy(quants.dequantize(blocks.numpy(), Q.MXFP4))
    assert torch.equal(gq.quantize(vals, Q.MXFP4), blocks)


def test_repack_rejects_nan_scale_and_bad_shapes() -> None:
    p = torch.zeros(2, 16, dtype=torch.int8)
    s = torch.full((2, 1), 255, dtype=torch.uint8)
    with pytest.raises(gq.QuantError, match="w1: MXFP4 scale byte 255"):
        gq.repack_mxfp4(p, s, "w1")
    with pytest.raises(gq.QuantError, match="does not match"):
        gq.repack_mxfp4(p, torch.zeros(2, 2, dtype=torch.uint8), "w1")
