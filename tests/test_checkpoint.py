"""The checkpoint reader on every tiny preset: roles, pairing, and bit-exact dequantization.

The independent decode reads bytes with the `safetensors` library (not our header parser) and
decodes with ml_dtypes and explicit per-element block indexing (not our repeat_interleave path).
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from v4convert.checkpoint import Checkpoint
from v4convert.families.layout import Arch, inventory
from v4convert.families.roles import Family, Role, Storage
from v4convert.synth import synth

from .conftest import TINY_PRESETS


def _st_tensor(root: Path, name: str) -> np.ndarray:
    """Raw stored tensor via the safetensors library, as numpy (FP8/E8M0 reinterpreted as uint8)."""
    idx = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(root / idx[name]), "pt") as f:
        t = f.get_tensor(name)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8):
        t = t.view(torch.uint8)
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _independent_decode(root: Path, info) -> np.ndarray:
    w = _st_tensor(root, next(e.name for k, e in info.parts.items() if k == "weight"))
    if info.storage in (Storage.BF16, Storage.F32):
        return w.astype(np.float32)
    s_name = info.parts["scale"].name
    s = _st_tensor(root, s_name)
    n, k = info.shape
    if info.storage is Storage.FP8_BLOCK:
        vals = w.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        sc = s.view(ml_dtypes.float8_e8m0fnu).astype(np.float32) if info.parts["scale"].dtype == "F8_E8M0" else s
        rows = np.arange(n)[:, None] // 128
        cols = np.arange(k)[None, :] // 128
        return vals * sc[rows, cols]
    if info.storage is Storage.MXFP4:
        lo, hi = w & 0x0F, w >> 4
        codes = np.empty((n, k), dtype=np.uint8)
        codes[:, 0::2], codes[:, 1::2] = lo, hi
        vals = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
        sc = s.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
        return vals * sc[np.arange(n)[:, None], np.arange(k)[None, :] // 32]
    raise AssertionError(info.storage)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_tensor_dequantizes_bit_exactly(tiny_ckpts, preset):
    root = tiny_ckpts[preset]
    ck = Checkpoint.open(root)
    seen = set()
    for info in ck.infos():
        ours = ck.dequantize(info.name)
        assert tuple(ours.shape) == info.shape
        if info.storage is Storage.I64:
            np.testing.assert_array_equal(ours.numpy(), _st_tensor(root, info.name))
            continue
        assert ours.dtype == torch.float32
        np.testing.assert_array_equal(ours.numpy(), _independent_decode(root, info), err_msg=info.name)
        seen.add((info.storage, info.parts.get("scale").dtype if "scale" in info.parts else None))
    want = {
        "v3-tiny": {(Storage.FP8_BLOCK, "F32"), (Storage.BF16, None), (Storage.F32, None)},
        "v32-tiny": {(Storage.FP8_BLOCK, "F32"), (Storage.BF16, None), (Storage.F32, None)},
        "v4-flash-tiny": {(Storage.FP8_BLOCK, "F8_E8M0"), (Storage.MXFP4, "F8_E8M0"), (Storage.BF16, None)},
        "v4-flash-base-tiny": {(Storage.FP8_BLOCK, "F8_E8M0"), (Storage.FP8_BLOCK, "F32")},
    }[preset]
    assert want <= seen


def test_partial_edge_blocks_are_exercised(tiny_ckpts):
    ck = Checkpoint.open(tiny_ckpts["v3-tiny"])
    partial = [i for i in ck.infos() if i.storage is Storage.FP8_BLOCK and (i.shape[0] % 128 or i.shape[1] % 128)]
    assert any(i.shape[0] % 128 for i in partial) and any(i.shape[1] % 128 for i in partial)
    kv_a = ck.tensor_info("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert kv_a.shape == (80, 160) and kv_a.parts["scale"].shape == (1, 2)


def test_roles_layers_experts_and_mtp(tiny_ckpts):
    ck = Checkpoint.open(tiny_ckpts["v3-tiny"])
    assert ck.family is Family.V3
    i = ck.tensor_info("model.layers.2.mlp.experts.7.down_proj.weight")
    assert (i.role, i.layer, i.expert, i.mtp) == (Role.EXPERT_DOWN, 2, 7, False)
    m = ck.tensor_info("model.layers.3.eh_proj.weight")     # MTP block = n_layers
    assert m.role is Role.MTP_EH_PROJ and m.mtp and m.shape == (160, 320)
    assert ck.tensor_info("model.layers.3.mlp.experts.0.up_proj.weight").mtp
    assert ck.tensor_info("lm_head.weight").role is Role.HEAD
    assert ck.missing() == []
    v4 = Checkpoint.open(tiny_ckpts["v4-flash-tiny"])
    assert v4.tensor_info("layers.0.ffn.gate.tid2eid").role is Role.HASH_TABLE
    assert v4.tensor_info("layers.1.ffn.gate.bias").role is Role.ROUTER_BIAS
    assert v4.tensor_info("layers.1.attn.indexer.compressor.wkv.weight").role is Role.INDEXER_COMPRESSOR_KV
    e = v4.tensor_info("mtp.0.ffn.experts.3.w2.weight")
    assert e.role is Role.EXPERT_DOWN and e.mtp and e.storage is Storage.MXFP4 and e.stored_shape == (160, 48)
    # every expert uses the full code range (all 16 nibbles occur)
    codes = np.concatenate([v4.raw(n)["weight"].view(torch.uint8).numpy().ravel() for n in v4.names()
                            if v4.tensor_info(n).storage is Storage.MXFP4])
    assert set(np.unique(codes & 0xF)) == set(range(16)) and set(np.unique(codes >> 4)) == set(range(16))


def test_weight_and_scale_in_different_shards(tmp_path):
    root = synth("v3-tiny", tmp_path / "c", shard_size=20_000).out
    idx = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    split = [n for n in idx if n.endswith(".weight_scale_inv") and idx[n] != idx[n[: -len("_scale_inv")]]]
    assert split, "shard size should separate at least one weight from its scale"
    ck = Checkpoint.open(root)
    name = split[0][: -len("_scale_inv")]
    info = ck.tensor_info(name)
    assert info.parts["weight"].path != info.parts["scale"].path
    np.testing.assert_array_equal(ck.dequantize(name).numpy(), _independent_decode(root, info))


def test_synth_is_deterministic_and_seeded(tmp_path):
    a = synth("v4-flash-tiny", tmp_path / "a", seed=3).out
    b = synth("v4-flash-tiny", tmp_path / "b", seed=3).out
    c = synth("v4-flash-tiny", tmp_path / "c", seed=4).out
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()


def test_fp8_values_are_sane(tiny_ckpts):
    ck = Checkpoint.open(tiny_ckpts["v3-tiny"])
    w = ck.dequantize("model.layers.1.mlp.experts.0.gate_proj.weight")
    assert 0.01 < float(w.std()) < 0.04 and torch.isfinite(w).all()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_inventory_from_config_equals_written_checkpoint(tiny_ckpts, preset):
    """The config-only inventory (what inspect uses for a bare config) matches the files byte for byte."""
    root = tiny_ckpts[preset]
    ck = Checkpoint.open(root)
    a = Arch.from_config(json.loads((root / "config.json").read_text()))
    slots = {s.name: s for s in inventory(a)}
    assert set(slots) == set(ck.names())
    for info in ck.infos():
        assert slots[info.name].shape == info.shape and slots[info.name].role is info.role
    total = json.loads((root / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == sum(i.nbytes for i in ck.infos())


def _tf_tiny_v3(tmp_path: Path) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    cfg = DeepseekV3Config(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, q_lora_rank=48, kv_lora_rank=32,
                           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path / "v3tf")
    return tmp_path / "v3tf"


def test_reads_transformers_saved_checkpoints(tmp_path):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    root = _tf_tiny_v3(tmp_path)
    ck = Checkpoint.open(root)
    assert all(i.storage is Storage.F32 for i in ck.infos())
    assert {s.layer for s in ck.missing()} == {2}     # transformers does not save the MTP layer
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        np.testing.assert_array_equal(ck.dequantize("model.layers.1.mlp.experts.3.up_proj.weight").numpy(),
                                      f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight").numpy())
    cfg = DeepseekV4Config(vocab_size=97, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=2, head_dim=32, q_lora_rank=48, qk_rope_head_dim=8,
                           n_routed_experts=4, num_experts_per_tok=2, o_groups=2, o_lora_rank=16, index_n_heads=2,
                           index_head_dim=16, index_topk=4, sliding_window=8, hc_mult=2,
                           layer_types=["sliding_attention", "compressed_sparse_attention",
                                        "heavily_compressed_attention"],
                           mlp_layer_types=["hash_moe", "moe", "moe"])
    DeepseekV4ForCausalLM(cfg).save_pretrained(tmp_path / "v4tf")
    ck4 = Checkpoint.open(tmp_path / "v4tf")
    assert ck4.family is Family.V4
    # names are canonical (published) even though transformers writes "model." prefixes and aliases
    for n in ("embed.weight", "head.weight", "hc_head_fn", "layers.2.attn.compressor.ape", "layers.0.ffn.gate.tid2eid"):
        assert n in ck4.names()
    assert all(s.mtp for s in ck4.missing())


def test_v32_full_size_preset_plans_the_published_indexer():
    """``synth --preset v32-671b`` (issue 16's V3.2 throughput layer): V3's shapes plus the lightning indexer of
    DeepSeek-V3.2's release (64 heads x 128, wq_b from the 1536 q latent, wk and weights_proj from the 7168 hidden)."""
    from v4convert.families.layout import Arch
    from v4convert.synth import planned_tensors, preset_config
    cfg = preset_config("v32-671b")
    assert cfg["model_type"] == "deepseek_v32" and cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    shapes = {t.name: (t.dtype, t.shape) for t in planned_tensors(Arch.from_config(cfg), {3}, False, 0)}
    ix = "model.layers.3.self_attn.indexer."
    assert shapes[ix + "wq_b.weight"] == ("F8_E4M3", (64 * 128, 1536))
    assert shapes[ix + "wk.weight"] == ("F8_E4M3", (128, 7168))
    assert shapes[ix + "weights_proj.weight"][1] == (64, 7168)
    assert shapes["model.layers.3.mlp.experts.255.down_proj.weight"] == ("F8_E4M3", (7168, 2048))
