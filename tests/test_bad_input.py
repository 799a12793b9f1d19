"""Bad input: each defect gives one clear error naming the file and tensor, and a non-zero CLI exit."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from v4convert.checkpoint import Checkpoint, CheckpointError
from v4convert.cli import main


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_single(root: Path, mutate) -> None:
    """Collapse a checkpoint into one model.safetensors after ``mutate(dict)`` (via the safetensors lib)."""
    idx = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(idx.values())):
        with safe_open(str(root / shard), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        (root / shard).unlink()
    (root / "model.safetensors.index.json").unlink()
    mutate(tensors)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})


def _cli_error(root: Path) -> str:
    r = CliRunner().invoke(main, ["inspect", str(root)])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def _first_shard(root: Path) -> Path:
    return sorted(root.glob("model-*.safetensors"))[0]


def test_truncated_shard(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    shard = _first_shard(root)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model-00001-of-000002\.safetensors: tensor .*truncated"):
        Checkpoint.open(root)
    assert "truncated" in _cli_error(root)


def test_header_length_past_end(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    shard = _first_shard(root)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model-00001-of-000002\.safetensors: header length .* past the end"):
        Checkpoint.open(root)
    _cli_error(root)


def test_scale_missing(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    _rewrite_single(root, lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name}: FP8 weight without its scale"):
        Checkpoint.open(root)
    assert name in _cli_error(root)


def test_scale_wrong_shape(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v4-flash-tiny"], tmp_path / "c")
    name = "layers.1.attn.wq_b.scale"

    def mutate(t):
        t[name] = t[name][:1].contiguous()
    _rewrite_single(root, mutate)
    with pytest.raises(CheckpointError, match=rf"tensor {name}: scale shape \[1, 1\], expected \[2, 1\]"):
        Checkpoint.open(root)
    _cli_error(root)


def test_mxfp4_scale_wrong_shape(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v4-flash-tiny"], tmp_path / "c")
    name = "layers.2.ffn.experts.5.w1.scale"

    def mutate(t):
        t[name] = t[name][:-1].contiguous()
    _rewrite_single(root, mutate)
    with pytest.raises(CheckpointError, match=rf"tensor {name}: MXFP4 scale .*\[95, 5\], expected F8_E8M0 \[96, 5\]"):
        Checkpoint.open(root)


def test_dtype_contradicts_config(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"

    def mutate(t):
        t[name] = torch.zeros(96, 160, dtype=torch.bfloat16)
        del t[name + "_scale_inv"]
    _rewrite_single(root, mutate)
    with pytest.raises(CheckpointError, match=rf"tensor {name}: dtype BF16 contradicts config.json quantization_config"):
        Checkpoint.open(root)
    # V4: FP4 experts declared by expert_dtype, but an expert stored as FP8
    root4 = _copy(tiny_ckpts["v4-flash-tiny"], tmp_path / "c4")
    e = "layers.1.ffn.experts.0.w3"

    def mutate4(t):
        t[e + ".weight"] = torch.zeros(96, 160).to(torch.float8_e4m3fn)
        t[e + ".scale"] = torch.ones(1, 2)
    _rewrite_single(root4, mutate4)
    with pytest.raises(CheckpointError, match=rf"tensor {e}.weight: FP8 expert contradicts config.json expert_dtype"):
        Checkpoint.open(root4)


def test_shard_name_escaping_directory(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    idx_path = root / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    first = next(iter(idx["weight_map"]))
    for bad in ("../model-00001-of-00002.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
        idx["weight_map"][first] = bad
        idx_path.write_text(json.dumps(idx))
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: shard name .* escapes"):
            Checkpoint.open(root)
    assert "escapes" in _cli_error(root)


def test_unknown_model_type(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    cfg = json.loads((root / "config.json").read_text())
    cfg["model_type"] = "llama"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'llama'"):
        Checkpoint.open(root)
    assert "unknown model_type" in _cli_error(root)


def test_unknown_tensor_name(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    _rewrite_single(root, lambda t: t.__setitem__("model.layers.0.self_attn.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.mystery\.weight: not a known deepseek_v3 tensor"):
        Checkpoint.open(root)
    _cli_error(root)


def test_missing_config_and_shard(tiny_ckpts, tmp_path):
    root = _copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    _first_shard(root).unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-000002\.safetensors: shard file is missing"):
        Checkpoint.open(root)
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(root)


def test_synth_refuses_nonempty_output_and_full_size_without_layers(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    r = CliRunner().invoke(main, ["synth", "--preset", "v3-tiny", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "non-empty directory" in r.output and (tmp_path / "x" / "f").exists()
    r = CliRunner().invoke(main, ["synth", "--preset", "v3-671b", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--layers" in r.output and not (tmp_path / "y").exists()
    r = CliRunner().invoke(main, ["synth", "--preset", "nope", "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "unknown preset" in r.output
