"""GGUF tensor names of the DeepSeek archs, one table per llama.cpp arch: our ``Role`` -> GGUF name(s).

Source (facts only): llama.cpp ``src/llama-arch.cpp`` (``LLM_TENSOR_NAMES``), ``src/models/
deepseek2.cpp`` / ``deepseek32.cpp`` / ``deepseek4.cpp`` (``load_arch_tensors``: which tensors each
arch loads, with which ``ne``) and ``conversion/deepseek.py`` (the transforms: ``kv_b`` split into
``attn_k_b`` (transposed, 3-D) and ``attn_v_b``; routed experts stacked into ``ffn_*_exps``; V4
``tid2eid`` as I32). ``{L}`` is the block index (MTP blocks follow the main blocks).

Each entry also says how the exporter treats the tensor's precision (``Precision``); the type mix
itself is the exporter's business. Unknown roles raise ``GGUFNameError``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from v4convert.families.roles import Role
from v4convert.errors import UserError


class GGUFNameError(UserError):
    """A tensor that has no place in the target GGUF arch."""


class GGUFArch(enum.Enum):
    """llama.cpp architecture names (``general.architecture``)."""
    DEEPSEEK2 = "deepseek2"     # V3 / R1 / V3.1
    DEEPSEEK32 = "deepseek32"   # V3.2 (+ lightning indexer)
    DEEPSEEK4 = "deepseek4"     # V4-Flash / V4-Pro


class Kind(enum.Enum):
    PLAIN = "plain"            # one tensor, same values and shape
    KV_B = "kv_b"              # [H*(nope+v), kv_lora] -> attn_k_b [H, kv_lora, nope] + attn_v_b [H, v, kv_lora]
    EXPERTS = "experts"        # per-expert [out, in] matrices stacked to [E, out, in]
    INT32 = "int32"            # integer table stored as GGML I32


class Precision(enum.Enum):
    """How the exporter picks the GGML type of an entry."""
    FLOAT = "float"            # always F32 (norms, router, biases, hyper-connections, sinks, APE)
    MAIN = "main"              # the requested --type (attention, shared experts, dense MLP, embed, head)
    MAIN_8BIT = "main_8bit"    # the --type, but never below 8 bits (MLA attn_k_b / attn_v_b, 3-D)
    EXPERT = "expert"          # the --expert-type (routed experts)
    INT = "int"                # I32


@dataclass(frozen=True)
class Entry:
    names: tuple[str, ...]     # GGUF name templates (two for KV_B: k_b, v_b)
    kind: Kind
    precision: Precision

    def format(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(L=layer) for n in self.names)


def _e(name: str, prec: Precision = Precision.MAIN, kind: Kind = Kind.PLAIN) -> Entry:
    return Entry((name,), kind, prec)


F, M, X = Precision.FLOAT, Precision.MAIN, Precision.EXPERT
# HC roles (V4) are shared by the attention, FFN and head hyper-connections; the site is part of the key.
HCSite = str   # "attn" | "ffn" | "head"
Key = Role | tuple[Role, HCSite]

# Tensors every DeepSeek arch names alike (llama-arch.cpp): globals, the attention front, router, experts.
_COMMON: dict[Key, Entry] = {
    Role.EMBED: _e("token_embd.weight"),
    Role.FINAL_NORM: _e("output_norm.weight", F),
    Role.HEAD: _e("output.weight"),
    Role.ATTN_NORM: _e("blk.{L}.attn_norm.weight", F),
    Role.FFN_NORM: _e("blk.{L}.ffn_norm.weight", F),
    Role.ATTN_Q_A: _e("blk.{L}.attn_q_a.weight"),
    Role.ATTN_Q_A_NORM: _e("blk.{L}.attn_q_a_norm.weight", F),
    Role.ATTN_Q_B: _e("blk.{L}.attn_q_b.weight"),
    Role.ROUTER: _e("blk.{L}.ffn_gate_inp.weight", F),
    Role.ROUTER_BIAS: _e("blk.{L}.exp_probs_b.bias", F),
    Role.EXPERT_GATE: _e("blk.{L}.ffn_gate_exps.weight", X, Kind.EXPERTS),
    Role.EXPERT_UP: _e("blk.{L}.ffn_up_exps.weight", X, Kind.EXPERTS),
    Role.EXPERT_DOWN: _e("blk.{L}.ffn_down_exps.weight", X, Kind.EXPERTS),
    Role.SHARED_GATE: _e("blk.{L}.ffn_gate_shexp.weight"),
    Role.SHARED_UP: _e("blk.{L}.ffn_up_shexp.weight"),
    Role.SHARED_DOWN: _e("blk.{L}.ffn_down_shexp.weight"),
}

_DEEPSEEK2: dict[Key, Entry] = {
    **_COMMON,
    Role.ATTN_KV_A: _e("blk.{L}.attn_kv_a_mqa.weight"),
    Role.ATTN_KV_A_NORM: _e("blk.{L}.attn_kv_a_norm.weight", F),
    Role.ATTN_KV_B: Entry(("blk.{L}.attn_k_b.weight", "blk.{L}.attn_v_b.weight"), Kind.KV_B, Precision.MAIN_8BIT),
    Role.ATTN_O: _e("blk.{L}.attn_output.weight"),
    Role.DENSE_GATE: _e("blk.{L}.ffn_gate.weight"),
    Role.DENSE_UP: _e("blk.{L}.ffn_up.weight"),
    Role.DENSE_DOWN: _e("blk.{L}.ffn_down.weight"),
    # MTP (NextN) block: loaded by deepseek2/deepseek32 as blk.{n_layer + i}
    Role.MTP_EMBED: _e("blk.{L}.nextn.embed_tokens.weight"),
    Role.MTP_ENORM: _e("blk.{L}.nextn.enorm.weight", F),
    Role.MTP_HNORM: _e("blk.{L}.nextn.hnorm.weight", F),
    Role.MTP_EH_PROJ: _e("blk.{L}.nextn.eh_proj.weight"),
    Role.MTP_HEAD_NORM: _e("blk.{L}.nextn.shared_head_norm.weight", F),
    Role.MTP_HEAD: _e("blk.{L}.nextn.shared_head_head.weight"),
}

_DEEPSEEK32: dict[Key, Entry] = {
    **_DEEPSEEK2,
    Role.INDEXER_Q_B: _e("blk.{L}.indexer.attn_q_b.weight"),
    Role.INDEXER_K: _e("blk.{L}.indexer.attn_k.weight"),
    Role.INDEXER_K_NORM: _e("blk.{L}.indexer.k_norm.weight", F),
    Role.INDEXER_K_NORM_BIAS: _e("blk.{L}.indexer.k_norm.bias", F),
    Role.INDEXER_WEIGHTS: _e("blk.{L}.indexer.proj.weight", F),
}

_DEEPSEEK4: dict[Key, Entry] = {
    **_COMMON,
    (Role.HC_FN, "head"): _e("output_hc_fn.weight", F),
    (Role.HC_BASE, "head"): _e("output_hc_base.weight", F),
    (Role.HC_SCALE, "head"): _e("output_hc_scale.weight", F),
    (Role.HC_FN, "attn"): _e("blk.{L}.hc_attn_fn.weight", F),
    (Role.HC_BASE, "attn"): _e("blk.{L}.hc_attn_base.weight", F),
    (Role.HC_SCALE, "attn"): _e("blk.{L}.hc_attn_scale.weight", F),
    (Role.HC_FN, "ffn"): _e("blk.{L}.hc_ffn_fn.weight", F),
    (Role.HC_BASE, "ffn"): _e("blk.{L}.hc_ffn_base.weight", F),
    (Role.HC_SCALE, "ffn"): _e("blk.{L}.hc_ffn_scale.weight", F),
    Role.ATTN_KV: _e("blk.{L}.attn_kv.weight"),
    Role.ATTN_KV_A_NORM: _e("blk.{L}.attn_kv_a_norm.weight", F),     # LLM_TENSOR_ATTN_KV_NORM
    Role.ATTN_O_A: _e("blk.{L}.attn_output_a.weight"),
    Role.ATTN_O_B: _e("blk.{L}.attn_output_b.weight"),
    Role.ATTN_SINK: _e("blk.{L}.attn_sinks.weight", F),
    Role.COMPRESSOR_APE: _e("blk.{L}.attn_compressor_ape.weight", F),
    Role.COMPRESSOR_KV: _e("blk.{L}.attn_compressor_kv.weight"),
    Role.COMPRESSOR_GATE: _e("blk.{L}.attn_compressor_gate.weight"),
    Role.COMPRESSOR_NORM: _e("blk.{L}.attn_compressor_norm.weight", F),
    Role.INDEXER_Q_B: _e("blk.{L}.indexer.attn_q_b.weight"),
    Role.INDEXER_WEIGHTS: _e("blk.{L}.indexer.proj.weight", F),
    Role.INDEXER_COMPRESSOR_APE: _e("blk.{L}.indexer_compressor_ape.weight", F),
    Role.INDEXER_COMPRESSOR_KV: _e("blk.{L}.indexer_compressor_kv.weight"),
    Role.INDEXER_COMPRESSOR_GATE: _e("blk.{L}.indexer_compressor_gate.weight"),
    Role.INDEXER_COMPRESSOR_NORM: _e("blk.{L}.indexer_compressor_norm.weight", F),
    Role.HASH_TABLE: _e("blk.{L}.ffn_gate_tid2eid.weight", Precision.INT, Kind.INT32),
}

TABLES: dict[GGUFArch, dict[Key, Entry]] = {
    GGUFArch.DEEPSEEK2: _DEEPSEEK2,
    GGUFArch.DEEPSEEK32: _DEEPSEEK32,
    GGUFArch.DEEPSEEK4: _DEEPSEEK4,
}

_HC_ROLES = (Role.HC_FN, Role.HC_BASE, Role.HC_SCALE)


def hc_site(name: str) -> HCSite:
    """Which hyper-connection a V4 ``hc_*`` tensor belongs to, from its published name."""
    for site in ("attn", "ffn", "head"):
        if f"hc_{site}_" in name:
            return site
    raise GGUFNameError(f"tensor {name}: not a hyper-connection tensor name")


def entry(arch: GGUFArch, role: Role, name: str) -> Entry:
    """The GGUF entry of tensor ``name`` (our ``role``) in ``arch``; raises if the arch has no place for it."""
    key: Key = (role, hc_site(name)) if role in _HC_ROLES else role
    try:
        return TABLES[arch][key]
    except KeyError:
        raise GGUFNameError(f"tensor {name}: role {role.name} has no GGUF tensor in llama.cpp's {arch.value}") from None
