"""Minimal DeepSeek runtime (V3/R1/V3.1, V3.2, V4): ``load(path, ...)`` -> model with a static KV cache.

``model(input_ids [B, T], start_pos=0)`` writes cache positions ``start_pos .. start_pos+T-1`` and returns
float32 logits ``[B, T, V]`` (DeepSeek ``inference/model.py`` convention, all positions returned).
"""
from __future__ import annotations

from .common import DynamicRouting, FakeQuant, RuntimeLoadError
from .loader import load

__all__ = ["load", "DynamicRouting", "FakeQuant", "RuntimeLoadError"]
