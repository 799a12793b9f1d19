"""Typed vocabulary of a DeepSeek checkpoint: families, tensor roles, and storage codecs.

Every tensor name of every family maps to exactly one ``Role`` (see ``v4convert.families.layout``);
recipes, exporters and the runtime dispatch on these enums, never on name strings.
"""
from __future__ import annotations

import enum


class Family(enum.Enum):
    """A checkpoint family, keyed by ``config.json``'s ``model_type``."""
    V3 = "deepseek_v3"     # V3, R1, V3.1 (671B)
    V32 = "deepseek_v32"   # V3.2: V3.1 + lightning indexer
    V4 = "deepseek_v4"     # V4-Flash (284B), V4-Pro (1.6T)

    @property
    def is_v3_like(self) -> bool:
        return self in (Family.V3, Family.V32)


# Router keys of DeepSeek's released config.json per family. transformers 5 drops them from the configs it
# writes; vLLM reads them to build the router (without them: softmax routing, no e_score_correction_bias).
RELEASE_ROUTING: dict[Family, dict[str, str]] = {
    Family.V3: {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    Family.V32: {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    Family.V4: {"topk_method": "noaux_tc", "scoring_func": "sqrtsoftplus"},
}


class Group(enum.Enum):
    """Coarse grouping of roles; recipes are written per group with per-role overrides."""
    EMBED = "embed"
    HEAD = "head"
    NORM = "norm"
    ATTENTION = "attention"        # attention projections (quantizable linears)
    ATTENTION_OTHER = "attention_other"  # sinks and other small attention parameters
    INDEXER = "indexer"            # V3.2/V4 lightning indexer
    COMPRESSOR = "compressor"      # V4 KV compressors
    DENSE_MLP = "dense_mlp"
    ROUTER = "router"
    EXPERT = "expert"
    SHARED_EXPERT = "shared_expert"
    HYPER = "hyper_connection"
    MTP = "mtp"                    # MTP-only glue (eh_proj, e/h_proj, enorm/hnorm)


class Role(enum.Enum):
    """What a tensor is. Value = (name, group, is_linear): linears are 2-D ``[out, in]`` matmul weights."""
    EMBED = ("embed", Group.EMBED, False)
    HEAD = ("head", Group.HEAD, True)
    FINAL_NORM = ("final_norm", Group.NORM, False)
    ATTN_NORM = ("attn_norm", Group.NORM, False)
    FFN_NORM = ("ffn_norm", Group.NORM, False)
    # MLA (V3 family) and V4 attention
    ATTN_Q_A = ("attn_q_a", Group.ATTENTION, True)          # V3 q_a_proj / V4 wq_a
    ATTN_Q_A_NORM = ("attn_q_a_norm", Group.NORM, False)         # V3 q_a_layernorm / V4 q_norm
    ATTN_Q_B = ("attn_q_b", Group.ATTENTION, True)          # V3 q_b_proj / V4 wq_b
    ATTN_KV_A = ("attn_kv_a", Group.ATTENTION, True)         # V3 kv_a_proj_with_mqa (kv_lora + rope rows)
    ATTN_KV_A_NORM = ("attn_kv_a_norm", Group.NORM, False)        # V3 kv_a_layernorm / V4 attn.norm
    ATTN_KV_B = ("attn_kv_b", Group.ATTENTION, True)         # V3 kv_b_proj
    ATTN_O = ("attn_o", Group.ATTENTION, True)            # V3 o_proj
    ATTN_KV = ("attn_kv", Group.ATTENTION, True)           # V4 wkv (single shared KV head)
    ATTN_O_A = ("attn_o_a", Group.ATTENTION, True)          # V4 grouped output projection, first half
    ATTN_O_B = ("attn_o_b", Group.ATTENTION, True)          # V4 wo_b
    ATTN_SINK = ("attn_sink", Group.ATTENTION_OTHER, False)  # V4 per-head attention sink logits
    # lightning indexer (V3.2 and V4)
    INDEXER_Q_B = ("indexer_q_b", Group.INDEXER, True)
    INDEXER_K = ("indexer_k", Group.INDEXER, True)           # V3.2 wk
    INDEXER_K_NORM = ("indexer_k_norm", Group.INDEXER, False)     # V3.2 LayerNorm weight
    INDEXER_K_NORM_BIAS = ("indexer_k_norm_bias", Group.INDEXER, False)
    INDEXER_WEIGHTS = ("indexer_weights", Group.INDEXER, True)     # weights_proj (per-head weights)
    # V4 compressors (main attention and the indexer's own)
    COMPRESSOR_APE = ("compressor_ape", Group.COMPRESSOR, False)
    COMPRESSOR_KV = ("compressor_kv", Group.COMPRESSOR, True)
    COMPRESSOR_GATE = ("compressor_gate", Group.COMPRESSOR, True)
    COMPRESSOR_NORM = ("compressor_norm", Group.COMPRESSOR, False)
    INDEXER_COMPRESSOR_APE = ("indexer_compressor_ape", Group.COMPRESSOR, False)
    INDEXER_COMPRESSOR_KV = ("indexer_compressor_kv", Group.COMPRESSOR, True)
    INDEXER_COMPRESSOR_GATE = ("indexer_compressor_gate", Group.COMPRESSOR, True)
    INDEXER_COMPRESSOR_NORM = ("indexer_compressor_norm", Group.COMPRESSOR, False)
    # feed-forward
    DENSE_GATE = ("dense_gate", Group.DENSE_MLP, True)
    DENSE_UP = ("dense_up", Group.DENSE_MLP, True)
    DENSE_DOWN = ("dense_down", Group.DENSE_MLP, True)
    ROUTER = ("router", Group.ROUTER, True)
    ROUTER_BIAS = ("router_bias", Group.ROUTER, False)         # selection bias (V3 e_score_correction_bias, V4 gate.bias)
    HASH_TABLE = ("hash_table", Group.ROUTER, False)          # V4 tid2eid [vocab, top_k] int64
    EXPERT_GATE = ("expert_gate", Group.EXPERT, True)          # w1 / gate_proj
    EXPERT_UP = ("expert_up", Group.EXPERT, True)            # w3 / up_proj
    EXPERT_DOWN = ("expert_down", Group.EXPERT, True)          # w2 / down_proj
    SHARED_GATE = ("shared_gate", Group.SHARED_EXPERT, True)
    SHARED_UP = ("shared_up", Group.SHARED_EXPERT, True)
    SHARED_DOWN = ("shared_down", Group.SHARED_EXPERT, True)
    # V4 manifold-constrained hyper-connections (per block: attn and ffn; and the final head)
    HC_FN = ("hc_fn", Group.HYPER, False)
    HC_BASE = ("hc_base", Group.HYPER, False)
    HC_SCALE = ("hc_scale", Group.HYPER, False)
    # MTP (multi-token prediction) glue; its block uses the ordinary roles with ``mtp=True``
    MTP_EMBED = ("mtp_embed", Group.EMBED, False)            # V3 layers.61.embed_tokens
    MTP_ENORM = ("mtp_enorm", Group.NORM, False)
    MTP_HNORM = ("mtp_hnorm", Group.NORM, False)
    MTP_EH_PROJ = ("mtp_eh_proj", Group.MTP, True)             # V3 eh_proj [H, 2H]
    MTP_E_PROJ = ("mtp_e_proj", Group.MTP, True)              # V4 e_proj [H, H]
    MTP_H_PROJ = ("mtp_h_proj", Group.MTP, True)              # V4 h_proj [H, H]
    MTP_HEAD_NORM = ("mtp_head_norm", Group.NORM, False)
    MTP_HEAD = ("mtp_head", Group.HEAD, True)               # V3 layers.61.shared_head.head

    @property
    def group(self) -> Group:
        return self.value[1]

    @property
    def is_linear(self) -> bool:
        return self.value[2]


class Storage(enum.Enum):
    """How a logical tensor is stored on disk (one or more safetensors entries)."""
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"
    I64 = "i64"
    FP8_BLOCK = "fp8_block"          # F8_E4M3 weight + [B(out), B(in)] scale (F32 or E8M0), B = 128
    MXFP4 = "mxfp4"                  # I8 [out, in/2] E2M1 pairs + F8_E8M0 [out, in/32] (DeepSeek V4 experts)
    NVFP4_CT = "nvfp4_ct"            # compressed-tensors: weight_packed U8, weight_scale E4M3 [out, in/16], weight_global_scale
    NVFP4_MODELOPT = "nvfp4_modelopt"  # ModelOpt: weight U8, weight_scale E4M3, weight_scale_2 F32

    @property
    def is_quantized(self) -> bool:
        return self in (Storage.FP8_BLOCK, Storage.MXFP4, Storage.NVFP4_CT, Storage.NVFP4_MODELOPT)
