"""`inspect` on the published configs (full-size inventories) and on every tiny preset via the CLI."""
from __future__ import annotations

import json
from importlib import resources

import pytest
from click.testing import CliRunner

from v4convert.cli import main
from v4convert.inspect import build_report

from .conftest import TINY_PRESETS

REF = resources.files("v4convert").joinpath("data/ref")


def _ref(name: str):
    return REF.joinpath(name)


def test_v3_671b_inventory_is_the_published_release():
    r = build_report(_ref("deepseek-v3-671b.config.json"))
    # DeepSeek-V3 / R1 on the hub: 91,991 tensors in 163 shards; "685B = 671B main + 14B MTP".
    assert r["stored_tensors"] == 91_991
    # Sum of tensor bytes (the index's total_size); the 163 files add 11,888,393 bytes of headers
    # for the 688,586,727,753 bytes on disk.
    assert r["total_bytes"] == 688_574_839_360
    assert r["parameters"]["main"] == 671_026_419_200
    assert r["parameters"]["mtp"] == 13_463_426_304
    assert r["family"] == "deepseek_v3" and r["layers"] == 61 and r["mtp_layers"] == 1
    bd = r["bytes_by_role_dtype"]
    assert bd["expert_up"]["F8_E4M3"] == 58 * 256 * 2048 * 7168 + 256 * 2048 * 7168    # 58 MoE layers + MTP
    assert bd["attn_kv_a"]["F32"] == 62 * 5 * 56 * 4          # 576 rows -> 5 partial 128-blocks
    assert bd["mtp_eh_proj"] == {"BF16": 7168 * 14336 * 2}


@pytest.mark.parametrize("name,gb,tensors", [("deepseek-v4-flash.config.json", 159.6, 69_187),
                                             ("deepseek-v4-pro.config.json", 864.7, 145_116)])
def test_v4_inventories_match_published_sizes(name, gb, tensors):
    r = build_report(_ref(name))
    assert round(r["total_bytes"] / 1e9, 1) == gb      # V4-Flash 159.6 GB, V4-Pro 864.7 GB as published
    assert r["stored_tensors"] == tensors
    assert r["family"] == "deepseek_v4"
    # experts are FP4: I8 codes + E8M0 scales
    assert set(r["bytes_by_role_dtype"]["expert_gate"]) == {"I8", "F8_E8M0"}


def test_projections_are_consistent():
    p = build_report(_ref("deepseek-v3-671b.config.json"))["projections"]
    b = {k: v["bytes"] for k, v in p.items()}
    assert b["mxfp4-experts"] < b["nvfp4-experts"] < 688_574_839_360
    assert b["gguf-mxfp4-moe"] < b["gguf-q4_k"] < b["gguf-q8_0"]
    # NVFP4 weight bytes per expert matrix: 7168*2048 * (0.5 + 1/16) + 4 = 8.26 MB (DESIGN: 8.3 MB)
    assert round((7168 * 2048 * 9 // 16 + 4) / 1e6, 1) == 8.3


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_cli_inspect_roundtrip_on_tiny_presets(tiny_ckpts, preset):
    root = tiny_ckpts[preset]
    r = CliRunner().invoke(main, ["inspect", str(root), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    from_cfg = build_report(root / "config.json")
    for key in ("stored_tensors", "total_bytes", "parameters", "bytes_by_role_dtype", "projections"):
        assert rep[key] == from_cfg[key], key
    assert rep["shards"] == 2 and rep["missing_tensors"] == []
    human = CliRunner().invoke(main, ["inspect", str(root)])
    assert human.exit_code == 0 and "projected outputs" in human.output


def test_cli_help_for_every_command():
    for cmd in ([], ["inspect"], ["synth"], ["demo"]):
        r = CliRunner().invoke(main, cmd + ["--help"])
        assert r.exit_code == 0 and "Usage" in r.output
