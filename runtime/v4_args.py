"""``V4Args``: the runtime's typed view of a DeepSeek-V4 ``config.json`` (both key styles).

Published style (DeepSeek HF release): ``compress_ratios`` (one entry per layer + MTP; 0 = sliding only,
4 = CSA, other > 0 = HCA), ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_theta``, ``compress_rope_theta``,
``rope_scaling {"type": "yarn", ...}`` (YaRN on compressed layers only).
transformers 5.24 style (``save_pretrained``): ``layer_types`` + ``compress_rates {type: rate}``,
``mlp_layer_types`` (``hash_moe``/``moe``), ``partial_rotary_factor``, nested
``rope_parameters {"main": {...}, "compress": {...}}``.

Shape facts (hidden, heads, ranks, experts) come from ``v4convert.families.layout.Arch``; the per-layer compression
rates are read here because transformers' ``compress_rates`` may differ from the published 4/128.
Source: transformers 5.24 ``configuration_deepseek_v4.py`` (``__post_init__``: YaRN only on the "compress"
rope, ``attention_factor`` forced to 1.0, i.e. cos/sin not scaled).
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from v4convert.families.layout import Arch, LayoutError
from v4convert.families.roles import Family

from .args import ConfigError, need, rope_params
from .common import RouterSpec, ScoreFunc, Yarn


class AttnKind(enum.Enum):
    """Attention type of one V4 block."""
    SLIDING = "sliding_attention"                 # sliding window only
    CSA = "compressed_sparse_attention"           # + overlapping compressed windows picked by the indexer
    HCA = "heavily_compressed_attention"          # + non-overlapping compressed windows, all visible


CSA_RATIO = 4   # published ``compress_ratios`` value that means CSA (DeepSeek ``overlap = ratio == 4``)


@dataclass(frozen=True)
class V4Args:
    arch: Arch
    kinds: tuple[AttnKind, ...]          # per block (main layers, then MTP blocks)
    ratios: tuple[int, ...]              # compression rate per block (0 for sliding)
    hash_layers: tuple[bool, ...]        # per main layer: hash-routed (tid2eid) MoE
    rope_dim: int                        # trailing rotated channels of each head (qk_rope_head_dim)
    rope_theta: float                    # sliding-only layers ("main" rope, plain)
    compress_rope_theta: float           # compressed layers, compressor and indexer ("compress" rope)
    yarn: Yarn | None                    # YaRN of the "compress" rope
    window: int                          # sliding_window
    index_topk: int
    router: RouterSpec
    swiglu_limit: float
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float

    @property
    def family(self) -> Family:
        return Family.V4

    @staticmethod
    def from_config(cfg: dict, source: str = "config.json") -> "V4Args":
        try:
            arch = Arch.from_config(cfg, source)
        except LayoutError as e:
            raise ConfigError(str(e)) from None
        if arch.family is not Family.V4:
            raise ConfigError(f"{source}: V4Args needs model_type deepseek_v4, got {arch.family.value}")
        n, n_blocks = arch.n_layers, arch.n_blocks
        kinds, ratios = _layer_kinds(cfg, n, n_blocks, source)
        hash_layers = _hash_layers(cfg, n, source)
        head_dim = arch.head_dim
        if cfg.get("qk_rope_head_dim") is not None:
            rope_dim = int(cfg["qk_rope_head_dim"])
        elif cfg.get("partial_rotary_factor") is not None:
            rope_dim = int(head_dim * float(cfg["partial_rotary_factor"]))
        else:
            raise ConfigError(f"{source}: missing required field 'qk_rope_head_dim' (or 'partial_rotary_factor')")
        if rope_dim % 2 or not 0 < rope_dim <= min(head_dim, arch.index_dim):
            raise ConfigError(f"{source}: rope dim {rope_dim} must be even and <= head_dim/index_head_dim")
        theta, c_theta, yarn = _v4_rope(cfg, source)
        score = ScoreFunc(need(cfg, "scoring_func", source))
        # transformers' V4 routers always normalise the chosen weights (norm_topk_prob is not read).
        router = RouterSpec(n_experts=arch.n_experts, top_k=arch.top_k, score_func=score, n_group=1, topk_group=1,
                            norm_topk_prob=True,
                            routed_scaling_factor=need(cfg, "routed_scaling_factor", source, float))
        if arch.o_groups <= 0 or (arch.n_heads * head_dim) % arch.o_groups:
            raise ConfigError(f"{source}: o_groups {arch.o_groups} does not divide heads*head_dim")
        return V4Args(arch=arch, kinds=kinds, ratios=ratios, hash_layers=hash_layers, rope_dim=rope_dim,
                      rope_theta=theta, compress_rope_theta=c_theta, yarn=yarn,
                      window=need(cfg, "sliding_window", source, int),
                      index_topk=need(cfg, "index_topk", source, int), router=router,
                      swiglu_limit=need(cfg, "swiglu_limit", source, float),
                      hc_sinkhorn_iters=need(cfg, "hc_sinkhorn_iters", source, int),
                      hc_eps=need(cfg, "hc_eps", source, float),
                      rms_norm_eps=need(cfg, "rms_norm_eps", source, float))


def _layer_kinds(cfg: dict, n: int, n_blocks: int, source: str) -> tuple[tuple[AttnKind, ...], tuple[int, ...]]:
    """Attention kind and rate per block. transformers style wins when both styles are present (it is what
    ``save_pretrained`` wrote last); MTP blocks absent from ``layer_types`` are sliding (as in the release)."""
    if cfg.get("layer_types") is not None:
        rates = dict(cfg.get("compress_rates") or {})
        default = {AttnKind.CSA.value: CSA_RATIO, AttnKind.HCA.value: 128}
        kinds, ratios = [], []
        for t in cfg["layer_types"]:
            try:
                k = AttnKind(t)
            except ValueError:
                raise ConfigError(f"{source}: unknown V4 layer type {t!r}") from None
            kinds.append(k)
            ratios.append(0 if k is AttnKind.SLIDING else int(rates.get(k.value, default[k.value])))
        if len(kinds) != n:
            raise ConfigError(f"{source}: layer_types has {len(kinds)} entries, num_hidden_layers is {n}")
        kinds += [AttnKind.SLIDING] * (n_blocks - n)
        ratios += [0] * (n_blocks - n)
    elif cfg.get("compress_ratios") is not None:
        ratios = [int(r) for r in cfg["compress_ratios"]][:n_blocks]
        if len(ratios) < n_blocks:
            raise ConfigError(f"{source}: compress_ratios has {len(ratios)} entries, need {n_blocks}")
        kinds = [AttnKind.SLIDING if r == 0 else AttnKind.CSA if r == CSA_RATIO else AttnKind.HCA for r in ratios]
    else:
        raise ConfigError(f"{source}: deepseek_v4 config needs 'compress_ratios' or 'layer_types'")
    bad = [r for r in ratios if r < 0]
    if bad:
        raise ConfigError(f"{source}: negative compression rates {bad}")
    return tuple(kinds), tuple(ratios)


def _hash_layers(cfg: dict, n: int, source: str) -> tuple[bool, ...]:
    if cfg.get("mlp_layer_types") is not None:
        types = list(cfg["mlp_layer_types"])
        unknown = sorted({t for t in types if t not in ("hash_moe", "moe")})
        if unknown or len(types) != n:
            raise ConfigError(f"{source}: mlp_layer_types must be {n} entries of 'hash_moe'/'moe' (got {types})")
        return tuple(t == "hash_moe" for t in types)
    n_hash = need(cfg, "num_hash_layers", source, int)
    return tuple(i < n_hash for i in range(n))


def _v4_rope(cfg: dict, source: str) -> tuple[float, float, Yarn | None]:
    """``(main theta, compress theta, compress YaRN)``. The compress YaRN never scales cos/sin
    (transformers forces ``attention_factor = 1.0``; DeepSeek's reference does not apply the mscale)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        theta, main_yarn = rope_params(rp["main"], f"{source} rope_parameters.main")
        if main_yarn is not None:
            raise ConfigError(f"{source}: rope_parameters.main must be plain RoPE (YaRN is for compressed layers)")
        comp = rp["compress"]
        c_theta, yarn = rope_params({"rope_theta": comp.get("rope_theta"), "rope_scaling": comp},
                                    f"{source} rope_parameters.compress")
    else:
        theta = need(cfg, "rope_theta", source, float)
        scaling = cfg.get("rope_scaling") or (rp if isinstance(rp, dict) else None)
        c_theta, yarn = rope_params({"rope_theta": need(cfg, "compress_rope_theta", source),
                                     "rope_scaling": scaling}, source)
    if yarn is not None and yarn.attention_factor is None:
        yarn = dataclasses.replace(yarn, attention_factor=1.0)
    return float(theta), float(c_theta), yarn
