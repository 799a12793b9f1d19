"""GGUF export without llama.cpp: metadata and names per arch, type mix, lossless MXFP4, splits,
streaming order, tokenizer, the GGUF -> checkpoint inverse, CLI errors. (llama.cpp itself loads and
runs these files in ``test_gguf_llama.py``.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from v4convert.checkpoint import Checkpoint
from v4convert.cli import main
from v4convert.export.gguf.exporter import ExportError, GGUFType, TypeMix, export_gguf, gguf_as_checkpoint, gguf_values
from v4convert.formats.gguf_writer import GGUFWriteError, Metadata, TensorSpec, write_gguf
from v4convert.formats.safetensors_io import write_streaming
from v4convert.families.layout import Arch
from v4convert.synth import assign_shards, planned_tensors, preset_config, synth
from v4convert.tokenizer_data import write_tokenizer

F32_MIX = TypeMix(GGUFType.F32, GGUFType.F32)


def v4_llama_config() -> dict:
    """The v4-flash-tiny preset, which satisfies llama.cpp's deepseek4 constraints since issue #19
    (``v4convert.gguf_constraints``): compress ratios 0, 4, 128 only (layers 0..3 = sliding, CSA, HCA,
    CSA), ``hc_mult`` 4 and an indexer head of 64 (its Hadamard rotation of the indexer q/k)."""
    return preset_config("v4-flash-tiny")


def v32_llama_config() -> dict:
    """The v32-tiny preset with an indexer head of 64: llama.cpp's deepseek32 rotates the indexer q/k
    with a Hadamard matrix at least 64 wide (the preset's 32 fails ``ggml_can_mul_mat``)."""
    cfg = preset_config("v32-tiny")
    cfg["index_head_dim"] = 64
    return cfg


def synth_config(cfg: dict, out: Path, seed: int = 0) -> Path:
    """``synth`` for an explicit config (same layout, values and tokenizer as the presets)."""
    a = Arch.from_config(cfg)
    out.mkdir(parents=True)
    shards = assign_shards(planned_tensors(a, None, True, seed), 2 << 20)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_streaming(out / fname, shard, {"format": "pt"})
        weight_map.update({t.name: fname for t in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def gguf_ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf_ckpts")
    return {"v3": synth("v3-tiny", root / "v3").out, "v32": synth_config(v32_llama_config(), root / "v32"),
            "v4": synth_config(v4_llama_config(), root / "v4")}


def _fields(path: Path) -> tuple[dict, dict]:
    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    return kv, {t.name: t for t in r.tensors}


def test_deepseek2_metadata_names_and_type_mix(gguf_ckpts, tmp_path) -> None:
    res = export_gguf(gguf_ckpts["v3"], tmp_path / "m.gguf", TypeMix(GGUFType.Q4_0, GGUFType.MXFP4))
    kv, t = _fields(res.paths[0])
    A = "deepseek2"
    cfg = json.loads((gguf_ckpts["v3"] / "config.json").read_text())
    assert kv["general.architecture"] == A
    assert kv[f"{A}.block_count"] == 4 and kv[f"{A}.nextn_predict_layers"] == 1   # 3 layers + MTP
    assert kv[f"{A}.expert_gating_func"] == 2                                       # sigmoid (missing = softmax)
    assert (kv[f"{A}.attention.key_length"], kv[f"{A}.attention.value_length"]) == (64 + 16, 64)
    assert (kv[f"{A}.attention.key_length_mla"], kv[f"{A}.attention.value_length_mla"]) == (32 + 16, 24)
    assert kv[f"{A}.attention.head_count_kv"] == 1 and kv[f"{A}.leading_dense_block_count"] == 1
    assert (kv[f"{A}.expert_group_count"], kv[f"{A}.expert_group_used_count"]) == (4, 2)
    assert kv[f"{A}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * cfg["rope_scaling"]["mscale_all_dim"])
    assert kv[f"{A}.expert_weights_scale"] == pytest.approx(2.5) and kv[f"{A}.expert_weights_norm"] is True
    kb, vb = t["blk.1.attn_k_b.weight"], t["blk.1.attn_v_b.weight"]
    assert [int(x) for x in kb.shape] == [32, 64, 4] and [int(x) for x in vb.shape] == [64, 24, 4]
    assert kb.tensor_type == Q.Q8_0 and vb.tensor_type == Q.Q8_0          # 8 bits even with --type Q4_0
    assert t["blk.1.attn_q_a.weight"].tensor_type == Q.Q4_0
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type == Q.MXFP4
    assert [int(x) for x in t["blk.1.ffn_down_exps.weight"].shape] == [96, 160, 8]
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias", "blk.0.attn_norm.weight", "output_norm.weight"):
        assert t[name].tensor_type == Q.F32, name
    assert "blk.3.nextn.eh_proj.weight" in t and "blk.3.nextn.shared_head_head.weight" in t
    assert not any("kv_b" in n for n in t)
    assert kv["general.file_type"] == 38                                   # MOSTLY_MXFP4_MOE
    # no-MTP export drops block 3 and the NextN key
    res2 = export_gguf(gguf_ckpts["v3"], tmp_path / "n.gguf", F32_MIX, keep_mtp=False, modelfile=False)
    kv2, t2 = _fields(res2.paths[0])
    assert kv2[f"{A}.block_count"] == 3 and f"{A}.nextn_predict_layers" not in kv2
    assert not any(n.startswith("blk.3.") for n in t2)


def test_tokenizer_and_modelfile(gguf_ckpts, tmp_path) -> None:
    res = export_gguf(gguf_ckpts["v32"], tmp_path / "m.gguf", F32_MIX)
    kv, t = _fields(res.paths[0])
    tj = json.loads((gguf_ckpts["v32"] / "tokenizer.json").read_text())
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == 611 and kv["tokenizer.ggml.pre"] == "gpt-2" and kv["tokenizer.ggml.model"] == "gpt2"
    for tok, i in tj["model"]["vocab"].items():
        assert tokens[i] == tok
    assert tokens[600] == "[PAD600]" and kv["tokenizer.ggml.token_type"][600] == 5
    assert kv["tokenizer.ggml.token_type"][0] == 3                       # BOS is a control token
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert kv["tokenizer.ggml.add_bos_token"] is True and "<｜Assistant｜>" in kv["tokenizer.chat_template"]
    assert kv["deepseek32.attention.indexer.top_k"] == 8 and "blk.0.indexer.k_norm.bias" in t
    mf = (tmp_path / "Modelfile").read_text()
    assert mf.startswith("# written by v4convert\nFROM ./m.gguf\n") and 'PARAMETER stop "<｜end▁of▁sentence｜>"' in mf


def test_v4_experts_repacked_losslessly_and_metadata(gguf_ckpts, tmp_path) -> None:
    res = export_gguf(gguf_ckpts["v4"], tmp_path / "m.gguf")          # default mix: experts MXFP4
    kv, t = _fields(res.paths[0])
    assert kv["general.architecture"] == "deepseek4" and kv["deepseek4.expert_gating_func"] == 4
    assert kv["deepseek4.block_count"] == 4 and list(kv["deepseek4.attention.compress_ratios"]) == [0, 4, 128, 4, 0]
    assert kv["deepseek4.embedding_length_out"] == 4 * 160
    assert len(res.repacked) == 3 * 4 and all("_exps" in n for n in res.repacked)
    assert any(s.startswith("mtp.0.") for s in res.skipped)                 # MTP: separate draft GGUF only
    assert "blk.0.exp_probs_b.bias" not in t and "blk.1.exp_probs_b.bias" in t   # layer 0 is hash-routed
    with Checkpoint.open(gguf_ckpts["v4"]) as ck:
        for L in range(4):
            g = t[f"blk.{L}.ffn_up_exps.weight"]
            vals = gguf_values(g.data, Q(int(g.tensor_type)), (8, 96, 160))
            for e in range(8):
                src = ck.dequantize(f"layers.{L}.ffn.experts.{e}.w3.weight")
                assert torch.equal(vals[e], src), (L, e)                    # zero requantization error
        tid = t["blk.0.ffn_gate_tid2eid.weight"]
        assert tid.tensor_type == Q.I32
        assert torch.equal(torch.from_numpy(tid.data.astype(np.int64)), ck.dequantize("layers.0.ffn.gate.tid2eid"))


def test_f32_export_inverts_to_the_checkpoint(gguf_ckpts, tmp_path) -> None:
    """k_b/v_b split + transposition, expert stacking and MTP placement undo exactly."""
    res = export_gguf(gguf_ckpts["v32"], tmp_path / "m.gguf", F32_MIX, modelfile=False)
    back = gguf_as_checkpoint(res.paths, gguf_ckpts["v32"], tmp_path / "back")
    with Checkpoint.open(gguf_ckpts["v32"]) as ck, Checkpoint.open(back) as ck2:
        assert sorted(ck.names()) == sorted(ck2.names())
        for n in ck.names():
            assert torch.equal(ck.dequantize(n), ck2.dequantize(n)), n


def test_split_files_match_the_single_file(gguf_ckpts, tmp_path) -> None:
    one = export_gguf(gguf_ckpts["v3"], tmp_path / "one.gguf", modelfile=False).paths
    parts = export_gguf(gguf_ckpts["v3"], tmp_path / "sp.gguf", split_max_size=400_000, modelfile=False).paths
    n = len(parts)
    assert n >= 3 and [p.name for p in parts] == [f"sp-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert not list(tmp_path.glob("*.partial"))
    kv1, t1 = _fields(one[0])
    merged = {}
    for i, p in enumerate(parts):
        kv, t = _fields(p)
        assert (kv["split.no"], kv["split.count"], kv["split.tensors.count"]) == (i, n, len(t1))
        assert ("general.architecture" in kv) == (i == 0)
        merged.update(t)
    assert merged.keys() == t1.keys()
    for name, tt in t1.items():
        assert np.array_equal(merged[name].data, tt.data), name


def test_writer_streams_infos_first_and_cleans_up(tmp_path) -> None:
    out = tmp_path / "w.gguf"
    seen = []

    def produce(i: int):
        def f():
            part = tmp_path / "w.gguf.partial"
            seen.append((i, part.stat().st_size, out.exists()))
            return torch.full((4, 32), float(i)).view(torch.uint8)
        return f
    specs = [TensorSpec(f"t{i}", (4, 32), Q.F32, produce(i)) for i in range(3)]
    md = Metadata()
    md.str("general.architecture", "x")
    write_gguf(out, md, specs)
    header = seen[0][1]
    assert header > 0 and header % 32 == 0                       # all infos written, aligned, before data
    assert [s[1] for s in seen] == [header + 512 * i for i in range(3)] and not any(s[2] for s in seen)
    r = GGUFReader(out)
    assert [float(x.data[0, 0]) for x in r.tensors] == [0.0, 1.0, 2.0]
    bad = [TensorSpec("short", (4, 32), Q.F32, lambda: torch.zeros(3, 32))]
    with pytest.raises(GGUFWriteError, match="tensor short: producer gave 384 bytes, declared 512"):
        write_gguf(tmp_path / "bad.gguf", md, bad)
    assert not list(tmp_path.glob("bad*"))
    with pytest.raises(GGUFWriteError, match="declared twice"):
        write_gguf(tmp_path / "dup.gguf", md, specs[:1] * 2)


def test_cli_export(gguf_ckpts, tmp_path, monkeypatch) -> None:
    from v4convert.cli import Group
    from v4convert.cli import export as cli_export
    runner = CliRunner()
    # a format named before its exporter exists (every named one is implemented now): clean refusal, exit 2
    monkeypatch.setitem(cli_export.PLANNED, "future", "A format named before it exists.")
    g = Group()
    g.add_command(cli_export._make_command())
    r = runner.invoke(g, ["export", str(gguf_ckpts["v3"]), "--future", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "export --future is not implemented yet" in r.output
    r = runner.invoke(main, ["export", str(gguf_ckpts["v3"]), "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "--gguf" in r.output
    r = runner.invoke(main, ["export", str(gguf_ckpts["v3"]), "--gguf", "--out", str(tmp_path / "x.bin")])
    assert r.exit_code == 2 and "must end in .gguf" in r.output
    r = runner.invoke(main, ["export", str(gguf_ckpts["v3"]), "--gguf", "--out", str(tmp_path / "c.gguf"),
                             "--type", "bf16", "--expert-type", "q4_0", "--split-max-size", "1M"])
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in tmp_path.glob("c-*.gguf"))
    assert files and all("-of-" in f for f in files) and "deepseek2" in r.output


def test_our_mxfp4_artifact_is_repacked_losslessly(gguf_ckpts, tmp_path) -> None:
    """`quantize --fp4 --scheme mxfp4` output (DeepSeek-native I8 + E8M0 experts) goes into GGUF MXFP4
    by re-packing: the GGUF experts, dequantized by gguf-py, equal the artifact's values exactly."""
    art = tmp_path / "mx"
    r = CliRunner().invoke(main, ["quantize", str(gguf_ckpts["v3"]), "--fp4", "--scheme", "mxfp4", "--out", str(art)])
    assert r.exit_code == 0, r.output
    res = export_gguf(art, tmp_path / "m.gguf", modelfile=False)
    assert sorted(res.repacked) == sorted(f"blk.{L}.ffn_{p}_exps.weight" for L in (1, 2, 3) for p in ("gate", "up", "down"))
    _, t = _fields(res.paths[0])
    with Checkpoint.open(art) as ck:
        for L in (1, 3):
            g = t[f"blk.{L}.ffn_down_exps.weight"]
            vals = gguf_values(g.data, Q(int(g.tensor_type)), (8, 160, 96))
            for e in range(8):
                assert torch.equal(vals[e], ck.dequantize(f"model.layers.{L}.mlp.experts.{e}.down_proj.weight")), (L, e)


# DeepSeek-V3's release tokenizer.json pre_tokenizer (R1, V3.1 and V3.2 ship the same tokenizer)
DEEPSEEK_V3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"}, "behavior": "Isolated",
     "invert": False},
    {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}"
                                            "\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_pre_tokenizer_name_follows_tokenizer_json() -> None:
    from v4convert.export.gguf.metadata import pre_tokenizer_name
    p = Path("tokenizer.json")
    assert pre_tokenizer_name(DEEPSEEK_V3_PRE, p) == "deepseek-v3"
    tiny = json.loads((Path(__file__).parents[1] / "v4convert/data/tiny-v3/tokenizer.json").read_text())
    assert pre_tokenizer_name(tiny["pre_tokenizer"], p) == "gpt-2"
    no_regex = {**tiny["pre_tokenizer"], "use_regex": False}            # ByteLevel alone, no split at all
    digits_only = {**DEEPSEEK_V3_PRE, "pretokenizers": DEEPSEEK_V3_PRE["pretokenizers"][:1]
                   + DEEPSEEK_V3_PRE["pretokenizers"][3:]}
    for bad in (no_regex, digits_only, {"type": "Whitespace"}, None):
        with pytest.raises(ExportError, match="pre_tokenizer"):
            pre_tokenizer_name(bad, p)
