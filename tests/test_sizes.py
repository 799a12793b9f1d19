"""The CLI's one size parser: binary units everywhere (quantize --shard-size and export --split-max-size agree)."""
from __future__ import annotations

import click
import pytest
from hypothesis import given, strategies as st

from v4convert.cli.sizes import parse_size

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def test_examples() -> None:
    assert parse_size("5G") == parse_size("5GB") == parse_size("5GiB") == parse_size("5 gb") == 5 * 1024 ** 3
    assert parse_size("500M") == 500 * 1024 ** 2 and parse_size("1.5K") == 1536 and parse_size("1048576") == 1 << 20
    assert parse_size("300KB") == 300 * 1024


@given(st.integers(1, 10 ** 6), st.sampled_from(sorted(UNITS)), st.sampled_from(["", "B", "iB"]),
       st.booleans())
def test_integer_sizes(n: int, unit: str, suffix: str, lower: bool) -> None:
    text = f"{n}{unit}{suffix if unit or suffix != 'iB' else ''}"
    assert parse_size(text.lower() if lower else text) == n * UNITS[unit]


@given(st.text(max_size=12))
def test_garbage_is_a_usage_error(text: str) -> None:
    try:
        n = parse_size(text)
    except click.BadParameter:
        return
    assert isinstance(n, int) and n > 0


@pytest.mark.parametrize("text", ["", "G", "-5G", "0", "5X", "5 G B", "1e9", "0.1"])
def test_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_size(text)


def test_quantize_and_export_read_the_same_bytes() -> None:
    from v4convert.cli import main
    q = {p.name: p for p in main.commands["quantize"].params}["shard_size"]
    e = {p.name: p for p in main.commands["export"].params}["split_max_size"]
    assert q.type.convert("5G", q, None) == 5 * 1024 ** 3
    from v4convert.cli.export import _build
    from v4convert.export import EXPORTERS
    assert _build(None, None, EXPORTERS["gguf"], {e.name: "5G"}).split_max_size == 5 * 1024 ** 3
