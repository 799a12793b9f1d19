"""``quantize`` on every tiny preset: output read back by ``Checkpoint.open`` equals the codecs.

References are computed here from the *source* checkpoint with the codec's public whole-tensor
functions (``nvfp4_quantize`` on the dequantized FP8 weight, ``mxfp4_quantize``, ``mxfp4_to_nvfp4``),
not with the engine's chunked / byte-level fast paths, so the engine is checked against them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from v4convert.checkpoint import Checkpoint
from v4convert.quant.engine import execute
from v4convert.formats.containers import Container
from v4convert.formats.mxfp4 import MXScaleRule, mxfp4_from_deepseek_native, mxfp4_quantize, mxfp4_to_nvfp4
from v4convert.formats.nvfp4 import NVFP4Convention, ScaleMethod, nvfp4_from_stored, nvfp4_quantize
from v4convert.quant.plan import Action, MXRule, Options, ScaleChoice, make_plan
from v4convert.quant.recipes import RuleSet, preset
from v4convert.families.roles import Role, Storage

from .conftest import TINY_PRESETS

PARTNER = {Role.EXPERT_GATE: Role.EXPERT_UP, Role.EXPERT_UP: Role.EXPERT_GATE,
           Role.SHARED_GATE: Role.SHARED_UP, Role.SHARED_UP: Role.SHARED_GATE,
           Role.DENSE_GATE: Role.DENSE_UP, Role.DENSE_UP: Role.DENSE_GATE}
V3_PARTNER = {Role.ATTN_Q_A: Role.ATTN_KV_A, Role.ATTN_KV_A: Role.ATTN_Q_A}   # vLLM's fused_qkv_a_proj


def run_quantize(src: Path, out: Path, recipe: str = "nvfp4-experts", keep=(), overrides=(), workers: int = 1,
                 kernel=None, device: str = "cpu", **opts) -> tuple:
    rules = RuleSet(preset(recipe), keep=keep, overrides=overrides)
    opts.setdefault("shard_bytes", 400_000)     # several shards even for tiny models
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, rules, Options(**opts))
    r = execute(plan, out, workers=workers, kernel=kernel, device=device, log=lambda m: None)
    return plan, r


class Artifacts:
    """Quantize outputs shared by tests (session): one run per distinct (preset, options)."""

    def __init__(self, tiny: dict[str, Path], root: Path):
        self.tiny, self.root, self.cache = tiny, root, {}

    def get(self, preset_name: str, recipe: str = "nvfp4-experts", **opts) -> tuple:
        key = (preset_name, recipe, Options(**{"shard_bytes": 400_000, **opts}))
        if key not in self.cache:
            out = self.root / f"a{len(self.cache)}"
            plan, r = run_quantize(self.tiny[preset_name], out, recipe=recipe, **opts)
            self.cache[key] = (out, plan, r)
        return self.cache[key]


@pytest.fixture(scope="session")
def artifacts_cache(tiny_ckpts, tmp_path_factory) -> Artifacts:
    return Artifacts(tiny_ckpts, tmp_path_factory.mktemp("quantized"))


def partner_name(ck: Checkpoint, name: str) -> str | None:
    info = ck.tensor_info(name)
    other = PARTNER.get(info.role) or (V3_PARTNER.get(info.role) if ck.family.is_v3_like else None)
    if other is None:
        return None
    for i in ck.infos():
        if i.role is other and i.layer == info.layer and i.expert == info.expert:
            return i.name
    return None


def check_against_codecs(src: Path, out: Path, plan, conv: NVFP4Convention, method: ScaleMethod,
                         rule: MXScaleRule) -> dict[str, int]:
    """Every output tensor equals its codec reference; returns counts by action."""
    counts: dict[str, int] = {}
    with Checkpoint.open(src) as s, Checkpoint.open(out) as o:
        assert sorted(o.names()) == sorted(s.names())
        actions = {t.name: t.action for t in plan.tensors()}
        for name in s.names():
            a = actions[name]
            counts[a.value] = counts.get(a.value, 0) + 1
            got = o.dequantize(name)
            info = s.tensor_info(name)
            if a is Action.TO_NVFP4:
                x = s.dequantize(name)
                p = partner_name(s, name)
                amax = x.abs().amax()
                if p is not None and actions[p] is Action.TO_NVFP4:
                    amax = torch.maximum(amax, s.dequantize(p).abs().amax())
                q = nvfp4_quantize(x, convention=conv, method=method, global_amax=amax, name=name)
                raw = o.raw(name)
                assert torch.equal(raw["weight"].view(torch.uint8), q.packed), name
                assert torch.equal(raw["scale"].view(torch.uint8), q.block_scale.view(torch.uint8)), name
                assert torch.equal(raw["global_scale"].float().reshape(()), q.global_scale.reshape(())), name
                # values: the bytes above decoded by the codec equal the reader's decode
                assert torch.equal(got, q.dequantize()), name
                assert torch.equal(nvfp4_from_stored(raw["weight"], raw["scale"], raw["global_scale"], conv).dequantize(),
                                   q.dequantize()), name
                assert o.tensor_info(name).storage is (Storage.NVFP4_MODELOPT if conv is NVFP4Convention.MODELOPT
                                                      else Storage.NVFP4_CT)
            elif a is Action.TO_MXFP4:
                q = mxfp4_quantize(s.dequantize(name), rule=rule, name=name, mse=method is ScaleMethod.MSE)
                assert torch.equal(o.raw(name)["weight"].view(torch.uint8), q.packed), name
                assert torch.equal(o.raw(name)["scale"].view(torch.uint8), q.scale), name
                assert torch.equal(got, q.dequantize()), name
            elif a is Action.MXFP4_TO_NVFP4:
                names = [t.name for u in plan.units if any(t.name == name for t in u.tensors) for t in u.tensors]
                rs = [s.raw(n) for n in names]
                mx = mxfp4_from_deepseek_native(torch.cat([r["weight"] for r in rs]), torch.cat([r["scale"] for r in rs]))
                q, _ = mxfp4_to_nvfp4(mx, conv)
                rows = s.tensor_info(name).shape[0]
                i = names.index(name)
                raw = o.raw(name)
                assert torch.equal(raw["weight"].view(torch.uint8), q.packed[i * rows:(i + 1) * rows]), name
                assert torch.equal(raw["scale"].view(torch.uint8), q.block_scale[i * rows:(i + 1) * rows].view(torch.uint8))
                assert torch.equal(raw["global_scale"].float().reshape(()), q.global_scale.reshape(())), name
            elif a is Action.FP8_TO_BF16:
                assert torch.equal(got, s.dequantize(name).to(torch.bfloat16).float()), name
            else:   # kept: exact values (FP8 weights verbatim, scales exact in F32)
                assert torch.equal(got, s.dequantize(name)), name
                if info.storage is Storage.FP8_BLOCK:
                    assert torch.equal(o.raw(name)["weight"].view(torch.uint8), s.raw(name)["weight"].view(torch.uint8))
    return counts


@pytest.mark.parametrize("preset_name", TINY_PRESETS)
def test_default_recipe_every_preset(tiny_ckpts, artifacts_cache, preset_name):
    """nvfp4-experts into compressed-tensors: experts/shared/dense MLP NVFP4, everything else exact."""
    src = tiny_ckpts[preset_name]
    out, plan, r = artifacts_cache.get(preset_name)
    counts = check_against_codecs(src, out, plan, NVFP4Convention.COMPRESSED_TENSORS, ScaleMethod.RTN,
                                  MXScaleRule.OCP_FLOOR)
    with Checkpoint.open(src) as s:
        fp4_experts = s.arch.expert_storage is Storage.MXFP4
        n_ffn = sum(1 for i in s.infos() if i.role.group.value in ("expert", "shared_expert", "dense_mlp"))
        n_attn_fp8 = sum(1 for i in s.infos() if i.role.group.value == "attention" and i.storage is Storage.FP8_BLOCK)
    assert counts.get("-> nvfp4", 0) + counts.get("mxfp4 -> nvfp4 (re-pack)", 0) == n_ffn
    assert counts.get("keep fp8 (scale->F32)", 0) >= n_attn_fp8 > 0
    if fp4_experts:
        assert counts["mxfp4 -> nvfp4 (re-pack)"] > 0
    assert len(plan.shards) >= 2
    # shared global scale of gate/up partners
    with Checkpoint.open(out) as o:
        for name in o.names():
            p = partner_name(o, name)
            if p is not None and o.tensor_info(name).storage is Storage.NVFP4_CT:
                assert torch.equal(o.raw(name)["global_scale"], o.raw(p)["global_scale"]), name


def test_v4_repack_counts_inexact_blocks(tiny_ckpts, artifacts_cache):
    """The reported inexact-block count equals an independent count of 16-blocks whose values changed."""
    src = tiny_ckpts["v4-flash-tiny"]
    out, plan, r = artifacts_cache.get("v4-flash-tiny")
    changed = total = 0
    with Checkpoint.open(src) as s, Checkpoint.open(out) as o:
        for t in plan.tensors():
            if t.action is Action.MXFP4_TO_NVFP4:
                d = (o.dequantize(t.name) != s.dequantize(t.name)).reshape(t.shape[0], -1, 16).any(-1)
                changed += int(d.sum())
                total += d.numel()
    assert total > 0 and r.repack_blocks == total
    assert r.repack_inexact == changed
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["v4convert"]["mxfp4_repack_inexact_blocks"] == changed


@pytest.mark.parametrize("preset_name,recipe,container,method,rule", [
    ("v3-tiny", "nvfp4-all-linear", Container.MODELOPT, ScaleChoice.FOUR_OVER_SIX, MXRule.FLOOR),
    ("v32-tiny", "mxfp4-experts", Container.DEEPSEEK, ScaleChoice.RTN, MXRule.ROUND_UP),
    ("v3-tiny", "mxfp4-experts", Container.DEEPSEEK, ScaleChoice.MSE, MXRule.FLOOR),      # MXFP4 exponent search
    ("v4-flash-base-tiny", "nvfp4-experts", Container.COMPRESSED_TENSORS, ScaleChoice.MSE, MXRule.FLOOR),
    ("v4-flash-tiny", "mxfp4-experts", Container.COMPRESSED_TENSORS, ScaleChoice.RTN, MXRule.FLOOR),
])
def test_recipes_containers_scale_methods(tiny_ckpts, artifacts_cache, preset_name, recipe, container, method, rule):
    src = tiny_ckpts[preset_name]
    out, plan, _ = artifacts_cache.get(preset_name, recipe, container=container, scale_method=method, mx_rule=rule)
    conv = NVFP4Convention.MODELOPT if container is Container.MODELOPT else NVFP4Convention.COMPRESSED_TENSORS
    mrule = MXScaleRule.OCP_FLOOR if rule is MXRule.FLOOR else MXScaleRule.ROUND_UP
    counts = check_against_codecs(src, out, plan, conv, ScaleMethod(method.value), mrule)
    cfg = json.loads((out / "config.json").read_text())
    if container is Container.MODELOPT:
        hf = json.loads((out / "hf_quant_config.json").read_text())
        q = hf["quantization"]
        assert q["quant_algo"] == "W4A16_NVFP4" and q["group_size"] == 16 and "kv_cache_quant_algo" in q
        assert any("lm_head" in m for m in q["exclude_modules"])
        assert cfg["quantization_config"]["ignore"] == q["exclude_modules"]
        assert cfg["quantization_config"]["quant_method"] == "modelopt"
        assert counts["-> nvfp4"] > 0 and "keep fp8 (scale->F32)" not in counts
    elif container is Container.DEEPSEEK:
        assert cfg["expert_dtype"] == "fp4" and cfg["quantization_config"]["quant_method"] == "fp8"
    else:
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    if recipe == "mxfp4-experts" and preset_name == "v4-flash-tiny":
        # native MXFP4 experts are kept bit for bit, only re-labelled
        assert counts["keep mxfp4"] > 0


def test_keep_and_override_patterns(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    plan, _ = run_quantize(src, tmp_path / "out", keep=["layers.1.*"], overrides=["self_attn.o_proj*=nvfp4"])
    acts = {t.name: t.action for t in plan.tensors()}
    assert all(a is not Action.TO_NVFP4 for n, a in acts.items() if n.startswith("model.layers.1."))
    assert acts["model.layers.2.self_attn.o_proj.weight"] is Action.TO_NVFP4
    assert acts["model.layers.0.self_attn.o_proj.weight"] is Action.TO_NVFP4
    assert acts["model.layers.2.self_attn.q_b_proj.weight"] is Action.FP8_REWRAP
    assert acts["model.layers.2.mlp.experts.0.up_proj.weight"] is Action.TO_NVFP4
    check_against_codecs(src, tmp_path / "out", plan, NVFP4Convention.COMPRESSED_TENSORS, ScaleMethod.RTN,
                         MXScaleRule.OCP_FLOOR)


def test_keep_native_fp4(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v4-flash-tiny"]
    plan, r = run_quantize(src, tmp_path / "out", keep_native_fp4=True)
    acts = {t.action for t in plan.tensors() if t.role is Role.EXPERT_UP}
    assert acts == {Action.MXFP4_REWRAP} and r.repack_blocks == 0
    with Checkpoint.open(src) as s, Checkpoint.open(tmp_path / "out") as o:
        n = next(t.name for t in plan.tensors() if t.role is Role.EXPERT_DOWN)
        assert o.tensor_info(n).storage is Storage.MXFP4
        assert torch.equal(o.raw(n)["weight"].view(torch.uint8), s.raw(n)["weight"].view(torch.uint8))


def test_workers_pool_and_small_chunks_byte_identical(tiny_ckpts, tmp_path, monkeypatch):
    """3 worker threads (the data-free default), 2 worker processes, in-process with 128-row chunks, and buffered
    instead of O_DIRECT reads: identical files."""
    src = tiny_ckpts["v3-tiny"]
    run_quantize(src, tmp_path / "a", workers=3)
    monkeypatch.setenv("V4C_POOL", "processes")
    run_quantize(src, tmp_path / "p", workers=2)
    import v4convert.quant.workers as w
    monkeypatch.setattr(w, "CHUNK_ELEMS", 1)          # every chunk = 128 rows
    monkeypatch.setattr(w, "COPY_BYTES", 1000)
    monkeypatch.setenv("V4C_DIRECT_IO", "0")
    run_quantize(src, tmp_path / "b", workers=1)
    fa = sorted(p.name for p in (tmp_path / "a").iterdir())
    for other in ("p", "b"):
        assert fa == sorted(p.name for p in (tmp_path / other).iterdir())
        for n in fa:
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / other / n).read_bytes(), (other, n)


@pytest.mark.parametrize("container", [Container.COMPRESSED_TENSORS, Container.MODELOPT])
def test_v4_repack_kernels_byte_identical(tiny_ckpts, tmp_path, monkeypatch, container):
    """nvfp4-experts on tiny V4 (MXFP4 experts re-packed): the native C re-pack and the torch codec write
    identical files and report the same block counts (both containers, i.e. both NVFP4 conventions)."""
    import v4convert.formats.mxfp4 as mx
    import v4convert.kernels.native.repack as rp
    from v4convert.kernels.native import Kernel
    calls = {"native": 0, "torch": 0}

    def spy(fn, key):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(rp, "mxfp4_to_nvfp4_native", spy(rp.mxfp4_to_nvfp4_native, "native"))
    monkeypatch.setattr(mx, "mxfp4_to_nvfp4", spy(mx.mxfp4_to_nvfp4, "torch"))
    src = tiny_ckpts["v4-flash-tiny"]
    plan, rn = run_quantize(src, tmp_path / "n", kernel=Kernel.NATIVE, container=container)
    assert calls["native"] > 0 and calls["torch"] == 0
    _, rt = run_quantize(src, tmp_path / "t", kernel=Kernel.TORCH, container=container)
    assert calls["torch"] == calls["native"]
    assert any(t.action is Action.MXFP4_TO_NVFP4 for t in plan.tensors())
    assert (rn.repack_blocks, rn.repack_inexact) == (rt.repack_blocks, rt.repack_inexact) and rn.repack_blocks > 0
    names = sorted(p.name for p in (tmp_path / "n").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "t").iterdir())
    for n in names:
        assert (tmp_path / "n" / n).read_bytes() == (tmp_path / "t" / n).read_bytes(), n


def test_v4_repack_native_when_fp8_path_on_cuda(tiny_ckpts, tmp_path, monkeypatch):
    """--device cuda moves only the FP8 hot path (torch kernel there); the CPU-only re-pack still takes the
    native kernel by default, same bytes. Shared experts kept so nothing here needs a GPU."""
    import v4convert.kernels.native.repack as rp
    calls = []
    real = rp.mxfp4_to_nvfp4_native
    monkeypatch.setattr(rp, "mxfp4_to_nvfp4_native", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    src = tiny_ckpts["v4-flash-tiny"]
    keep = ("*shared_experts*",)
    plan, _ = run_quantize(src, tmp_path / "g", keep=keep, device="cuda")
    assert calls and not any(t.action is Action.TO_NVFP4 for t in plan.tensors())
    run_quantize(src, tmp_path / "c", keep=keep)
    for p in (tmp_path / "c").iterdir():
        assert p.read_bytes() == (tmp_path / "g" / p.name).read_bytes(), p.name


def test_index_sha256_and_metadata(tiny_ckpts, artifacts_cache):
    import hashlib
    from safetensors import safe_open
    src = tiny_ckpts["v32-tiny"]
    out, _, _ = artifacts_cache.get("v32-tiny")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert sorted(idx["metadata"]["sha256"]) == shards
    for sh in shards:
        assert hashlib.sha256((out / sh).read_bytes()).hexdigest() == idx["metadata"]["sha256"][sh]
        with safe_open(str(out / sh), "pt") as f:        # the reference reader opens our shards
            assert f.metadata() == {"format": "pt"}
            assert all(idx["weight_map"][k] == sh for k in f.keys())
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()
    assert not out.with_name(out.name + ".partial").exists() and not (out / ".journal").exists()


@pytest.mark.parametrize("container", [Container.COMPRESSED_TENSORS, Container.MODELOPT])
def test_reader_nvfp4_decode_order(artifacts_cache, container):
    """Checkpoint.dequantize of our NVFP4 output equals the codec's dequantize, for every NVFP4 tensor."""
    out, plan, _ = artifacts_cache.get("v3-tiny", container=container)
    conv = NVFP4Convention.MODELOPT if container is Container.MODELOPT else NVFP4Convention.COMPRESSED_TENSORS
    with Checkpoint.open(out) as o:
        for t in plan.tensors():
            if t.action is Action.TO_NVFP4:
                raw = o.raw(t.name)
                ref = nvfp4_from_stored(raw["weight"], raw["scale"], raw["global_scale"], conv).dequantize()
                assert torch.equal(o.dequantize(t.name), ref), t.name


def test_compiled_codec_path_same_bytes(tiny_ckpts, tmp_path, monkeypatch):
    """Full-size tensors take the codec's torch.compile'd stages (numel >= 2**16); force them on the tiny
    model, with the torch kernel (the native C kernel is the CPU default), so the engine's use of that
    path is checked against nvfp4_quantize too."""
    import v4convert.formats.nvfp4 as nv
    from v4convert.kernels.native import Kernel
    monkeypatch.setattr(nv, "_use_compiled", lambda backend, t: t.device.type == "cpu")
    src = tiny_ckpts["v3-tiny"]
    plan, _ = run_quantize(src, tmp_path / "out", kernel=Kernel.TORCH)
    counts = check_against_codecs(src, tmp_path / "out", plan, NVFP4Convention.COMPRESSED_TENSORS, ScaleMethod.RTN,
                                  MXScaleRule.OCP_FLOOR)
    assert counts["-> nvfp4"] > 0
