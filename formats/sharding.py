"""The one rule for splitting a stream of tensors into files (safetensors shards, GGUF splits)."""
from __future__ import annotations

from typing import Sequence


def split_in_order(sizes: Sequence[int], max_bytes: int | None) -> list[int]:
    """File index of each item, filling files in order up to ``max_bytes`` (an item never splits;
    one larger than ``max_bytes`` gets a file of its own). ``max_bytes`` None/0: one file."""
    out: list[int] = []
    cur = size = 0
    for b in sizes:
        if max_bytes and size and size + b > max_bytes:
            cur, size = cur + 1, 0
        out.append(cur)
        size += b
    return out


def group_in_order(items: Sequence, sizes: Sequence[int], max_bytes: int | None) -> list[list]:
    """``items`` grouped per :func:`split_in_order` (at least one, possibly empty, group)."""
    idx = split_in_order(sizes, max_bytes)
    groups: list[list] = [[] for _ in range((idx[-1] + 1) if idx else 1)]
    for it, i in zip(items, idx):
        groups[i].append(it)
    return groups
