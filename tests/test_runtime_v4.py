"""DeepSeek-V4 runtime parity against transformers 5.x ``DeepseekV4ForCausalLM`` (float32, tiny random model).

The tiny config covers every V4 path: sliding-only, CSA (ratio 4, overlapping windows, indexer top-k smaller than
the causal entries available) and HCA (rate 8 so entries appear within the 44-token sequence) layers, a hash-routed
and top-k routed MoE layers, hyper-connections (hc_mult 3), YaRN on the compressed rope, a SwiGLU clamp small
enough to bite, odd sizes (head_dim 40 with 10 rotated channels, 5 experts, vocab 101). All parameters and buffers
that transformers initialises to constants (sinks, hc bases/scales, position biases, router bias, tid2eid) are
randomised so that they matter.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache

from v4convert.runtime import load
from v4convert.runtime.args import ConfigError
from v4convert.runtime.v4_args import AttnKind, V4Args

B, T, MAX_SEQ = 2, 44, 64
TOL = 1e-4
LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
               "compressed_sparse_attention"]


def _config() -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=101, hidden_size=56, moe_intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
        head_dim=40, qk_rope_head_dim=10, q_lora_rank=36, num_experts_per_tok=2, n_routed_experts=5,
        n_shared_experts=1, layer_types=LAYER_TYPES, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        hc_mult=3, hc_sinkhorn_iters=7, sliding_window=9, o_groups=2, o_lora_rank=12, index_n_heads=8,
        index_head_dim=24, index_topk=3, swiglu_limit=1.5, routed_scaling_factor=1.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1},
        max_position_embeddings=128, num_nextn_predict_layers=1, rms_norm_eps=1e-6)


def _randomize(model: DeepseekV4ForCausalLM, n_experts: int, top_k: int) -> None:
    g = torch.Generator().manual_seed(1234)

    def rnd(t: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("scale", "hc_scale"):
                p.copy_(rnd(p, 0.3, 1.0))
            elif leaf in ("fn", "hc_fn"):
                p.copy_(rnd(p, 0.1))
            elif p.dim() == 1:            # norm weights ~1, sinks / biases / hc bases ~0
                p.copy_(rnd(p, 0.2, 1.0 if "norm" in name else 0.0))
            else:
                p.copy_(rnd(p, 0.2))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(rnd(b, 0.3))


@pytest.fixture(scope="module")
def single_thread():
    """This machine's cores are shared: one intra-op thread is ~10x faster for these tiny matmuls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):
    cfg = _config()
    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(cfg).float().eval()
    _randomize(hf, cfg.n_routed_experts, cfg.num_experts_per_tok)
    path = tmp_path_factory.mktemp("v4tiny")
    hf.save_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        prefill = hf(ids).logits
        cache = DynamicCache(config=hf.config)
        steps = []
        for t in range(T):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    return path, ids, prefill, torch.cat(steps, dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_tiny_config_exercises_every_path(tiny):
    path, ids, ref, _ = tiny
    a = V4Args.from_config(json.loads((path / "config.json").read_text()))
    assert set(a.kinds[: a.arch.n_layers]) == set(AttnKind)
    assert a.ratios[:4] == (0, 4, 8, 4)
    assert a.hash_layers == (True, False, False, False)
    # the indexer must actually choose: late queries see more causal CSA entries than index_topk
    assert (T // 4) > a.index_topk
    # HCA emits several entries; the sliding window is shorter than the sequence
    assert T // 8 >= 3 and a.window < T
    assert a.yarn is not None and a.yarn.attention_factor == 1.0


def test_prefill_matches_transformers(tiny):
    path, ids, ref, _ = tiny
    model = load(path, max_seq_len=MAX_SEQ, max_batch_size=B)
    out = model(ids, 0)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = _rel(out, ref)
    print(f"V4 prefill rel max err {err:.3e}")
    assert err <= TOL


def test_decode_matches_transformers_and_prefill(tiny):
    path, ids, ref, ref_steps = tiny
    model = load(path, max_seq_len=MAX_SEQ, max_batch_size=B)
    steps = torch.cat([model(ids[:, t:t + 1], t) for t in range(T)], dim=1)
    err = _rel(steps, ref_steps)
    print(f"V4 decode rel max err {err:.3e}; vs own prefill {_rel(steps, model(ids, 0)):.3e}")
    assert err <= TOL
    assert _rel(steps, ref) <= TOL


def test_chunked_prefill_matches_one_prefill(tiny):
    """Prefill in uneven chunks (windows split across calls, ring wrap-around) equals one prefill."""
    path, ids, ref, _ = tiny
    model = load(path, max_seq_len=MAX_SEQ, max_batch_size=B)
    outs, s = [], 0
    for n in (5, 1, 11, 2, 13, 12):
        outs.append(model(ids[:, s:s + n], s))
        s += n
    assert s == T
    assert _rel(torch.cat(outs, dim=1), ref) <= TOL


def test_bounds_are_checked(tiny):
    path, ids, _, _ = tiny
    model = load(path, max_seq_len=MAX_SEQ, max_batch_size=1)
    with pytest.raises(ValueError, match="max_batch_size"):
        model(ids, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids[:1, :8], MAX_SEQ - 4)


# Published DeepSeek-V4-Flash config.json (shared/ref/deepseek-v4-flash.config.json), fields the runtime reads.
FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hc_eps": 1e-06, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_size": 4096, "index_head_dim": 128, "index_n_heads": 64,
    "index_topk": 512, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43,
    "num_hash_layers": 3, "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8,
    "o_lora_rank": 1024, "q_lora_rank": 1024, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "expert_dtype": "fp4",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}


def test_published_config_parses():
    a = V4Args.from_config(FLASH)
    assert len(a.kinds) == 44 and a.kinds[:4] == (AttnKind.SLIDING, AttnKind.SLIDING, AttnKind.CSA, AttnKind.HCA)
    assert a.ratios[2:4] == (4, 128) and a.kinds[-1] is AttnKind.SLIDING        # MTP block
    assert a.hash_layers[:4] == (True, True, True, False) and a.rope_dim == 64
    assert a.yarn.factor == 16 and a.yarn.attention_factor == 1.0 and a.compress_rope_theta == 160000


@pytest.mark.parametrize("edit, match", [
    ({"sliding_window": None}, "sliding_window"),
    ({"layer_types": ["full_attention"] * 43}, "full_attention"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"num_hash_layers": None}, "num_hash_layers"),
    ({"compress_rope_theta": None}, "compress_rope_theta"),
])
def test_bad_config_is_a_clear_error(edit, match):
    cfg = {k: v for k, v in {**FLASH, **edit}.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        V4Args.from_config(cfg)


# ----------------------------------------------------------------------------------------------
# Published layout (FP8 block linears, MXFP4 experts, MTP block): synth preset vs transformers on the
# same dequantized weights.
# ----------------------------------------------------------------------------------------------
T_PUB = 40


@pytest.fixture(scope="module")
def published(tmp_path_factory, single_thread):
    from safetensors.torch import load_file, save_file

    from v4convert.checkpoint import Checkpoint
    from v4convert.families.layout import canonical_name
    from v4convert.synth import synth

    root = tmp_path_factory.mktemp("v4pub")
    synth("v4-flash-tiny", root / "ck")
    ck = Checkpoint.open(root / "ck")
    a = V4Args.from_config(ck.config)
    n = a.arch.n_layers
    # the same model in transformers' config style (its legacy ``compress_ratios`` knows only 0/4/128)
    hcfg = {k: v for k, v in ck.config.items()
            if k not in ("compress_ratios", "num_hash_layers", "quantization_config", "expert_dtype")}
    hcfg.update(layer_types=[k.value for k in a.kinds[:n]],
                compress_rates={k.value: r for k, r in zip(a.kinds[:n], a.ratios[:n]) if r},
                mlp_layer_types=["hash_moe" if h else "moe" for h in a.hash_layers])
    DeepseekV4ForCausalLM(DeepseekV4Config(**hcfg)).save_pretrained(root / "hf")
    st = root / "hf" / "model.safetensors"
    names = load_file(st)
    save_file({k: ck.dequantize(canonical_name(ck.arch, k)).to(v.dtype) for k, v in names.items()}, st,
              metadata={"format": "pt"})
    hf = DeepseekV4ForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, a.arch.vocab, (1, T_PUB), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefill = hf(ids).logits
        cache = DynamicCache(config=hf.config)
        steps = torch.cat([hf(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(T_PUB)], dim=1)
    ck.close()
    return root / "ck", ids, prefill, steps


def test_published_layout_matches_transformers(published):
    path, ids, ref, ref_steps = published
    model = load(path, max_seq_len=T_PUB)
    assert {k for k in model.args.kinds} == set(AttnKind)
    err_p = _rel(model(ids, 0), ref)
    err_d = _rel(torch.cat([model(ids[:, t:t + 1], t) for t in range(T_PUB)], dim=1), ref_steps)
    print(f"V4 published layout (FP8 + MXFP4 experts): prefill rel {err_p:.3e}, decode rel {err_d:.3e}")
    assert err_p <= TOL and err_d <= TOL


def test_mtp_block_is_loaded(published):
    from v4convert.checkpoint import Checkpoint

    path = published[0]
    model = load(path, max_seq_len=8)
    with Checkpoint.open(path) as ck:
        mtp = [n for n in ck.names() if n.startswith("mtp.")]
        assert len(mtp) > 20 and len(model.mtp) == 1
        sd = model.state_dict()
        from v4convert.runtime.deepseek_v4 import model_name
        for name in mtp:
            assert torch.equal(sd[model_name(name)].float(), ck.dequantize(name)), name


def test_simulate_quant_fp8_kv_cache(published):
    """Opt-in DeepSeek simulation: cached KV non-rope channels are FP8 (ue8m0 scales per 64), the rope channels
    stay exact. Default (off) is covered by the parity tests above."""
    from v4convert.runtime.common import fake_quant_fp8_act

    path, ids, ref, _ = published
    model = load(path, max_seq_len=T_PUB, simulate_quant=True)
    out = model(ids, 0)
    rd = model.args.rope_dim
    for layer in model.layers:
        win = layer.attn.win_kv[:1]
        nope = win[..., :-rd]
        assert torch.equal(fake_quant_fp8_act(nope, pow2_scale=True, block=64), nope)
        assert not torch.equal(fake_quant_fp8_act(win[..., -rd:], pow2_scale=True, block=64), win[..., -rd:])
        if layer.attn.compressor is not None:
            ent = layer.attn.compressor.entries[:1, : T_PUB // layer.attn.ratio, :-rd]
            assert torch.equal(fake_quant_fp8_act(ent, pow2_scale=True, block=64), ent)
    # a random tiny model is chaotic (router and indexer choices flip), so only "it changed" is checked here
    assert torch.isfinite(out).all() and _rel(out, ref) > 0


def test_dynamic_routing(published):
    """Opt-in dynamic routing on the top-k layers: top_p=1 with k_min=k_max=top_k is the exact model; top_p
    small with k_min=1 uses fewer experts per token; hash layers keep their table's experts."""
    from v4convert.runtime import DynamicRouting

    path, ids, ref, _ = published
    base = load(path, max_seq_len=T_PUB)
    k = base.args.router.top_k
    exact = load(path, max_seq_len=T_PUB, dynamic_routing=DynamicRouting(top_p=1.0, k_min=k, k_max=k))
    assert torch.equal(exact(ids, 0), base(ids, 0))
    assert exact.routing_stats()["experts_per_token"] == k
    sparse = load(path, max_seq_len=T_PUB, dynamic_routing=DynamicRouting(top_p=0.05, k_min=1, k_max=k))
    out = sparse(ids, 0)
    n_hash = sum(sparse.args.hash_layers)
    stats = sparse.routing_stats()
    n_layers = len(sparse.layers)
    # hash layers use k experts per token, the others exactly one (top_p below any single weight share)
    assert stats["experts_per_token"] == pytest.approx((n_hash * k + (n_layers - n_hash)) / n_layers)
    assert stats["token_layer_calls"] == T_PUB * n_layers
    assert _rel(out, ref) > 0


class _Hiding:
    """A checkpoint view without some tensors (what a truncated download looks like to ``build``)."""

    def __init__(self, ck, hidden: set[str]):
        self._ck, self._hidden = ck, hidden
        self.config, self.root = ck.config, ck.root

    def names(self) -> list[str]:
        return [n for n in self._ck.names() if n not in self._hidden]

    def __getattr__(self, item):
        return getattr(self._ck, item)


@pytest.mark.parametrize("missing", ["layers.1.attn.compressor.ape", "mtp.0.e_proj.weight",
                                     "layers.0.ffn.gate.tid2eid"])
def test_missing_tensor_is_a_clear_error(published, missing):
    from v4convert.checkpoint import Checkpoint
    from v4convert.runtime.common import RuntimeLoadError
    from v4convert.runtime.deepseek_v4 import build, model_name

    with Checkpoint.open(published[0]) as ck:
        assert missing in ck.names()
        with pytest.raises(RuntimeLoadError, match=re.escape(model_name(missing))):
            build(_Hiding(ck, {missing}), torch.device("cpu"), torch.float32, 16)
