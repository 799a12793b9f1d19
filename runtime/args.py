"""``ModelArgs``: the runtime's typed view of a checkpoint's ``config.json``.

Shapes come from ``v4convert.families.layout.Arch`` (one source of shape facts); this module adds the numerics
(norm eps, RoPE theta/YaRN/interleave, routing) and accepts both key styles:
- published (DeepSeek HF release): ``rope_theta`` + ``rope_scaling {"type": "yarn", ...}``, ``scoring_func``;
- transformers 5.x ``save_pretrained``: ``rope_parameters {"rope_type": "yarn", "rope_theta": ..., ...}``,
  ``rope_interleave``.
A missing required field or an unknown architecture raises ``ConfigError`` naming the file and key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from v4convert.families.layout import Arch, LayoutError
from v4convert.families.roles import Family

from .common import RouterSpec, ScoreFunc, Yarn
from v4convert.errors import UserError


class ConfigError(UserError):
    """``config.json`` lacks a field the runtime needs, or holds a value it does not support."""


def need(cfg: dict, key: str, source: str) -> Any:
    """``cfg[key]`` or a ``ConfigError`` naming ``source`` and ``key``."""
    if cfg.get(key) is None:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return cfg[key]


def rope_params(cfg: dict, source: str) -> tuple[float, Yarn | None]:
    """``(rope_theta, yarn or None)`` from either key style.

    transformers' ``rope_parameters`` may be flat (``{"rope_type", "rope_theta", ...}``); a nested per-layer-type
    dict (V4 style) is not handled here. ``rope_type``/``type`` ``"default"`` (or no scaling dict) means plain RoPE.
    """
    rp = cfg.get("rope_parameters")
    rs = cfg.get("rope_scaling")
    scaling = rp if isinstance(rp, dict) and rp else rs
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(rp, dict):
        theta = rp.get("rope_theta")
    if theta is None:
        raise ConfigError(f"{source}: missing required field 'rope_theta' (top level or in rope_parameters)")
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (DeepSeek uses 'yarn')")
    for key in ("factor", "original_max_position_embeddings"):
        if scaling.get(key) is None:
            raise ConfigError(f"{source}: yarn rope scaling is missing {key!r}")
    return float(theta), Yarn(
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(scaling.get("mscale") or 0.0), mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        attention_factor=scaling.get("attention_factor"), truncate=bool(scaling.get("truncate", True)))


@dataclass(frozen=True)
class ModelArgs:
    """Everything the V3-family model code needs (V4 keeps its own numerics next to its model)."""
    arch: Arch
    rms_norm_eps: float
    rope_theta: float
    yarn: Yarn | None
    rope_interleave: bool              # main attention q_pe/k_pe pairing (published V3: interleaved)
    max_position_embeddings: int
    router: RouterSpec
    index_topk: int = 0                # V3.2 sparse attention: keys kept per query
    mtp_eps: float = 1e-6

    @property
    def family(self) -> Family:
        return self.arch.family

    @staticmethod
    def from_config(cfg: dict, source: str = "config.json") -> "ModelArgs":
        try:
            arch = Arch.from_config(cfg, source)
        except LayoutError as e:
            raise ConfigError(str(e)) from None
        if not arch.family.is_v3_like:
            raise ConfigError(f"{source}: ModelArgs covers deepseek_v3/deepseek_v32; {arch.family.value} "
                              "is built by runtime.deepseek_v4")
        theta, yarn = rope_params(cfg, source)
        score = cfg.get("scoring_func", "sigmoid")
        if score != "sigmoid":
            raise ConfigError(f"{source}: {arch.family.value} with scoring_func {score!r} is not supported (sigmoid)")
        method = cfg.get("topk_method", "noaux_tc")
        if method != "noaux_tc":
            raise ConfigError(f"{source}: topk_method {method!r} is not supported (noaux_tc)")
        n_group, topk_group = int(need(cfg, "n_group", source)), int(need(cfg, "topk_group", source))
        if arch.n_experts % n_group or not 1 <= topk_group <= n_group:
            raise ConfigError(f"{source}: n_routed_experts {arch.n_experts} / n_group {n_group} / "
                              f"topk_group {topk_group} are inconsistent")
        if arch.top_k > topk_group * (arch.n_experts // n_group):
            raise ConfigError(f"{source}: num_experts_per_tok {arch.top_k} exceeds the experts of {topk_group} groups")
        router = RouterSpec(n_experts=arch.n_experts, top_k=arch.top_k, score_func=ScoreFunc(score),
                            n_group=n_group, topk_group=topk_group,
                            norm_topk_prob=bool(need(cfg, "norm_topk_prob", source)),
                            routed_scaling_factor=float(need(cfg, "routed_scaling_factor", source)))
        return ModelArgs(
            arch=arch, rms_norm_eps=float(need(cfg, "rms_norm_eps", source)), rope_theta=theta, yarn=yarn,
            # V3.2 main attention is always interleaved (transformers ignores ``rope_interleave`` there)
            rope_interleave=True if arch.family is Family.V32 else bool(cfg.get("rope_interleave", True)),
            max_position_embeddings=int(need(cfg, "max_position_embeddings", source)), router=router,
            index_topk=int(need(cfg, "index_topk", source)) if arch.family is Family.V32 else 0)
