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

transformers = pytest.importorskip("transformers")

from v4convert.runtime import DynamicRouting, RuntimeLoadError, load  # noqa: E402
from v4convert.runtime.args import ConfigError, ModelArgs  # noqa: E402

SEQ = 44
TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """2 shared cores: OpenMP spinning across busy cores makes tiny ops 10x slower; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    cfg = transformers.DeepseekV32Config(**_v3_kwargs(index_n_heads=5, index_head_dim=24, index_topk=13,
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
