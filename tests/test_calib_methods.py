"""GPTQ and the activation-weighted scale search on single linears, NVFP4 and MXFP4, against the codecs."""
from __future__ import annotations

import pytest
import torch
from v4convert.formats.mxfp4 import MXScaleRule, mxfp4_quantize
from v4convert.formats.nvfp4 import NVFP4Convention, ScaleMethod, nvfp4_quantize

from v4convert.formats.fp4_grid import FP4Codec
from v4convert.quant.methods.awq import awq_quantize, weighted_block_error
from v4convert.errors import UserError
from v4convert.quant.methods.gptq import ScalesAt, gptq_quantize

CASES = [(FP4Codec.NVFP4, NVFP4Convention.COMPRESSED_TENSORS), (FP4Codec.NVFP4, NVFP4Convention.MODELOPT),
         (FP4Codec.MXFP4, NVFP4Convention.COMPRESSED_TENSORS)]


def _rtn(w, codec, conv, base=ScaleMethod.RTN, rule=MXScaleRule.OCP_FLOOR):
    if codec is FP4Codec.NVFP4:
        return nvfp4_quantize(w, convention=conv, method=base)
    return mxfp4_quantize(w, rule=rule)


def _scale_bytes(q):
    return (q.block_scale if hasattr(q, "block_scale") else q.scale).view(torch.uint8)


def _layer(seed: int, n_out: int = 37, k: int = 160, n: int = 400):
    """Weight with a few outlier rows, inputs with uneven channel magnitudes and correlated channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g) * 0.05
    w[::7] *= 4
    x = torch.randn(n, k, generator=g) * (0.2 + 3 * torch.rand(k, generator=g))
    x = x + 0.7 * x[:, torch.randint(0, k, (k,), generator=g)]
    return w, x, x.T @ x / n


def _out_err(x, w, q) -> float:
    return float((x @ w.T - x @ q.dequantize().T).square().mean())


@pytest.mark.parametrize("codec,conv", CASES)
@pytest.mark.parametrize("rule", list(MXScaleRule))
def test_gptq_identity_hessian_is_rtn_bit_exact(codec, conv, rule):
    w, _, _ = _layer(1, n_out=11, k=96)
    w[3, 32:64] = 0                                      # an all-zero block
    for base in ([ScaleMethod.RTN, ScaleMethod.FOUR_OVER_SIX, ScaleMethod.MSE] if codec is FP4Codec.NVFP4
                 else [ScaleMethod.RTN]):
        q = gptq_quantize(w, torch.eye(96) * 2.5, codec, convention=conv, base=base, mx_rule=rule)
        r = _rtn(w, codec, conv, base, rule)
        assert torch.equal(q.packed, r.packed)
        assert torch.equal(_scale_bytes(q), _scale_bytes(r))
        if codec is FP4Codec.NVFP4:
            assert torch.equal(q.global_scale, r.global_scale) and q.convention is conv


@pytest.mark.parametrize("codec,conv", CASES)
def test_gptq_lowers_output_error_vs_rtn(codec, conv):
    for seed in (2, 3):
        w, x, h = _layer(seed)
        rtn = _out_err(x, w, _rtn(w, codec, conv))
        for scales in ScalesAt:
            assert _out_err(x, w, gptq_quantize(w, h, codec, convention=conv, scales=scales)) < 0.8 * rtn
        assert _out_err(x, w, gptq_quantize(w, h, codec, convention=conv, act_order=True)) < 0.8 * rtn


def test_gptq_shared_global_amax_and_errors():
    w, _, h = _layer(4, k=64)
    big = w.abs().amax() * 3
    q = gptq_quantize(w, h, FP4Codec.NVFP4, global_amax=big)
    assert torch.equal(q.global_scale, nvfp4_quantize(w, global_amax=big).global_scale)
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(w, h[:32, :32], FP4Codec.NVFP4)
    with pytest.raises(UserError, match="act-order"):
        gptq_quantize(w, h, FP4Codec.NVFP4, act_order=True, scales=ScalesAt.DURING)


def test_gptq_dead_inputs_keep_their_weights():
    w, x, _ = _layer(5, k=64)
    x[:, 10:20] = 0
    q = gptq_quantize(w, x.T @ x / len(x), FP4Codec.MXFP4)
    assert q.dequantize()[:, 10:20].abs().sum() > 0      # rounded, not zeroed


@pytest.mark.parametrize("codec,conv,base", [(c, v, ScaleMethod.RTN) for c, v in CASES] +
                         [(FP4Codec.NVFP4, v, ScaleMethod.FOUR_OVER_SIX) for v in NVFP4Convention])
def test_awq_never_worse_than_data_free_on_its_objective(codec, conv, base):
    for seed in range(4):
        w, x, h = _layer(10 + seed, k=128)
        d = torch.diagonal(h).clone()
        q, r = awq_quantize(w, d, codec, convention=conv, base=base), _rtn(w, codec, conv, base)
        b = 16 if codec is FP4Codec.NVFP4 else 32
        eq, er = (weighted_block_error(w, t.dequantize(), d, b) for t in (q, r))
        assert bool((eq <= er).all())                          # per block, never worse
        assert float(eq.sum()) < float(er.sum())               # and better somewhere
        assert _out_err(x, w, q) < _out_err(x, w, r)


def test_awq_uniform_statistics_is_weight_mse():
    """With d = 1 the objective is plain weight MSE: NVFP4 search over clip ratios = the codec's MSE method."""
    w, _, _ = _layer(20, k=64)
    q = awq_quantize(w, torch.ones(64), FP4Codec.NVFP4)
    r = nvfp4_quantize(w, method=ScaleMethod.MSE)
    assert torch.equal(q.packed, r.packed) and torch.equal(_scale_bytes(q), _scale_bytes(r))


def _perturbed(seed: int):
    """A linear's original inputs ``x`` and a quantized model's inputs ``xq`` of the same tokens (``x`` plus a
    correlated error, as upstream quantization leaves): (w, x, xq, H = xq^T xq / n, C = x^T xq / n)."""
    w, x, _ = _layer(seed)
    g = torch.Generator().manual_seed(100 + seed)
    xq = x + 0.3 * x @ (torch.randn(x.shape[1], x.shape[1], generator=g) / x.shape[1] ** 0.5)
    n = x.shape[0]
    return w, x, xq, xq.T @ xq / n, x.T @ xq / n


@pytest.mark.parametrize("codec,conv", CASES)
def test_gptq_target_original_with_identical_inputs_is_plain_gptq(codec, conv):
    """C == H (the original and quantized streams agree): the same bytes as plain GPTQ, for every gptq method."""
    from v4convert.calib.method import GPTQSettings, MethodSpec, quantize_weight
    w, _, h = _layer(4)
    for method, gs in (("gptq", GPTQSettings()), ("awq+gptq", GPTQSettings(damp=1.0, act_order=True, refine=2)),
                       ("gptq+mse", GPTQSettings(scales_search=True))):
        a = quantize_weight(MethodSpec.parse(method), codec, w, h, convention=conv, gptq=gs)
        b = quantize_weight(MethodSpec.parse(method), codec, w, h, convention=conv, gptq=gs, c=h.clone())
        assert torch.equal(a.packed, b.packed) and torch.equal(_scale_bytes(a), _scale_bytes(b))


@pytest.mark.parametrize("codec,conv", CASES)
def test_gptq_target_original_lowers_error_to_the_original_outputs(codec, conv):
    """On perturbed inputs, ||x W^T - xq Q^T|| (the original outputs from the quantized inputs) is lower with the
    original target than with plain GPTQ on the same H; and W* itself is the damped least-squares solution."""
    from v4convert.calib.method import GPTQSettings, MethodSpec, quantize_weight
    from v4convert.quant.methods.gptq import _damped, original_target
    for seed in (5, 6):
        w, x, xq, h, c = _perturbed(seed)

        def err(q):
            return float((x @ w.T - xq @ q.dequantize().T).square().mean())
        for damp in (0.01, 1.0):
            gs = GPTQSettings(damp=damp)
            plain = quantize_weight(MethodSpec.parse("gptq"), codec, w, h, convention=conv, gptq=gs)
            target = quantize_weight(MethodSpec.parse("gptq"), codec, w, h, convention=conv, gptq=gs, c=c)
            assert err(target) < 0.9 * err(plain)
        if codec is FP4Codec.NVFP4:       # W* may pass the original amax: clipped to the shared global amax
            g = 0.9 * original_target(w, h, c, 0.01).abs().amax()      # a partner's original amax below W*'s
            q = quantize_weight(MethodSpec.parse("gptq"), codec, w, h, convention=conv, global_amax=g, c=c)
            assert torch.isfinite(q.dequantize()).all()        # without the clip: CodecInputError (amax > global)
        ws = original_target(w, h, c, 0.01).double()
        hd = _damped(h, 0.01)                      # normal equations: W* H' = W C + W (H' - H)
        resid = ws @ hd - w.double() @ (c.double() + hd - h.double())
        assert float(resid.abs().max()) < 1e-6 * float((w.double() @ hd).abs().max())
