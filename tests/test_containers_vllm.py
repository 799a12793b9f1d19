"""The quantization configs we write, checked key by key against how vLLM 0.32 reads them (no vLLM needed).

``tests/consumers/test_vllm.py`` lets vLLM itself load every artifact; these are the fast checks of the same
facts (issue 11's five defects), so a regression names its key here first:
1. compressed-tensors ``producer`` is a dict (vLLM calls ``.get("name")`` on it);
2. ModelOpt config.json carries ``ignore`` (vLLM reads only that key there) equal to ``exclude_modules``;
3. exclusions name vLLM's fused modules (``fused_qkv_a_proj``, ``gate_up_proj``, ``mlp.experts``), matched
   with ``fnmatch`` on the fused name as vLLM does, and a fused group never mixes storage kinds;
4. ModelOpt weight-only is ``W4A16_NVFP4`` (``NVFP4`` means W4A4 with static input scales to vLLM);
5. outputs carry ``topk_method`` / ``scoring_func`` (DeepSeek's release values), ``inspect`` warns without them.
Plus: every consumer tokenizes our tokenizer files alike (BOS from the post-processor, once).
"""
from __future__ import annotations

import json
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
from click.testing import CliRunner

from v4convert.checkpoint import Checkpoint
from v4convert.cli import main
from v4convert.demo import bundled_model
from v4convert.quant.engine import output_config
from v4convert.formats.containers import Container, ContainerError, fused_modules, modelopt_configs
from v4convert.inspect import build_report
from v4convert.quant.plan import Options, QuantizeError, make_plan
from v4convert.quant.recipes import RuleSet, preset
from v4convert.families.roles import RELEASE_ROUTING, Family


def _plan(src: Path, recipe: str, container: Container, keep=(), **opts):
    with Checkpoint.open(src) as ck:
        return make_plan(ck, RuleSet(preset(recipe), keep=keep), Options(container=container, **opts))


def _excluded(globs: list[str], module: str) -> bool:
    """vLLM 0.32 ModelOptQuantConfigBase.is_layer_excluded: exact name, substring (legacy), then fnmatch."""
    return any(module == g or g in module or fnmatch(module, g) for g in globs)


def test_compressed_tensors_producer_is_a_dict(tiny_ckpts):
    cfg, hf = output_config(_plan(tiny_ckpts["v3-tiny"], "nvfp4-experts", Container.COMPRESSED_TENSORS))
    qc = cfg["quantization_config"]
    assert hf is None and qc["producer"]["name"] == "v4convert" and isinstance(qc["producer"]["version"], str)
    fp4 = [g for g in qc["config_groups"].values() if g["format"] == "nvfp4-pack-quantized"]
    assert fp4 and all(g["input_activations"] is None for g in fp4)        # W4A16


@pytest.mark.parametrize("recipe", ["nvfp4-experts", "nvfp4-all-linear"])
def test_modelopt_keys_and_fused_exclusions(tiny_ckpts, recipe):
    plan = _plan(tiny_ckpts["v3-tiny"], recipe, Container.MODELOPT)
    cfg, hf = output_config(plan)
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "W4A16_NVFP4" == hf["quantization"]["quant_algo"]
    assert qc["ignore"] == qc["exclude_modules"] == hf["quantization"]["exclude_modules"]
    assert qc["producer"] == hf["producer"] and qc["producer"]["name"] == "v4convert"
    assert qc["group_size"] == 16 and "kv_cache_quant_algo" in qc
    ex = qc["ignore"]
    n = plan.config["num_hidden_layers"]
    assert _excluded(ex, "lm_head")
    for L in range(n):
        attn_kept = recipe == "nvfp4-experts"
        assert _excluded(ex, f"model.layers.{L}.self_attn.fused_qkv_a_proj") is attn_kept
        assert _excluded(ex, f"model.layers.{L}.self_attn.kv_b_proj") is attn_kept
        assert not _excluded(ex, f"model.layers.{L}.mlp.experts")          # FusedMoE prefix: NVFP4
        assert not _excluded(ex, f"model.layers.{L}.mlp.gate_up_proj")
        assert not _excluded(ex, f"model.layers.{L}.mlp.shared_experts.gate_up_proj")


def test_modelopt_keep_whole_layer_excludes_its_fused_modules(tiny_ckpts):
    plan = _plan(tiny_ckpts["v3-tiny"], "nvfp4-all-linear", Container.MODELOPT, keep=["layers.1.*"])
    ex = output_config(plan)[0]["quantization_config"]["ignore"]
    for m in ("self_attn.fused_qkv_a_proj", "mlp.experts", "mlp.shared_experts.gate_up_proj"):
        assert _excluded(ex, f"model.layers.1.{m}"), m
        assert not _excluded(ex, f"model.layers.2.{m}"), m


def test_fused_exclusion_patterns_do_not_spread_to_other_layers():
    """Fused names excluded in layers 0 and 2 only: the compact glob must not match layer 1."""
    mods = [f"model.layers.{L}.self_attn.{p}" for L in range(3) for p in ("q_a_proj", "kv_a_proj_with_mqa")]
    ex = [m for m in mods if ".1." not in m]
    globs = modelopt_configs(ex, mods, "0")[1]["ignore"]
    assert _excluded(globs, "model.layers.0.self_attn.fused_qkv_a_proj")
    assert _excluded(globs, "model.layers.2.self_attn.fused_qkv_a_proj")
    assert not _excluded(globs, "model.layers.1.self_attn.fused_qkv_a_proj")
    assert not _excluded(globs, "model.layers.1.self_attn.q_a_proj")


def test_w4a4_is_a_hook_not_a_default():
    assert modelopt_configs([], ["m.a"], "0", activations="w4a4")[1]["quant_algo"] == "NVFP4"
    with pytest.raises(ContainerError, match="activations"):
        modelopt_configs([], ["m.a"], "0", activations="w8a8")


def test_fused_table_covers_vllm_deepseek_modules():
    got = fused_modules(["model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_a_proj_with_mqa",
                         "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                         "model.layers.1.mlp.experts.3.up_proj", "model.layers.1.mlp.shared_experts.gate_proj"])
    assert got == {"model.layers.0.self_attn.fused_qkv_a_proj": ["model.layers.0.self_attn.q_a_proj",
                                                                 "model.layers.0.self_attn.kv_a_proj_with_mqa"],
                   "model.layers.0.mlp.gate_up_proj": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                   "model.layers.1.mlp.experts": ["model.layers.1.mlp.experts.3.up_proj"],
                   "model.layers.1.mlp.shared_experts.gate_up_proj": ["model.layers.1.mlp.shared_experts.gate_proj"]}


@pytest.mark.parametrize("container", [Container.MODELOPT, Container.COMPRESSED_TENSORS])
@pytest.mark.parametrize("keep,fused", [(["self_attn.q_a_proj*"], "self_attn.fused_qkv_a_proj"),
                                        (["layers.1.mlp.experts.3.*"], "mlp.experts"),
                                        (["layers.0.mlp.up_proj*"], "mlp.gate_up_proj")])
def test_split_fused_group_is_refused_at_plan_time(tiny_ckpts, container, keep, fused):
    with pytest.raises(QuantizeError, match=rf"vLLM runs model\.layers\.\d+\.{re.escape(fused)} as one module"):
        _plan(tiny_ckpts["v3-tiny"], "nvfp4-all-linear", container, keep=keep)


def test_keep_bf16_puts_kept_linears_in_ignore(tiny_ckpts):
    plan = _plan(tiny_ckpts["v3-tiny"], "nvfp4-experts", Container.COMPRESSED_TENSORS, keep_bf16=True)
    qc = output_config(plan)[0]["quantization_config"]
    assert all(g["format"] != "float-quantized" for g in qc["config_groups"].values())
    assert any("q_b_proj" in p for p in qc["ignore"])
    with pytest.raises(QuantizeError, match="--keep-bf16"):
        _plan(tiny_ckpts["v3-tiny"], "mxfp4-experts", Container.DEEPSEEK, keep_bf16=True)


def _without_routing_keys(tmp_path: Path, family: str) -> Path:
    src = tmp_path / family
    shutil.copytree(bundled_model(family), src)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("topk_method", "scoring_func"):
        cfg.pop(k, None)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("family,fam", [("v3", Family.V3), ("v4", Family.V4)])
def test_release_routing_keys(tmp_path, family, fam):
    assert build_report(bundled_model(family))["warnings"] == []           # the fixtures carry them
    for k, v in RELEASE_ROUTING[fam].items():
        assert json.loads((bundled_model(family) / "config.json").read_text())[k] == v
    src = _without_routing_keys(tmp_path, family)
    warns = build_report(src)["warnings"]
    assert sorted(w.split("'")[1] for w in warns) == ["scoring_func", "topk_method"]
    r = CliRunner().invoke(main, ["inspect", str(src)])
    assert r.exit_code == 0 and "lacks 'topk_method'" in r.output
    cfg, _ = output_config(_plan(src, "nvfp4-experts", Container.COMPRESSED_TENSORS))
    assert {k: cfg[k] for k in RELEASE_ROUTING[fam]} == RELEASE_ROUTING[fam]


def _tokenizer_dirs(tiny_ckpts) -> list[Path]:
    return [tiny_ckpts["v3-tiny"], bundled_model("v3"), bundled_model("v4")]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_every_consumer_tokenizes_alike(tiny_ckpts, which, tmp_path):
    """tokenizers (add_special_tokens=True, what vLLM and transformers do), transformers' AutoTokenizer and our
    runtime (BOS from the configs, post-processor off) give the same ids, with exactly one BOS."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    from v4convert.runtime.generate import Tokenizer

    d = _tokenizer_dirs(tiny_ckpts)[which]
    ours = Tokenizer.open(d)
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    for f in ("tokenizer.json", "tokenizer_config.json"):     # the tokenizer files only (transformers would
        shutil.copy(d / f, tmp_path / f)                       # also parse config.json, V4's as its own class)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["def f(x):\n    return x  # é", "Hello, world!", " leading space", ""]:
        ids = ours.encode(text)
        assert ids[0] == ours.bos_id == 0 and ids.count(0) == 1
        assert hf.encode(text).ids == ids
        assert auto(text)["input_ids"] == ids
        assert ours.decode(ids) == text


_LAYER_MODULES = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_b_proj", "self_attn.kv_b_proj",
                  "self_attn.o_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                  "mlp.shared_experts.down_proj", "mlp.gate") + tuple(
    f"mlp.experts.{e}.{p}_proj" for e in range(3) for p in ("gate", "up", "down"))


def test_modelopt_exclusions_match_exactly_the_excluded_modules_property():
    """For any excluded subset, vLLM's fnmatch over our globs selects exactly the excluded modules and the fused
    modules whose members are all excluded — never a quantized module, never a fused one left partly quantized."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    mods = ["lm_head"] + [f"model.layers.{L}.{m}" for L in range(4) for m in _LAYER_MODULES]
    fused = fused_modules(mods)

    @settings(max_examples=150, deadline=None)
    @given(st.sets(st.sampled_from(mods)))
    def check(excluded):
        globs = modelopt_configs(sorted(excluded), mods, "0")[1]["ignore"]
        for m in mods:
            assert _excluded(globs, m) == (m in excluded), m
        for f, members in fused.items():
            assert _excluded(globs, f) == all(x in excluded for x in members), f

    check()
