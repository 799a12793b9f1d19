"""The one size parser of the CLI: ``--shard-size``, ``--sync-every``, ``--split-max-size`` all read sizes here.

Binary units, like llama.cpp's ``gguf-split --split-max-size``: ``K`` = 1024, ``M`` = 1024², ``G`` = 1024³,
``T`` = 1024⁴; a trailing ``B`` / ``iB`` changes nothing (``5G`` = ``5GB`` = ``5GiB`` = 5,368,709,120 bytes);
a plain number is bytes; fractions are allowed (``1.5G``).
"""
from __future__ import annotations

import re

import click

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"50G"`` / ``"500MB"`` / ``"1048576"`` -> bytes (> 0); ``click.BadParameter`` otherwise."""
    m = _SIZE_RE.match(str(text))
    if m is None:
        raise click.BadParameter(f"cannot parse size {text!r} (use e.g. 5G, 500M, 1048576; binary units)")
    n = int(float(m.group(1)) * _UNIT[m.group(2).upper()])
    if n <= 0:
        raise click.BadParameter("size must be positive")
    return n


class Size(click.ParamType):
    """A click option type for sizes (see the module docstring)."""
    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


SIZE = Size()
