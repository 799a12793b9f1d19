"""``ModelArgs``: the runtime's typed view of a checkpoint's ``config.json``.

Shapes come from ``v4convert.families.layout.Arch`` (one source of shape facts); this module adds the numerics
(norm eps, RoPE theta/YaRN/interleave, routing) and accepts both key styles:
- published (DeepSeek HF release): ``rope_theta`` + ``rope_scaling {"type": "yarn", ...}``, ``scoring_func``;
- transformers 5.x ``save_pretrained``: ``rope_parameters {"rope_type": "yarn", "rope_theta": ..., ...}``,
  ``rope_interleave``.
A missing required field or an unknown architecture raises ``ConfigError`` naming the file and key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from v4convert.families.layout import Arch, LayoutError
from v4convert.families.roles import Family

from .common import RouterSpec, ScoreFunc, Yarn
from v4convert.errors import UserError


class ConfigError(UserError):
    """``config.json`` lacks a field the runtime needs, or holds a value it does not support."""


def typed(v: Any, key: str, source: str, kind: type | None) -> Any:
    """``v`` checked as ``kind`` (``int``: an integer; ``float``: a finite number; None: as is)."""
    if kind is None:
        return v
    ok = not isinstance(v, bool) and (isinstance(v, int) if kind is int else isinstance(v, (int, float)))
    if not ok or (kind is float and not math.isfinite(v)):
        raise ConfigError(f"{source}: {key} must be {'an integer' if kind is int else 'a finite number'}, "
                          f"got {v!r:.40}")
    return kind(v)


def need(cfg: dict, key: str, source: str, kind: type | None = None) -> Any:
    """``cfg[key]`` (typed as ``kind``) or a ``ConfigError`` naming ``source`` and ``key``."""
    if cfg.get(key) is None:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return typed(cfg[key], key, source, kind)


def rope_params(cfg: dict, source: str) -> tuple[float, Yarn | None]:
    """``(rope_theta, yarn or None)`` from either key style.

    transformers' ``rope_parameters`` may be flat (``{"rope_type", "rope_theta", ...}``); a nested per-layer-type
    dict (V4 style) is not handled here. ``rope_type``/``type`` ``"default"`` (or no scaling dict) means plain RoPE.
    """
    rp = cfg.get("rope_parameters")
    rs = cfg.get("rope_scaling")
    scaling = rp if isinstance(rp, dict) and rp else rs
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {type(scaling).__name__}")
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(rp, dict):
        theta = rp.get("rope_theta")
    if theta is None:
        raise ConfigError(f"{source}: missing required field 'rope_theta' (top level or in rope_parameters)")
    if not scaling:
        return typed(theta, "rope_theta", source, float), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return typed(theta, "rope_theta", source, float), None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (DeepSeek uses 'yarn')")
    for key in ("factor", "original_max_position_embeddings"):
        if scaling.get(key) is None:
            raise ConfigError(f"{source}: yarn rope scaling is missing {key!r}")
    theta = typed(theta, "rope_theta", source, float)

    def f(key: str, default: float) -> float:
        return typed(scaling.get(key) or default, f"rope scaling {key}", source, float)
    return theta, Yarn(
        factor=typed(scaling["factor"], "rope scaling factor", source, float),
        original_max_position_embeddings=typed(scaling["original_max_position_embeddings"],
                                               "original_max_position_embeddings", source, int),
        beta_fast=f("beta_fast", 32), beta_slow=f("beta_slow", 1),
        mscale=f("mscale", 0.0), mscale_all_dim=f("mscale_all_dim", 0.0),
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
        n_group, topk_group = need(cfg, "n_group", source, int), need(cfg, "topk_group", source, int)
        if n_group < 1 or arch.n_experts % n_group or not 1 <= topk_group <= n_group:
            raise ConfigError(f"{source}: n_routed_experts {arch.n_experts} / n_group {n_group} / "
                              f"topk_group {topk_group} are inconsistent")
        if arch.top_k > topk_group * (arch.n_experts // n_group):
            raise ConfigError(f"{source}: num_experts_per_tok {arch.top_k} exceeds the experts of {topk_group} groups")
        router = RouterSpec(n_experts=arch.n_experts, top_k=arch.top_k, score_func=ScoreFunc(score),
                            n_group=n_group, topk_group=topk_group,
                            norm_topk_prob=bool(need(cfg, "norm_topk_prob", source)),
                            routed_scaling_factor=need(cfg, "routed_scaling_factor", source, float))
        return ModelArgs(
            arch=arch, rms_norm_eps=need(cfg, "rms_norm_eps", source, float), rope_theta=theta, yarn=yarn,
            # V3.2 main attention is always interleaved (transformers ignores ``rope_interleave`` there)
            rope_interleave=True if arch.family is Family.V32 else bool(cfg.get("rope_interleave", True)),
            max_position_embeddings=need(cfg, "max_position_embeddings", source, int), router=router,
            index_topk=need(cfg, "index_topk", source, int) if arch.family is Family.V32 else 0)
