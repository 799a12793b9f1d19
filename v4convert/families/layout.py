"""One table per family: every tensor DeepSeek publishes, its role, logical shape and storage.

The same table drives three things, so each fact lives here once:
- ``inventory(arch)``: the full list of tensors a config implies (``inspect CONFIG``, ``synth``);
- ``parse_name(arch, name)``: name -> (role, layer, expert, published storage); unknown names raise;
- size projections of output recipes.

Shapes are logical ``[out, in]`` (what ``dequantize`` returns). ``B(n) = ceil(n / 128)``.
Sources: DESIGN §3; V3 HF release (``model.safetensors.index.json``), transformers 5.24
``deepseek_v3``/``deepseek_v32``/``deepseek_v4`` modules, llama.cpp ``conversion/deepseek.py`` (V4 MTP names).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from v4convert.formats.safetensors_io import ST_DTYPES

from .roles import Family, Group, Role, Storage
from v4convert.errors import UserError

from v4convert.formats.blocks import FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK  # noqa: F401 (re-exported)


class LayoutError(UserError):
    """A config or tensor name that does not fit the family's published layout."""


def B(n: int) -> int:
    """Number of 128-blocks covering ``n`` (edge block partial)."""
    return -(-n // FP8_BLOCK)


# ----------------------------------------------------------------------------------------------
# Architecture facts needed for shapes (the runtime's ModelArgs adds the numerics on top).
# ----------------------------------------------------------------------------------------------
V4_LAYER_TYPE_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4,
                       "heavily_compressed_attention": 128}


# Upper bounds on what a config.json may declare (well above every DeepSeek release: V3 has 61 layers,
# 256 experts, hidden 7168, vocab 129,280). Checked before anything is sized from them, so a damaged
# config cannot make us allocate without bound. Keys absent here are bounded by DEFAULT_MAX.
CONFIG_MAX: dict[str, int] = {
    "num_hidden_layers": 1024, "num_nextn_predict_layers": 16, "n_routed_experts": 4096,
    "num_experts_per_tok": 4096, "n_shared_experts": 64, "first_k_dense_replace": 1024, "num_hash_layers": 1024,
    "vocab_size": 1 << 22, "num_attention_heads": 4096, "index_n_heads": 4096, "o_groups": 4096, "hc_mult": 64,
}
DEFAULT_MAX = 1 << 20                 # widths and ranks (hidden 7168, intermediate 18432)
MAX_EXPERT_SLOTS = 1 << 17            # blocks x routed experts (V3: 62 x 256 = 15,872)
# Keys whose value may be 0 (counts of optional parts); every other bounded key must be >= 1.
CONFIG_MAY_BE_ZERO = {"num_nextn_predict_layers", "n_shared_experts", "first_k_dense_replace", "num_hash_layers"}


def config_int(cfg: dict, key: str, source: str, default: int | None = None) -> int:
    """``cfg[key]`` as a bounded int (one line naming the key when absent, mistyped or out of range)."""
    v = cfg.get(key)
    if v is None:
        if default is not None:
            return default
        raise LayoutError(f"{source}: config is missing required field {key!r}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise LayoutError(f"{source}: {key} must be an integer, got {type(v).__name__} {v!r:.40}")
    lo = 0 if key in CONFIG_MAY_BE_ZERO else 1
    hi = CONFIG_MAX.get(key, DEFAULT_MAX)
    if not lo <= v <= hi:
        raise LayoutError(f"{source}: {key} = {v} is outside [{lo}, {hi}]")
    return v


@dataclass(frozen=True)
class Arch:
    """Shape-relevant facts of one checkpoint, from ``config.json`` (published or transformers style)."""
    family: Family
    hidden: int
    vocab: int
    n_layers: int              # main-model blocks
    n_mtp: int                 # MTP blocks (V3: layers n_layers.., V4: mtp.0..)
    n_heads: int
    q_lora: int
    n_experts: int
    moe_inter: int
    n_shared: int
    top_k: int
    # V3 family
    inter: int = 0             # dense MLP width
    first_dense: int = 0       # layers [0, first_dense) are dense
    kv_lora: int = 0
    nope: int = 0
    rope: int = 0
    v_head: int = 0
    # V3.2 and V4 indexer
    index_heads: int = 0
    index_dim: int = 0
    # V4
    head_dim: int = 0
    o_groups: int = 0
    o_lora: int = 0
    hc_mult: int = 0
    compress_ratios: tuple[int, ...] = ()   # n_layers + n_mtp entries
    n_hash: int = 0
    expert_storage: Storage = Storage.FP8_BLOCK
    scale_dtype: str = "F32"   # FP8 block scale dtype as published: "F32" or "F8_E8M0"

    @staticmethod
    def from_config(cfg: dict, source: str = "config.json") -> "Arch":
        """Build from a published or transformers-style config; unknown ``model_type`` raises."""
        mt = cfg.get("model_type")
        try:
            fam = Family(mt)
        except ValueError:
            known = ", ".join(f.value for f in Family)
            raise LayoutError(f"{source}: unknown model_type {mt!r} (this tool reads {known})") from None

        def need(key: str) -> int:
            if key not in cfg or cfg[key] is None:
                raise LayoutError(f"{source}: {fam.value} config is missing required field {key!r}")
            return config_int(cfg, key, source)

        def opt(key: str) -> int:
            return config_int(cfg, key, source, default=0)

        qc = cfg.get("quantization_config") or {}
        if not isinstance(qc, dict):
            raise LayoutError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
        common = dict(family=fam, hidden=need("hidden_size"), vocab=need("vocab_size"),
                      n_layers=need("num_hidden_layers"), n_mtp=opt("num_nextn_predict_layers"),
                      n_heads=need("num_attention_heads"), q_lora=need("q_lora_rank"),
                      n_experts=need("n_routed_experts"), moe_inter=need("moe_intermediate_size"),
                      n_shared=opt("n_shared_experts"), top_k=need("num_experts_per_tok"),
                      scale_dtype="F8_E8M0" if qc.get("scale_fmt") == "ue8m0" and fam is Family.V4 else "F32")
        blocks = common["n_layers"] + common["n_mtp"]
        if blocks * common["n_experts"] > MAX_EXPERT_SLOTS:
            raise LayoutError(f"{source}: {blocks} blocks x {common['n_experts']} experts is more than any real "
                              f"model has (limit {MAX_EXPERT_SLOTS:,})")
        if common["top_k"] > common["n_experts"]:
            raise LayoutError(f"{source}: num_experts_per_tok {common['top_k']} > n_routed_experts "
                              f"{common['n_experts']}")
        if fam.is_v3_like:
            extra = dict(inter=need("intermediate_size"), first_dense=opt("first_k_dense_replace"),
                         kv_lora=need("kv_lora_rank"), nope=need("qk_nope_head_dim"),
                         rope=need("qk_rope_head_dim"), v_head=need("v_head_dim"))
            if fam is Family.V32:
                extra.update(index_heads=need("index_n_heads"), index_dim=need("index_head_dim"))
            return Arch(**common, **extra)
        # V4: published ``compress_ratios`` (+1 MTP entry) or transformers' ``layer_types``.
        n_layers, n_mtp = common["n_layers"], common["n_mtp"]
        for key in ("compress_ratios", "layer_types", "mlp_layer_types"):
            v = cfg.get(key)
            if v is not None and (not isinstance(v, list) or len(v) > n_layers + n_mtp
                                  or not all(isinstance(x, int if key == "compress_ratios" else str)
                                             and not isinstance(x, bool) for x in v)):
                raise LayoutError(f"{source}: {key} must be a list of at most {n_layers + n_mtp} "
                                  f"{'integers' if key == 'compress_ratios' else 'strings'}")
        if not isinstance(cfg.get("compress_rates") or {}, dict):
            raise LayoutError(f"{source}: compress_rates must be an object")
        if cfg.get("compress_ratios") is not None:
            ratios = tuple(cfg["compress_ratios"])
        elif cfg.get("layer_types") is not None:
            # transformers style: per-layer type names + a rate per type (``compress_rates``).
            rates = {**V4_LAYER_TYPE_RATIO, **(cfg.get("compress_rates") or {}), "sliding_attention": 0}
            try:
                ratios = tuple(int(rates[t]) for t in cfg["layer_types"])
            except KeyError as e:
                raise LayoutError(f"{source}: unknown V4 layer type {e.args[0]!r}") from None
            # Published configs only carry ratios, and DeepSeek's layout keys CSA (indexer,
            # overlapping windows) on ratio 4; other rates are HCA. Refuse what that cannot express.
            if rates["compressed_sparse_attention"] != 4 or rates["heavily_compressed_attention"] == 4:
                raise LayoutError(f"{source}: compress_rates {cfg.get('compress_rates')} cannot be expressed as "
                                  "published compress_ratios (CSA must be 4, HCA must not be 4)")
        else:
            raise LayoutError(f"{source}: deepseek_v4 config needs 'compress_ratios' or 'layer_types'")
        if len(ratios) == n_layers:          # transformers style: no MTP entry; MTP uses sliding only
            ratios = ratios + (0,) * n_mtp
        if len(ratios) < n_layers + n_mtp:
            raise LayoutError(f"{source}: compress_ratios has {len(ratios)} entries, need {n_layers + n_mtp}")
        bad = [r for r in ratios if r not in (0, 4, 128) and r <= 0]
        if bad:
            raise LayoutError(f"{source}: compress_ratios has invalid entries {bad}")
        if cfg.get("num_hash_layers") is not None:
            n_hash = opt("num_hash_layers")
        elif cfg.get("mlp_layer_types") is not None:
            n_hash = sum(1 for t in cfg["mlp_layer_types"] if t == "hash_moe")
        else:
            n_hash = 0
        ed = cfg.get("expert_dtype")
        expert_storage = Storage.MXFP4 if ed == "fp4" else Storage.FP8_BLOCK if qc else Storage.BF16
        return Arch(**common, head_dim=need("head_dim"), o_groups=need("o_groups"), o_lora=need("o_lora_rank"),
                    hc_mult=need("hc_mult"), compress_ratios=ratios[: n_layers + n_mtp], n_hash=n_hash,
                    index_heads=need("index_n_heads"), index_dim=need("index_head_dim"),
                    expert_storage=expert_storage)

    @property
    def n_blocks(self) -> int:
        return self.n_layers + self.n_mtp

    def is_moe(self, layer: int) -> bool:
        return self.family is Family.V4 or layer >= self.first_dense

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer] if self.family is Family.V4 else 0


# ----------------------------------------------------------------------------------------------
# Template rows
# ----------------------------------------------------------------------------------------------
Shape = Callable[[Arch, int], tuple[int, ...]]
When = Callable[[Arch, int], bool]


def _always(a: Arch, layer: int) -> bool:
    return True


@dataclass(frozen=True)
class Row:
    """One tensor template. ``name`` is relative to the block prefix (or absolute for globals);
    ``{e}`` stands for the expert index. ``storage`` is the published storage; ``per_expert`` rows
    repeat for every routed expert."""
    name: str
    role: Role
    shape: Shape
    storage: Storage | Callable[[Arch], Storage]
    when: When = _always
    per_expert: bool = False

    def storage_for(self, a: Arch) -> Storage:
        return self.storage(a) if callable(self.storage) else self.storage


def _fp8(a: Arch) -> Storage:
    return Storage.FP8_BLOCK


# --- V3 / R1 / V3.1 / V3.2 (names relative to ``model.layers.{L}.``) ---------------------------
def _dense(a: Arch, L: int) -> bool:
    return L < a.first_dense


def _moe(a: Arch, L: int) -> bool:
    return L >= a.first_dense


def _v3_mtp(a: Arch, L: int) -> bool:
    return L >= a.n_layers


def _v32(a: Arch, L: int) -> bool:
    return a.family is Family.V32


V3_BLOCK: tuple[Row, ...] = (
    Row("input_layernorm.weight", Role.ATTN_NORM, lambda a, L: (a.hidden,), Storage.BF16),
    Row("self_attn.q_a_proj.weight", Role.ATTN_Q_A, lambda a, L: (a.q_lora, a.hidden), Storage.FP8_BLOCK),
    Row("self_attn.q_a_layernorm.weight", Role.ATTN_Q_A_NORM, lambda a, L: (a.q_lora,), Storage.BF16),
    Row("self_attn.q_b_proj.weight", Role.ATTN_Q_B, lambda a, L: (a.n_heads * (a.nope + a.rope), a.q_lora), Storage.FP8_BLOCK),
    Row("self_attn.kv_a_proj_with_mqa.weight", Role.ATTN_KV_A, lambda a, L: (a.kv_lora + a.rope, a.hidden), Storage.FP8_BLOCK),
    Row("self_attn.kv_a_layernorm.weight", Role.ATTN_KV_A_NORM, lambda a, L: (a.kv_lora,), Storage.BF16),
    Row("self_attn.kv_b_proj.weight", Role.ATTN_KV_B, lambda a, L: (a.n_heads * (a.nope + a.v_head), a.kv_lora), Storage.FP8_BLOCK),
    Row("self_attn.o_proj.weight", Role.ATTN_O, lambda a, L: (a.hidden, a.n_heads * a.v_head), Storage.FP8_BLOCK),
    Row("self_attn.indexer.wq_b.weight", Role.INDEXER_Q_B, lambda a, L: (a.index_heads * a.index_dim, a.q_lora), Storage.FP8_BLOCK, _v32),
    Row("self_attn.indexer.wk.weight", Role.INDEXER_K, lambda a, L: (a.index_dim, a.hidden), Storage.FP8_BLOCK, _v32),
    Row("self_attn.indexer.k_norm.weight", Role.INDEXER_K_NORM, lambda a, L: (a.index_dim,), Storage.F32, _v32),
    Row("self_attn.indexer.k_norm.bias", Role.INDEXER_K_NORM_BIAS, lambda a, L: (a.index_dim,), Storage.F32, _v32),
    Row("self_attn.indexer.weights_proj.weight", Role.INDEXER_WEIGHTS, lambda a, L: (a.index_heads, a.hidden), Storage.BF16, _v32),
    Row("post_attention_layernorm.weight", Role.FFN_NORM, lambda a, L: (a.hidden,), Storage.BF16),
    Row("mlp.gate_proj.weight", Role.DENSE_GATE, lambda a, L: (a.inter, a.hidden), Storage.FP8_BLOCK, _dense),
    Row("mlp.up_proj.weight", Role.DENSE_UP, lambda a, L: (a.inter, a.hidden), Storage.FP8_BLOCK, _dense),
    Row("mlp.down_proj.weight", Role.DENSE_DOWN, lambda a, L: (a.hidden, a.inter), Storage.FP8_BLOCK, _dense),
    Row("mlp.gate.weight", Role.ROUTER, lambda a, L: (a.n_experts, a.hidden), Storage.BF16, _moe),
    Row("mlp.gate.e_score_correction_bias", Role.ROUTER_BIAS, lambda a, L: (a.n_experts,), Storage.F32, _moe),
    Row("mlp.experts.{e}.gate_proj.weight", Role.EXPERT_GATE, lambda a, L: (a.moe_inter, a.hidden), Storage.FP8_BLOCK, _moe, True),
    Row("mlp.experts.{e}.up_proj.weight", Role.EXPERT_UP, lambda a, L: (a.moe_inter, a.hidden), Storage.FP8_BLOCK, _moe, True),
    Row("mlp.experts.{e}.down_proj.weight", Role.EXPERT_DOWN, lambda a, L: (a.hidden, a.moe_inter), Storage.FP8_BLOCK, _moe, True),
    Row("mlp.shared_experts.gate_proj.weight", Role.SHARED_GATE, lambda a, L: (a.moe_inter * a.n_shared, a.hidden), Storage.FP8_BLOCK, _moe),
    Row("mlp.shared_experts.up_proj.weight", Role.SHARED_UP, lambda a, L: (a.moe_inter * a.n_shared, a.hidden), Storage.FP8_BLOCK, _moe),
    Row("mlp.shared_experts.down_proj.weight", Role.SHARED_DOWN, lambda a, L: (a.hidden, a.moe_inter * a.n_shared), Storage.FP8_BLOCK, _moe),
    Row("embed_tokens.weight", Role.MTP_EMBED, lambda a, L: (a.vocab, a.hidden), Storage.BF16, _v3_mtp),
    Row("enorm.weight", Role.MTP_ENORM, lambda a, L: (a.hidden,), Storage.BF16, _v3_mtp),
    Row("hnorm.weight", Role.MTP_HNORM, lambda a, L: (a.hidden,), Storage.BF16, _v3_mtp),
    Row("eh_proj.weight", Role.MTP_EH_PROJ, lambda a, L: (a.hidden, 2 * a.hidden), Storage.BF16, _v3_mtp),
    Row("shared_head.norm.weight", Role.MTP_HEAD_NORM, lambda a, L: (a.hidden,), Storage.BF16, _v3_mtp),
    Row("shared_head.head.weight", Role.MTP_HEAD, lambda a, L: (a.vocab, a.hidden), Storage.BF16, _v3_mtp),
)
V3_GLOBAL: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", Role.EMBED, lambda a, L: (a.vocab, a.hidden), Storage.BF16),
    Row("model.norm.weight", Role.FINAL_NORM, lambda a, L: (a.hidden,), Storage.BF16),
    Row("lm_head.weight", Role.HEAD, lambda a, L: (a.vocab, a.hidden), Storage.BF16),
)


# --- V4 (names relative to ``layers.{L}.`` or ``mtp.{i}.``) -----------------------------------
def _mix(a: Arch) -> int:
    """Rows of a hyper-connection projection: pre (hc) + post (hc) + residual (hc*hc) weights."""
    return (2 + a.hc_mult) * a.hc_mult


def _compressed(a: Arch, L: int) -> bool:
    return a.ratio(L) > 0


def _csa(a: Arch, L: int) -> bool:
    """Compressed sparse attention (ratio 4) has an indexer and overlapping windows (2x width)."""
    return a.ratio(L) == 4


def _coff(a: Arch, L: int) -> int:
    return 2 if _csa(a, L) else 1


def _hash(a: Arch, L: int) -> bool:
    return L < a.n_hash


def _not_hash(a: Arch, L: int) -> bool:
    return L >= a.n_hash


def _v4_mtp(a: Arch, L: int) -> bool:
    return L >= a.n_layers


def _expert_storage(a: Arch) -> Storage:
    return a.expert_storage


V4_BLOCK: tuple[Row, ...] = (
    Row("attn_norm.weight", Role.ATTN_NORM, lambda a, L: (a.hidden,), Storage.BF16),
    Row("ffn_norm.weight", Role.FFN_NORM, lambda a, L: (a.hidden,), Storage.BF16),
    Row("hc_attn_fn", Role.HC_FN, lambda a, L: (_mix(a), a.hc_mult * a.hidden), Storage.F32),
    Row("hc_attn_base", Role.HC_BASE, lambda a, L: (_mix(a),), Storage.F32),
    Row("hc_attn_scale", Role.HC_SCALE, lambda a, L: (3,), Storage.F32),
    Row("hc_ffn_fn", Role.HC_FN, lambda a, L: (_mix(a), a.hc_mult * a.hidden), Storage.F32),
    Row("hc_ffn_base", Role.HC_BASE, lambda a, L: (_mix(a),), Storage.F32),
    Row("hc_ffn_scale", Role.HC_SCALE, lambda a, L: (3,), Storage.F32),
    Row("attn.wq_a.weight", Role.ATTN_Q_A, lambda a, L: (a.q_lora, a.hidden), Storage.FP8_BLOCK),
    Row("attn.q_norm.weight", Role.ATTN_Q_A_NORM, lambda a, L: (a.q_lora,), Storage.BF16),
    Row("attn.wq_b.weight", Role.ATTN_Q_B, lambda a, L: (a.n_heads * a.head_dim, a.q_lora), Storage.FP8_BLOCK),
    Row("attn.wkv.weight", Role.ATTN_KV, lambda a, L: (a.head_dim, a.hidden), Storage.FP8_BLOCK),
    Row("attn.norm.weight", Role.ATTN_KV_A_NORM, lambda a, L: (a.head_dim,), Storage.BF16),
    Row("attn.wo_a.weight", Role.ATTN_O_A, lambda a, L: (a.o_groups * a.o_lora, a.n_heads * a.head_dim // a.o_groups), Storage.FP8_BLOCK),
    Row("attn.wo_b.weight", Role.ATTN_O_B, lambda a, L: (a.hidden, a.o_groups * a.o_lora), Storage.FP8_BLOCK),
    Row("attn.attn_sink", Role.ATTN_SINK, lambda a, L: (a.n_heads,), Storage.F32),
    Row("attn.compressor.ape", Role.COMPRESSOR_APE, lambda a, L: (a.ratio(L), _coff(a, L) * a.head_dim), Storage.F32, _compressed),
    Row("attn.compressor.wkv.weight", Role.COMPRESSOR_KV, lambda a, L: (_coff(a, L) * a.head_dim, a.hidden), Storage.BF16, _compressed),
    Row("attn.compressor.wgate.weight", Role.COMPRESSOR_GATE, lambda a, L: (_coff(a, L) * a.head_dim, a.hidden), Storage.BF16, _compressed),
    Row("attn.compressor.norm.weight", Role.COMPRESSOR_NORM, lambda a, L: (a.head_dim,), Storage.BF16, _compressed),
    Row("attn.indexer.wq_b.weight", Role.INDEXER_Q_B, lambda a, L: (a.index_heads * a.index_dim, a.q_lora), Storage.FP8_BLOCK, _csa),
    Row("attn.indexer.weights_proj.weight", Role.INDEXER_WEIGHTS, lambda a, L: (a.index_heads, a.hidden), Storage.BF16, _csa),
    Row("attn.indexer.compressor.ape", Role.INDEXER_COMPRESSOR_APE, lambda a, L: (a.ratio(L), 2 * a.index_dim), Storage.F32, _csa),
    Row("attn.indexer.compressor.wkv.weight", Role.INDEXER_COMPRESSOR_KV, lambda a, L: (2 * a.index_dim, a.hidden), Storage.BF16, _csa),
    Row("attn.indexer.compressor.wgate.weight", Role.INDEXER_COMPRESSOR_GATE, lambda a, L: (2 * a.index_dim, a.hidden), Storage.BF16, _csa),
    Row("attn.indexer.compressor.norm.weight", Role.INDEXER_COMPRESSOR_NORM, lambda a, L: (a.index_dim,), Storage.BF16, _csa),
    Row("ffn.gate.weight", Role.ROUTER, lambda a, L: (a.n_experts, a.hidden), Storage.BF16),
    Row("ffn.gate.tid2eid", Role.HASH_TABLE, lambda a, L: (a.vocab, a.top_k), Storage.I64, _hash),
    Row("ffn.gate.bias", Role.ROUTER_BIAS, lambda a, L: (a.n_experts,), Storage.F32, _not_hash),
    Row("ffn.experts.{e}.w1.weight", Role.EXPERT_GATE, lambda a, L: (a.moe_inter, a.hidden), _expert_storage, _always, True),
    Row("ffn.experts.{e}.w2.weight", Role.EXPERT_DOWN, lambda a, L: (a.hidden, a.moe_inter), _expert_storage, _always, True),
    Row("ffn.experts.{e}.w3.weight", Role.EXPERT_UP, lambda a, L: (a.moe_inter, a.hidden), _expert_storage, _always, True),
    Row("ffn.shared_experts.w1.weight", Role.SHARED_GATE, lambda a, L: (a.moe_inter * a.n_shared, a.hidden), Storage.FP8_BLOCK),
    Row("ffn.shared_experts.w2.weight", Role.SHARED_DOWN, lambda a, L: (a.hidden, a.moe_inter * a.n_shared), Storage.FP8_BLOCK),
    Row("ffn.shared_experts.w3.weight", Role.SHARED_UP, lambda a, L: (a.moe_inter * a.n_shared, a.hidden), Storage.FP8_BLOCK),
    Row("e_proj.weight", Role.MTP_E_PROJ, lambda a, L: (a.hidden, a.hidden), Storage.FP8_BLOCK, _v4_mtp),
    Row("h_proj.weight", Role.MTP_H_PROJ, lambda a, L: (a.hidden, a.hidden), Storage.FP8_BLOCK, _v4_mtp),
    Row("enorm.weight", Role.MTP_ENORM, lambda a, L: (a.hidden,), Storage.BF16, _v4_mtp),
    Row("hnorm.weight", Role.MTP_HNORM, lambda a, L: (a.hidden,), Storage.BF16, _v4_mtp),
    Row("norm.weight", Role.MTP_HEAD_NORM, lambda a, L: (a.hidden,), Storage.BF16, _v4_mtp),
    Row("hc_head_fn", Role.HC_FN, lambda a, L: (a.hc_mult, a.hc_mult * a.hidden), Storage.F32, _v4_mtp),
    Row("hc_head_base", Role.HC_BASE, lambda a, L: (a.hc_mult,), Storage.F32, _v4_mtp),
    Row("hc_head_scale", Role.HC_SCALE, lambda a, L: (1,), Storage.F32, _v4_mtp),
)
V4_GLOBAL: tuple[Row, ...] = (
    Row("embed.weight", Role.EMBED, lambda a, L: (a.vocab, a.hidden), Storage.BF16),
    Row("hc_head_fn", Role.HC_FN, lambda a, L: (a.hc_mult, a.hc_mult * a.hidden), Storage.F32),
    Row("hc_head_base", Role.HC_BASE, lambda a, L: (a.hc_mult,), Storage.F32),
    Row("hc_head_scale", Role.HC_SCALE, lambda a, L: (1,), Storage.F32),
    Row("norm.weight", Role.FINAL_NORM, lambda a, L: (a.hidden,), Storage.BF16),
    Row("head.weight", Role.HEAD, lambda a, L: (a.vocab, a.hidden), Storage.BF16),
)


@dataclass(frozen=True)
class FamilyLayout:
    """Block rows, global rows and block-name prefixes of one family."""
    block: tuple[Row, ...]
    globals_: tuple[Row, ...]
    block_re: re.Pattern            # groups: (prefix, index, rest)
    main_prefix: str                # format with L
    mtp_prefix: str                 # format with L (V3) or i (V4)
    scale_suffix: str               # published FP8/FP4 scale suffix replacing ".weight"
    aliases: dict[str, str] = field(default_factory=dict)   # other writers' names -> published

    def block_prefix(self, a: Arch, L: int) -> str:
        if L >= a.n_layers and self.mtp_prefix != self.main_prefix:
            return self.mtp_prefix.format(L - a.n_layers)
        return self.main_prefix.format(L)


V3_LAYOUT = FamilyLayout(V3_BLOCK, V3_GLOBAL, re.compile(r"^(model\.layers)\.(\d+)\.(.+)$"),
                         "model.layers.{}.", "model.layers.{}.", ".weight_scale_inv")
V4_LAYOUT = FamilyLayout(
    V4_BLOCK, V4_GLOBAL, re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$"), "layers.{}.", "mtp.{}.", ".scale",
    # transformers' save_pretrained of DeepseekV4ForCausalLM writes these names (checked on 5.24)
    aliases={"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
             "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"},
)
LAYOUTS = {Family.V3: V3_LAYOUT, Family.V32: V3_LAYOUT, Family.V4: V4_LAYOUT}


# ----------------------------------------------------------------------------------------------
# Inventory and parsing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """One logical tensor of a checkpoint as the family publishes it."""
    name: str
    role: Role
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]
    storage: Storage
    mtp: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def inventory(a: Arch, layers: set[int] | None = None, globals_: bool = True) -> Iterator[Slot]:
    """Every logical tensor implied by ``a`` in published order (blocks, then globals).

    ``layers``: block indices to include (MTP blocks are ``n_layers + i``); ``None`` = all.
    """
    lay = LAYOUTS[a.family]
    for L in range(a.n_blocks):
        if layers is not None and L not in layers:
            continue
        prefix = lay.block_prefix(a, L)
        mtp = L >= a.n_layers
        for row in lay.block:
            if not row.when(a, L):
                continue
            shape = row.shape(a, L)
            st = row.storage_for(a)
            if row.per_expert:
                for e in range(a.n_experts):
                    yield Slot(prefix + row.name.format(e=e), row.role, L, e, shape, st, mtp)
            else:
                yield Slot(prefix + row.name, row.role, L, None, shape, st, mtp)
    if globals_:
        for row in lay.globals_:
            yield Slot(row.name, row.role, None, None, row.shape(a, -1), row.storage_for(a), False)


_EXPERT_RE = re.compile(r"experts\.(\d+)\.")


def parse_name(a: Arch, name: str) -> Slot:
    """Map a logical tensor name (published or a known alias) to its slot; unknown names raise."""
    lay = LAYOUTS[a.family]
    canon = canonical_name(a, name)
    for row in lay.globals_:
        if row.name == canon:
            return Slot(canon, row.role, None, None, row.shape(a, -1), row.storage_for(a), False)
    m = lay.block_re.match(canon)
    if m is None:
        raise LayoutError(f"tensor {name}: not a known {a.family.value} tensor name")
    prefix, idx, rest = m.group(1), int(m.group(2)), m.group(3)
    L = a.n_layers + idx if prefix == "mtp" else idx
    if L >= a.n_blocks or (prefix == "mtp" and idx >= a.n_mtp):
        raise LayoutError(f"tensor {name}: block {idx} is out of range for this config "
                          f"({a.n_layers} layers + {a.n_mtp} MTP)")
    expert = None
    em = _EXPERT_RE.search(rest)
    if em is not None:
        expert = int(em.group(1))
        rest = rest[: em.start()] + "experts.{e}." + rest[em.end():]
    for row in lay.block:
        if row.name == rest and row.per_expert == (expert is not None):
            if not row.when(a, L):
                raise LayoutError(f"tensor {name}: {row.role.name} does not belong in block {idx} of this config")
            if expert is not None and expert >= a.n_experts:
                raise LayoutError(f"tensor {name}: expert {expert} >= n_routed_experts {a.n_experts}")
            return Slot(canon, row.role, L, expert, row.shape(a, L), row.storage_for(a), L >= a.n_layers)
    raise LayoutError(f"tensor {name}: not a known {a.family.value} tensor name")


def canonical_name(a: Arch, name: str) -> str:
    """Published name for ``name``: strips transformers' ``model.`` prefix on V4 and applies aliases."""
    lay = LAYOUTS[a.family]
    if a.family is Family.V4 and name.startswith("model."):
        name = name[len("model."):]
    return lay.aliases.get(name, name)


def scale_name(a: Arch, weight_name: str) -> str:
    """Published name of the block-scale tensor paired with ``weight_name``."""
    return weight_name[: -len(".weight")] + LAYOUTS[a.family].scale_suffix


# ----------------------------------------------------------------------------------------------
# Stored tensors of a slot as published (name, safetensors dtype, shape)
# ----------------------------------------------------------------------------------------------
def published_scale_dtype(a: Arch, slot: Slot) -> str:
    """FP8 block-scale dtype as published. V4 "-Base" releases keep FP8 experts with F32 128x128
    scales while their other FP8 linears follow ``scale_fmt`` (E8M0 for ``ue8m0``)."""
    if a.family is Family.V4 and slot.role.group is Group.EXPERT:
        return "F32"
    return a.scale_dtype


def stored_tensors(a: Arch, slot: Slot, storage: Storage | None = None,
                   scale_dtype: str | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """The safetensors entries that hold ``slot`` in ``storage`` (default: published), in write order."""
    st = storage or slot.storage
    sd = scale_dtype or published_scale_dtype(a, slot)
    if st is Storage.BF16:
        return [(slot.name, "BF16", slot.shape)]
    if st is Storage.F16:
        return [(slot.name, "F16", slot.shape)]
    if st is Storage.F32:
        return [(slot.name, "F32", slot.shape)]
    if st is Storage.I64:
        return [(slot.name, "I64", slot.shape)]
    out_f, in_f = slot.shape
    if st is Storage.FP8_BLOCK:
        return [(slot.name, "F8_E4M3", slot.shape), (scale_name(a, slot.name), sd, (B(out_f), B(in_f)))]
    if st is Storage.MXFP4:
        return [(slot.name, "I8", (out_f, in_f // 2)),
                (scale_name(a, slot.name), "F8_E8M0", (out_f, in_f // MXFP4_BLOCK))]
    stem = slot.name[: -len(".weight")]
    if st is Storage.NVFP4_CT:
        return [(stem + ".weight_packed", "U8", (out_f, in_f // 2)),
                (stem + ".weight_scale", "F8_E4M3", (out_f, in_f // NVFP4_BLOCK)),
                (stem + ".weight_global_scale", "F32", (1,))]
    if st is Storage.NVFP4_MODELOPT:
        return [(slot.name, "U8", (out_f, in_f // 2)),
                (stem + ".weight_scale", "F8_E4M3", (out_f, in_f // NVFP4_BLOCK)),
                (stem + ".weight_scale_2", "F32", ())]
    raise LayoutError(f"tensor {slot.name}: {st.value} is not a published storage")


def stored_bytes(a: Arch, slot: Slot, storage: Storage | None = None) -> int:
    """Bytes on disk of ``slot`` (weight + scales) in ``storage`` (default: published)."""
    return sum(ST_DTYPES[dt][1] * math.prod(shape) for _, dt, shape in stored_tensors(a, slot, storage))
