"""Does an output fit in memory? Weights of each recipe + a KV cache for N tokens vs a memory budget.

``inspect CKPT --memory 64GB`` (one pool, e.g. a Mac's unified memory) or ``--device 2x32GB`` (that
many devices, layers split across them: each device holds whole layers). Sizes: ``G``/``GB``/``GiB``
are all binary (2**30): device memory is sold in binary units (a "32 GB" GPU has 32 GiB).

KV cache per token and layer, in elements, as DeepSeek's inference code and our runtime keep it
(estimates, one entry per token; ``kv_bytes`` per element, default 2 = BF16):
- V3 / V3.2 (MLA): the compressed latent ``kv_lora_rank + qk_rope_head_dim`` (not per-head K/V);
  V3.2 adds the indexer's key ``index_head_dim``.
- V4: one ``head_dim`` KV entry per token of the sliding window (``min(N, sliding_window)``), plus
  ``ceil(N / ratio)`` compressed entries on compressed layers, plus the indexer's ``index_head_dim``
  keys for ``ceil(N / 4)`` entries on ratio-4 (CSA) layers.
MTP blocks are not counted in the cache (they only run for speculative decoding).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import UserError
from .families.layout import Arch
from .families.roles import Family

GIB = 1 << 30
DEFAULT_OVERHEAD = GIB          # per device: runtime context, activations, allocator slack
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE)
_UNIT = {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemorySpecError(UserError):
    """A --memory / --device value we cannot parse."""


def parse_size(text: str) -> int:
    """``"64GB"`` / ``"64G"`` / ``"64GiB"`` / ``"512M"`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if m is None:
        raise MemorySpecError(f"cannot parse memory size {text!r} (use e.g. 64GB, 24GiB, 512M)")
    return int(float(m.group(1)) * _UNIT[m.group(2).upper() if m.group(2) else None])


def parse_devices(text: str) -> tuple[int, int]:
    """``"2x32GB"`` -> (2, 32 GiB); ``"24GB"`` -> (1, 24 GiB)."""
    n, _, size = text.lower().partition("x") if "x" in text.lower() else ("1", "", text)
    if not n.strip().isdigit() or int(n) < 1:
        raise MemorySpecError(f"cannot parse device spec {text!r} (use e.g. 2x32GB)")
    return int(n), parse_size(size)


def kv_layers(a: Arch, cfg: dict) -> list[Callable[[int], int]]:
    """Per main-model layer: tokens -> KV cache elements (see the module docstring)."""
    if a.family is not Family.V4:
        per_tok = a.kv_lora + a.rope + (a.index_dim if a.family is Family.V32 else 0)
        return [lambda n, k=per_tok: n * k] * a.n_layers
    window = int(cfg.get("sliding_window") or 0)

    def v4(n: int, r: int) -> int:
        e = min(n, window) * a.head_dim
        if r:
            e += math.ceil(n / r) * a.head_dim + (math.ceil(n / 4) * a.index_dim if r == 4 else 0)
        return e
    return [lambda n, r=a.compress_ratios[L]: v4(n, r) for L in range(a.n_layers)]


def kv_bytes(layers: list[Callable[[int], int]], tokens: int, kv_bytes_per_elem: int = 2) -> int:
    """KV cache bytes for ``tokens`` positions of the main model."""
    return sum(f(tokens) for f in layers) * kv_bytes_per_elem


@dataclass(frozen=True)
class Budget:
    devices: int
    per_device: int                 # bytes
    overhead: int = DEFAULT_OVERHEAD

    @property
    def usable(self) -> int:
        return self.devices * max(0, self.per_device - self.overhead)

    def label(self) -> str:
        one = f"{self.per_device / GIB:g} GiB"
        return one if self.devices == 1 else f"{self.devices} x {one}"


def _split_fits(layer_bytes: list[int], kv_per_layer: list[int], other: int, b: Budget) -> bool:
    """Whole layers, in order, filled device by device; embed/head/norm (``other``) on the first."""
    cap = b.per_device - b.overhead
    dev, used = 1, other
    if used > cap:
        return False
    for w, kv in zip(layer_bytes, kv_per_layer):
        if used + w + kv > cap:
            dev, used = dev + 1, 0
            if dev > b.devices or w + kv > cap:
                return False
        used += w + kv
    return True


def fit_report(a: Arch, cfg: dict, entries: Iterable, projections: dict[str, Callable], b: Budget,
               tokens: int, kv_elem: int = 2) -> dict:
    """Per recipe: weights, KV for ``tokens``, total, whether it fits ``b`` (and by how much), and the
    most KV tokens that would fit. ``entries``: inspect's entries (``.slot``, ``.nbytes``);
    ``projections``: recipe -> (arch, slot) -> projected bytes (None: kept as stored)."""
    entries = list(entries)
    kl = kv_layers(a, cfg)
    kv_total = kv_bytes(kl, tokens, kv_elem)
    kv_layer = [f(tokens) * kv_elem for f in kl]
    out = {"budget": b.label(), "devices": b.devices, "per_device_bytes": b.per_device,
           "overhead_per_device_bytes": b.overhead, "kv_tokens": tokens, "kv_bytes_per_element": kv_elem,
           "kv_bytes": kv_total, "recipes": {}}
    for key, fn in projections.items():
        layers = [0] * a.n_layers
        other = 0
        for e in entries:
            p = fn(a, e.slot)
            nb = e.nbytes if p is None else p
            if e.slot.mtp:
                continue                       # not loaded for plain decoding
            if e.slot.layer is not None and 0 <= e.slot.layer < a.n_layers:
                layers[e.slot.layer] += nb
            else:
                other += nb
        weights = sum(layers) + other
        total = weights + kv_total
        fits = total <= b.usable and (b.devices == 1 or _split_fits(layers, kv_layer, other, b))
        per_tok = kv_bytes(kl, tokens + 1, kv_elem) - kv_total          # marginal bytes per token now
        room = b.usable - weights
        max_tokens = _max_tokens(kl, room, kv_elem) if room > 0 else 0
        out["recipes"][key] = {"weights_bytes": weights, "total_bytes": total, "fits": fits,
                               "spare_bytes": b.usable - total, "max_kv_tokens": max_tokens,
                               "kv_bytes_per_token": per_tok}
    return out


def _max_tokens(kl: list[Callable[[int], int]], room: int, kv_elem: int) -> int:
    """Largest N with kv_bytes(N) <= room (kv_bytes is monotone in N): binary search."""
    lo, hi = 0, 1
    while kv_bytes(kl, hi, kv_elem) <= room and hi < 1 << 40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if kv_bytes(kl, mid, kv_elem) <= room else (lo, mid)
    return lo


def format_fit(f: dict) -> list[str]:
    head = (f"  memory fit ({f['budget']}, {f['overhead_per_device_bytes'] / GIB:g} GiB reserved per device; "
            f"KV cache {f['kv_tokens']:,} tokens = {f['kv_bytes'] / GIB:,.2f} GiB):")
    lines = [head]
    for key, r in f["recipes"].items():
        verdict = (f"fits, {r['spare_bytes'] / GIB:,.2f} GiB spare" if r["fits"] else
                   f"does NOT fit, short by {-r['spare_bytes'] / GIB:,.2f} GiB" if r["spare_bytes"] < 0 else
                   "does NOT fit: a layer does not fit on one device")
        lines.append(f"    {key:<16} weights {r['weights_bytes'] / GIB:>9,.2f} GiB + KV = {r['total_bytes'] / GIB:>9,.2f}"
                     f" GiB: {verdict}; KV room for {r['max_kv_tokens']:,} tokens")
    return lines
