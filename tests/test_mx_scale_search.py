"""MXFP4 block-exponent search (data-free ``mse``; ``--gptq-scales search``) against brute force on small odd shapes.

The references here do not use ``e2m1_encode``: a value's E2M1 error is its distance to the nearest point of the
grid {0, .5, 1, 1.5, 2, 3, 4, 6} * 2**e (saturating at 6 * 2**e); the tie rule does not change that distance.
"""
from __future__ import annotations

import pytest
import torch
from v4convert.formats.fp4 import unpack_fp4
from v4convert.formats.mxfp4 import (
    MX_MAX_FINITE_EXP,
    MXScaleRule,
    mxfp4_block_exponents,
    mxfp4_dequantize,
    mxfp4_quantize,
    mxfp4_search_exponents,
)
from v4convert.formats.nvfp4 import NVFP4Convention, ScaleMethod, nvfp4_quantize

from v4convert.calib.method import GPTQSettings, MethodSpec, quantize_weight
from v4convert.formats.fp4_grid import FP4Codec, Grid
from v4convert.quant.methods.gptq import ScalesAt, _hinv_upper, gptq_quantize

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _ref_block_err(xb: torch.Tensor, e: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """float64 ``[R, nb]``: sum_j weight_j (x_j - nearest grid point * 2**e)^2 by brute force over the grid."""
    x = xb.double()
    pts = GRID * torch.pow(2.0, e.double())[..., None, None]           # [R, nb, 1, 8]
    d2 = (x.abs()[..., None] - pts).square().amin(-1)                   # [R, nb, 32]
    if weight is not None:
        d2 = d2 * weight.double().reshape(1, -1, 32)
    return d2.sum(-1)


def _data(seed: int, r: int = 7, nb: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, nb, 32, generator=g) * torch.exp(2 * torch.randn(r, nb, 1, generator=g))
    x[0, 1] = 0                                        # an all-zero block
    x[1, 0, 5] *= 9                                    # an outlier: clipping (e - 1) or not (e + 1) matters
    x[2, 2, :] = torch.tensor([7.9] + [0.1] * 31)      # floor rule puts 7.9 at 7.9/4 * 4 -> clips to 6
    return x


@pytest.mark.parametrize("rule", [MXScaleRule.OCP_FLOOR, MXScaleRule.ROUND_UP])
@pytest.mark.parametrize("weighted", [False, True])
def test_search_picks_brute_force_argmin(rule, weighted):
    for seed in range(3):
        xb = _data(seed)
        r, nb, _ = xb.shape
        weight = torch.rand(nb * 32, generator=torch.Generator().manual_seed(seed)) * 3 if weighted else None
        e0 = mxfp4_block_exponents(xb.abs().amax(-1), rule)
        got = mxfp4_search_exponents(xb, e0, weight)
        errs = torch.stack([_ref_block_err(xb, e0 + s, weight) for s in (0, -1, 1)])     # [3, R, nb]
        best = errs.amin(0)
        err_got = _ref_block_err(xb, got, weight)
        assert torch.allclose(err_got, best, rtol=1e-6, atol=0)             # the least error over the candidates
        assert bool(((got - e0).abs() <= 1).all())
        # ties (e.g. the zero block) keep the rule's own exponent
        tie = (errs[0] - best).abs() <= 1e-9 * best.clamp(min=1e-30)
        assert torch.equal(got[tie], e0[tie])
        assert int(got[0, 1]) == int(e0[0, 1])


def test_search_single_candidate_is_rtn():
    xb = _data(5)
    for rule in (MXScaleRule.OCP_FLOOR, MXScaleRule.ROUND_UP):
        e0 = mxfp4_block_exponents(xb.abs().amax(-1), rule)
        assert torch.equal(mxfp4_search_exponents(xb, e0, steps=(0,)), e0)
        assert torch.equal(mxfp4_search_exponents(xb, e0, torch.rand(96), steps=(0,)), e0)


def test_search_clamps_to_finite_range():
    xb = torch.full((1, 1, 32), 2.0 ** -127)                    # e = -129 clamps to E8M0's -127
    e0 = mxfp4_block_exponents(xb.abs().amax(-1), MXScaleRule.OCP_FLOOR)
    got = mxfp4_search_exponents(xb, e0)
    assert int(got) >= -127
    xb = torch.full((1, 1, 32), 5.0 * 2.0 ** 125)
    e0 = mxfp4_block_exponents(xb.abs().amax(-1), MXScaleRule.ROUND_UP)
    assert int(mxfp4_search_exponents(xb, e0)) <= MX_MAX_FINITE_EXP


@pytest.mark.parametrize("rule", [MXScaleRule.OCP_FLOOR, MXScaleRule.ROUND_UP])
def test_mxfp4_mse_quantize_is_search_and_never_worse(rule):
    xb = _data(7, r=5, nb=3)
    x = xb.reshape(5, 96)
    q, r = mxfp4_quantize(x, rule=rule, mse=True), mxfp4_quantize(x, rule=rule)
    e_ref = mxfp4_search_exponents(xb, mxfp4_block_exponents(xb.abs().amax(-1), rule))
    assert torch.equal(q.scale.to(torch.int32) - 127, e_ref)
    # codes = plain RTN codes under the chosen exponents; error never above the rule's, strictly below somewhere
    lut_vals = mxfp4_dequantize(q).double().reshape(5, 3, 32)
    assert torch.allclose((xb.double() - lut_vals).square().sum(-1), _ref_block_err(xb, e_ref, None), rtol=1e-6)
    eq = (x - q.dequantize()).square().reshape(5, 3, 32).sum(-1)
    er = (x - r.dequantize()).square().reshape(5, 3, 32).sum(-1)
    assert bool((eq <= er).all()) and float(eq.sum()) < float(er.sum())
    assert q.packed.shape == r.packed.shape and q.scale.shape == r.scale.shape      # same format / bits


def test_method_mse_on_mxfp4_is_the_search():
    """``--method mse`` on MXFP4 (data-free and as a calibrated base) uses the exponent search, not RTN."""
    x = _data(8, r=6, nb=4).reshape(6, 128)
    q = quantize_weight(MethodSpec.parse("mse"), FP4Codec.MXFP4, x, None)
    r = mxfp4_quantize(x, mse=True)
    assert torch.equal(q.packed, r.packed) and torch.equal(q.scale, r.scale)
    g = quantize_weight(MethodSpec.parse("gptq+mse"), FP4Codec.MXFP4, x, torch.eye(128))   # H = I: no feedback
    assert torch.equal(g.packed, r.packed) and torch.equal(g.scale, r.scale)


def _layer(seed: int, n_out: int = 9, k: int = 96, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g) * 0.05
    w[::4] *= 5
    x = torch.randn(n, k, generator=g) * (0.2 + 3 * torch.rand(k, generator=g))
    x = x + 0.6 * x[:, torch.randint(0, k, (k,), generator=g)]
    return w, x.T @ x / n


@pytest.mark.parametrize("codec", [FP4Codec.MXFP4, FP4Codec.NVFP4])
def test_gptq_search_identity_hessian_is_weight_mse(codec):
    """H = c I spreads no error, so the GPTQ loss of a block is its squared error / c: the search = the data-free
    weight-MSE choice (MXFP4: e-1/e/e+1; NVFP4: the codec's clip-ratio MSE), bit-exact."""
    w, _ = _layer(1)
    w[2, 32:64] = 0
    q = gptq_quantize(w, torch.eye(96) * 1.7, codec, scales=ScalesAt.SEARCH)
    if codec is FP4Codec.MXFP4:
        r = mxfp4_quantize(w, mse=True)
        assert torch.equal(q.scale, r.scale)
    else:
        r = nvfp4_quantize(w, method=ScaleMethod.MSE, convention=NVFP4Convention.COMPRESSED_TENSORS)
        assert torch.equal(q.block_scale.view(torch.uint8), r.block_scale.view(torch.uint8))
    assert torch.equal(q.packed, r.packed)


def test_gptq_search_one_block_picks_least_gptq_loss():
    """K = 32 (one MXFP4 block): per row, the searched exponent's GPTQ result equals plain GPTQ on that fixed
    exponent (bit-exact codes), and its loss (w - q) H' (w - q)^T (H' the damped Hessian, float64) is the least
    over the three fixed-exponent runs."""
    w, h = _layer(3, n_out=11, k=32)
    damp = 0.05
    q = gptq_quantize(w, h, FP4Codec.MXFP4, damp=damp, scales=ScalesAt.SEARCH)
    e0 = mxfp4_block_exponents(w.abs().amax(1, keepdim=True), MXScaleRule.OCP_FLOOR)
    runs = [gptq_quantize(w, h, FP4Codec.MXFP4, damp=damp, grid=Grid(FP4Codec.MXFP4, exp=e0 + s)) for s in (0, -1, 1)]
    hd = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(32, dtype=torch.float64)

    def loss(t):
        dlt = w.double() - t.dequantize().double()
        return (dlt @ hd * dlt).sum(1)
    losses = torch.stack([loss(t) for t in runs])                     # [3, N]
    got = q.scale.to(torch.int32)[:, 0] - 127
    for i in range(w.shape[0]):
        c = int(got[i] - e0[i, 0])
        k = (0, -1, 1).index(c)
        assert torch.equal(unpack_fp4(q.packed)[i], unpack_fp4(runs[k].packed)[i])
        assert float(losses[k, i]) <= float(losses[:, i].min()) * (1 + 1e-5)
    assert _hinv_upper(h, damp, "t").shape == (32, 32)


def test_gptq_search_settings_and_errors():
    w, h = _layer(4, k=64)
    a = quantize_weight(MethodSpec.parse("gptq"), FP4Codec.MXFP4, w, h, gptq=GPTQSettings(scales_search=True))
    b = gptq_quantize(w, h, FP4Codec.MXFP4, damp=GPTQSettings().damp, scales=ScalesAt.SEARCH)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
    from v4convert.errors import UserError
    with pytest.raises(UserError, match="act-order"):
        gptq_quantize(w, h, FP4Codec.MXFP4, act_order=True, scales=ScalesAt.SEARCH)


def _obj(w, t, hd):
    dlt = w.double() - t.dequantize().double()
    return (dlt @ hd * dlt).sum(1)                                    # per row, float64


@pytest.mark.parametrize("codec", [FP4Codec.MXFP4, FP4Codec.NVFP4])
def test_refine_never_raises_gptq_objective_and_keeps_scales(codec):
    for seed in (6, 7):
        w, h = _layer(seed, n_out=13, k=96)
        damp = 0.1
        hd = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(96, dtype=torch.float64)
        a = gptq_quantize(w, h, codec, damp=damp)
        b = gptq_quantize(w, h, codec, damp=damp, refine=2)
        sa, sb = (t.scale if codec is FP4Codec.MXFP4 else t.block_scale.view(torch.uint8) for t in (a, b))
        assert torch.equal(sa, sb)                                     # same scales, only codes move
        oa, ob = _obj(w, a, hd), _obj(w, b, hd)
        assert bool((ob <= oa * (1 + 1e-6)).all()) and float(ob.sum()) < float(oa.sum())


def test_refine_identity_hessian_keeps_rtn():
    """H = I: the 1-D optimum of each code is w_j itself, so RTN is already the fixed point (bit-exact)."""
    w, _ = _layer(8)
    q = gptq_quantize(w, torch.eye(96), FP4Codec.MXFP4, refine=3)
    r = mxfp4_quantize(w)
    assert torch.equal(q.packed, r.packed) and torch.equal(q.scale, r.scale)


def test_refine_converged_is_coordinatewise_optimal():
    """After enough sweeps no single code change (all 16 codes, brute force) lowers the damped objective."""
    w, h = _layer(9, n_out=5, k=32)
    damp = 0.05
    hd = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(32, dtype=torch.float64)
    q = gptq_quantize(w, h, FP4Codec.MXFP4, damp=damp, refine=30)
    deq = q.dequantize().double()
    scale = torch.pow(2.0, q.scale.double() - 127)                      # [N, 1]
    vals = torch.cat([GRID, -GRID])                                     # all 16 codes' values (±0 alike)
    base = _obj(w, q, hd)
    for i in range(5):
        for j in range(32):
            for v in vals:
                d = deq[i].clone()
                d[j] = v * scale[i, 0]
                dlt = w[i].double() - d
                assert float(dlt @ hd @ dlt) >= float(base[i]) * (1 - 1e-6)
