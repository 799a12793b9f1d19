"""Parity of v4convert.runtime (V3 / V3.2) against transformers 5.x on tiny random float32 models.

Configs use odd sizes unlike any synth preset: YaRN with mscale_all_dim, 4 expert groups, dense + MoE layers,
V3.2 with index_topk < sequence length. Reference = transformers' full-sequence forward; ours is checked on
one prefill and on token-by-token decoding through the KV cache.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import transformers

from v4convert.runtime import DynamicRouting, load  # noqa: E402
from v4convert.runtime.args import ModelArgs  # noqa: E402

SEQ = 44
TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())



def _v3_kwargs(**over) -> dict:
    kw = dict(vocab_size=211, hidden_size=72, intermediate_size=88, moe_intermediate_size=20, num_hidden_layers=3,
              num_attention_heads=3, num_key_value_heads=3, n_shared_experts=2, n_routed_experts=16,
              num_experts_per_tok=3, n_group=4, topk_group=2, kv_lora_rank=36, q_lora_rank=44, qk_rope_head_dim=10,
              v_head_dim=14, qk_nope_head_dim=18, first_k_dense_replace=1, max_position_embeddings=512,
              rms_norm_eps=1e-5, routed_scaling_factor=1.7, num_nextn_predict_layers=0,
              rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.7},
              rope_theta=1000.0)
    kw.update(over)
    return kw


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations (transformers' 0.02 init makes routing and attention nearly uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:      # norms: around 1; biases: around 0
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _save(model_cls, cfg, path, seed: int):
    torch.manual_seed(seed)
    m = model_cls(cfg).float().eval()
    _randomize(m, seed)
    m.save_pretrained(path)
    return m


def _check(ref_model, path, seq: int = SEQ, seed: int = 0, **load_kw):
    ids = torch.randint(0, ref_model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    ours = load(path, max_seq_len=seq + 3, **load_kw)
    pre = ours(ids, 0)
    assert pre.shape == ref.shape and pre.dtype == torch.float32
    e_pre = rel_err(pre, ref)
    steps = torch.cat([ours(ids[:, t:t + 1], t) for t in range(seq)], dim=1)
    e_dec = rel_err(steps, ref)
    assert e_pre <= TOL, f"prefill rel err {e_pre:.2e}"
    assert e_dec <= TOL, f"decode rel err {e_dec:.2e}"
    return ours, ids, ref, (e_pre, e_dec)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    cfg = transformers.DeepseekV3Config(**_v3_kwargs())
    return _save(transformers.DeepseekV3ForCausalLM, cfg, path, seed=1), path


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32")
    cfg = transformers.DeepseekV32Config(**_v3_kwargs(index_n_heads=16, index_head_dim=24, index_topk=13,
                                                      first_k_dense_replace=2, num_hidden_layers=3))
    return _save(transformers.DeepseekV32ForCausalLM, cfg, path, seed=2), path


def test_v3_parity_prefill_and_decode(v3):
    ref_model, path = v3
    _check(ref_model, path)


def test_v3_parity_non_interleaved_rope(tmp_path):
    cfg = transformers.DeepseekV3Config(**_v3_kwargs(rope_interleave=False, num_hidden_layers=2, rope_scaling=None))
    m = _save(transformers.DeepseekV3ForCausalLM, cfg, tmp_path, seed=3)
    _check(m, tmp_path, seq=41)


def test_v32_parity_sparse_attention(v32):
    ref_model, path = v32
    ours, ids, ref, _ = _check(ref_model, path)
    # sparsity matters: with index_topk >= sequence the logits differ.
    dense = ours.model.layers[0].self_attn.indexer
    dense.topk = 10_000
    for layer in ours.model.layers:
        layer.self_attn.indexer.topk = 10_000
    assert rel_err(ours(ids, 0), ref) > 1e-2


# ----------------------------------------------------------------------------------------------
# Published FP8 layout (synth presets): our FP8 path against transformers on the dequantized weights
# ----------------------------------------------------------------------------------------------
def _dequantized_for_transformers(src, dst) -> None:
    """Write ``src`` (published FP8 layout) as a float32 checkpoint transformers can load: same config minus
    quantization_config, MTP block left out (transformers does not model it)."""
    from safetensors.torch import save_file

    from v4convert.checkpoint import Checkpoint
    dst.mkdir()
    with Checkpoint.open(src) as ck:      # F32 tensors are views of the mmapped shard: write before closing
        tensors = {n: ck.dequantize(n).contiguous() for n in ck.names() if not ck.tensor_info(n).mtp}
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(ck.config)
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("preset", ["v3-tiny", "v32-tiny"])
def test_synth_published_fp8_matches_transformers(tiny_ckpts, tmp_path, preset):
    src = tiny_ckpts[preset]
    _dequantized_for_transformers(src, tmp_path / "f32")
    cls = transformers.DeepseekV32ForCausalLM if preset == "v32-tiny" else transformers.DeepseekV3ForCausalLM
    ref_model = cls.from_pretrained(tmp_path / "f32", dtype=torch.float32).eval()
    # v32-tiny has 16 indexer heads (index_topk 8 < 40 tokens), so sparse selection is exercised
    # and index scores do not tie at the top-k boundary.
    ours, *_ = _check(ref_model, src, seq=40, seed=5)
    # the MTP block is loaded (kept, not run) with the published values, not dropped
    from v4convert.checkpoint import Checkpoint
    assert ours.n_mtp == 1
    L = ours.args.arch.n_layers
    with Checkpoint.open(src) as ck:
        for name in (f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.mlp.experts.1.down_proj.weight",
                     f"model.layers.{L}.shared_head.head.weight"):
            assert torch.equal(ours.get_parameter(name), ck.dequantize(name))


def test_simulate_quant_marks_exactly_the_quantized_linears(tiny_ckpts):
    from v4convert.checkpoint import Checkpoint
    from v4convert.runtime.common import FakeQuant, Linear
    src = tiny_ckpts["v32-tiny"]                      # config has scale_fmt ue8m0
    exact = load(src, max_seq_len=16)
    sim = load(src, max_seq_len=16, simulate_quant=True)
    with Checkpoint.open(src) as ck:
        quantized = {n[: -len(".weight")] for n in ck.names() if ck.tensor_info(n).storage.is_quantized}
    marked = {n for n, m in sim.named_modules() if isinstance(m, Linear) and m.fake_quant is not FakeQuant.NONE}
    assert marked == quantized and len(marked) > 50
    assert all(m.fake_quant is FakeQuant.FP8_BLOCK_UE8M0 for n, m in sim.named_modules() if n in marked)
    ids = torch.arange(3, 15)[None]
    a, b = exact(ids, 0), sim(ids, 0)
    assert torch.isfinite(b).all() and not torch.equal(a, b)


@pytest.mark.parametrize("pow2", [False, True])
def test_fake_quant_fp8_act_is_e4m3_per_block(pow2):
    import ml_dtypes
    from v4convert.runtime.common import fake_quant_fp8_act
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.01, 30, 300)
    y = fake_quant_fp8_act(x, pow2_scale=pow2)
    for b0 in range(0, 300, 128):                     # blocks 128, 128, 44 (partial)
        xb, yb = x[:, b0:b0 + 128], y[:, b0:b0 + 128]
        s = xb.abs().amax(-1, keepdim=True) / 448
        if pow2:
            s = torch.exp2(torch.ceil(torch.log2(s)))
        # independent e4m3 rounding (ml_dtypes, round-to-nearest-even)
        q = torch.from_numpy((xb / s).numpy().astype(ml_dtypes.float8_e4m3fn).astype("float32"))
        assert torch.equal(yb, q * s)
        assert ((yb - xb).abs() <= xb.abs() / 16 + s * 2 ** -9).all()      # within half an e4m3 step


# ----------------------------------------------------------------------------------------------
# Dynamic expert routing (opt-in)
# ----------------------------------------------------------------------------------------------
def test_route_dynamic_unit():
    from v4convert.runtime.common import RouterSpec, ScoreFunc, route
    spec = RouterSpec(n_experts=15, top_k=4, score_func=ScoreFunc.SIGMOID, n_group=5, topk_group=3,
                      norm_topk_prob=True, routed_scaling_factor=2.0)
    g = torch.Generator().manual_seed(11)
    logits, bias = 2 * torch.randn(50, 15, generator=g), 0.2 * torch.randn(15, generator=g)
    w0, i0 = route(logits, spec, bias)
    # top_p = 1 with k_min = k_max = top_k is exactly the default routing
    w1, i1 = route(logits, spec, bias, DynamicRouting(top_p=1.0, k_min=4, k_max=4))
    o0, o1 = i0.sort(-1), i1.sort(-1)
    assert torch.equal(o0.values, o1.values)
    assert torch.allclose(w0.gather(1, o0.indices), w1.gather(1, o1.indices), rtol=0, atol=1e-6)
    # a small top_p keeps k_min..k_max experts, the kept mass reaches top_p, weights renormalised x scale
    dyn = DynamicRouting(top_p=0.45, k_min=1, k_max=6)
    w, i = route(logits, spec, bias, dyn)
    k = (i >= 0).sum(-1)
    assert k.min() >= 1 and k.max() <= 6 and len(set(k.tolist())) > 1
    assert torch.allclose(w.sum(-1), torch.full((50,), 2.0), atol=1e-5)
    assert ((w > 0) == (i >= 0)).all()
    scores = logits.sigmoid()
    cand = route(logits, spec, bias, DynamicRouting(top_p=1.0, k_min=6, k_max=6))[1]
    p = scores.gather(1, cand)
    p = p / p.sum(-1, keepdim=True)
    for n in range(50):
        kept = scores[n, i[n][i[n] >= 0]].sum() / scores[n, cand[n]].sum()
        assert kept >= 0.45 - 1e-6 or k[n] == 6
        # minimal: dropping the smallest kept expert falls below top_p (unless at k_min)
        smallest = scores[n, i[n][i[n] >= 0]].min() / scores[n, cand[n]].sum()
        assert k[n] == 1 or kept - smallest < 0.45


def test_dynamic_routing_in_model_reports_experts_per_token(v3):
    ref_model, path = v3
    ids = torch.randint(0, 211, (1, 30), generator=torch.Generator().manual_seed(9))
    base = load(path, max_seq_len=32)
    ref = base(ids, 0)
    top_k = base.args.arch.top_k
    assert base.routing_stats()["experts_per_token"] == top_k           # default: exactly the model's top-k
    same = load(path, max_seq_len=32, dynamic_routing=DynamicRouting(top_p=1.0, k_min=top_k, k_max=top_k))
    assert rel_err(same(ids, 0), ref) <= 1e-6
    few = load(path, max_seq_len=32, dynamic_routing=DynamicRouting(top_p=0.4, k_min=1, k_max=top_k))
    out = few(ids, 0)
    ept = few.routing_stats()["experts_per_token"]
    assert 1 <= ept < top_k and rel_err(out, ref) > 1e-3
    few.reset_routing_stats()
    few.set_dynamic_routing(None)
    assert rel_err(few(ids, 0), ref) <= 1e-6 and few.routing_stats()["experts_per_token"] == top_k


# ----------------------------------------------------------------------------------------------
# Config handling and errors
# ----------------------------------------------------------------------------------------------
def test_model_args_published_and_transformers_styles_agree(v3):
    _, path = v3
    hf_cfg = json.loads((path / "config.json").read_text())
    published = {k: v for k, v in hf_cfg.items() if k not in ("rope_parameters", "rope_interleave")}
    rp = hf_cfg["rope_parameters"]
    published["rope_theta"] = rp["rope_theta"]
    published["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
    published["rope_scaling"]["type"] = "yarn"
    a, b = ModelArgs.from_config(hf_cfg), ModelArgs.from_config(published)
    assert a == b and a.yarn is not None and a.yarn.mscale_all_dim == 0.7 and a.rope_interleave
    from importlib import resources
    ref = json.loads(resources.files("v4convert").joinpath("data/ref/deepseek-v3-671b.config.json").read_text())
    r = ModelArgs.from_config(ref)                    # the published 671B config, published key style
    assert (r.yarn.factor, r.yarn.original_max_position_embeddings, r.router.n_group, r.router.topk_group,
            r.router.routed_scaling_factor, r.rope_interleave) == (40.0, 4096, 8, 4, 2.5, True)


@pytest.mark.parametrize("mutate, msg", [
    (lambda c: c.update(model_type="llama"), "unknown model_type 'llama'"),
    (lambda c: c.pop("rms_norm_eps"), "'rms_norm_eps'"),
    (lambda c: c.pop("n_group"), "'n_group'"),
    (lambda c: c["rope_parameters"].update(rope_type="longrope", type="longrope"), "longrope"),
    (lambda c: c.update(scoring_func="softmax"), "scoring_func"),
])
def test_bad_config_gives_clear_error(v3, tmp_path, mutate, msg):
    import shutil
    _, path = v3
    dst = tmp_path / "c"
    shutil.copytree(path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    mutate(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        load(dst, max_seq_len=8)


def test_cache_overflow_is_an_error(v3):
    _, path = v3
    m = load(path, max_seq_len=8)
    m(torch.zeros(1, 8, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="exceed the cache"):
        m(torch.zeros(1, 1, dtype=torch.long), 8)


def test_missing_tensor_is_an_error(v3, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = v3
    dst = tmp_path / "c"
    dst.mkdir()
    (dst / "config.json").write_text((path / "config.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.5.up_proj"):
        load(dst, max_seq_len=8)


def test_bfloat16_load_keeps_router_and_index_weights_in_float32(tiny_ckpts):
    m = load(tiny_ckpts["v32-tiny"], max_seq_len=16, dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    gate = m.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    out = m(torch.arange(3, 12)[None], 0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_moe_dispatch_matches_naive_sum_with_empty_slots():
    from v4convert.runtime.common import SwiGLU, moe_dispatch
    torch.manual_seed(4)
    experts = torch.nn.ModuleList(SwiGLU(12, 7) for _ in range(6))
    for p in experts.parameters():
        p.data = torch.randn(p.shape)
    x = torch.randn(5, 12)
    idx = torch.tensor([[3, 1, -1], [0, 5, 2], [4, -1, -1], [2, 0, 1], [-1, -1, 5]])
    w = torch.rand(5, 3)
    ref = torch.stack([sum((experts[e](x[n:n + 1])[0] * w[n, k] for k, e in enumerate(idx[n].tolist()) if e >= 0),
                           torch.zeros(12)) for n in range(5)])
    for out in (moe_dispatch(x, idx, w, experts),                                     # sorted-by-expert path
                torch.cat([moe_dispatch(x[n:n + 1], idx[n:n + 1], w[n:n + 1], experts) for n in range(5)])):  # N == 1
        assert rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("preset", ["v3-tiny", "v32-tiny"])
def test_packed_weights_run_as_stored(tiny_ckpts, preset):
    """``load(packed=True)``: every FP8 linear keeps its stored bytes (no dense weight) and the logits equal the
    dequantized model's (the CPU packed path is float32 dequantize-and-matmul per row tile)."""
    from v4convert.checkpoint import Checkpoint
    from v4convert.runtime.common import Linear
    src = tiny_ckpts[preset]
    dense = load(src, max_seq_len=24)
    packed = load(src, max_seq_len=24, packed=True)
    with Checkpoint.open(src) as ck:
        quantized = {n[: -len(".weight")] for n in ck.names() if ck.tensor_info(n).storage.is_quantized}
    held = {n for n, m in packed.named_modules() if isinstance(m, Linear) and m.packed is not None}
    assert held == quantized
    assert all(packed.get_submodule(n).weight is None for n in held)
    ids = torch.arange(7, 29)[None]
    ref = dense(ids, 0)
    assert rel_err(packed(ids, 0), ref) <= 1e-5
    steps = torch.cat([packed(ids[:, t:t + 1], t) for t in range(ids.shape[1])], dim=1)
    assert rel_err(steps, ref) <= TOL
