"""``export --onnx`` judged by onnxruntime (CPU): logits vs our runtime on the same weights, KV-cache decode,
graph validity (checker, no unused initializers, every expert present) and bad input.

The int4 reference is our runtime with every tensor the export quantizes replaced by ``(q - 8) * scale`` of the
exact codes written (``int4_reference_weights``), so both sides compute with identical weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from v4convert.runtime import load
from v4convert.runtime.deepseek_v4 import model_name
from v4convert.runtime.v4_args import V4Args

from v4convert.artifacts.onnx import OnnxRunner
from v4convert.checkpoint import Checkpoint
from v4convert.export.onnx import Options, WeightType, export, int4_reference_weights
from v4convert.export.onnx.quant import dequantize_int4, quantize_int4
from v4convert.export.onnx.v4 import cache_widths
from v4convert.families.roles import Family, Group, Role

DATA = Path(__file__).resolve().parents[1] / "v4convert" / "data"
PROMPT_LEN = 64
SOURCES = ["synth", "synth-v32", "trained", "synth-v4", "trained-v4"]


def _kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per token in float64, ``[T]``."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.fixture(scope="module")
def sources(tiny_ckpts) -> dict[str, Path]:
    return {"synth": tiny_ckpts["v3-tiny"], "synth-v32": tiny_ckpts["v32-tiny"], "trained": DATA / "tiny-v3",
            "synth-v4": tiny_ckpts["v4-flash-tiny"], "trained-v4": DATA / "tiny-v4"}


def _reference(path: Path):
    """Our runtime in float32; V4's CSA indexer resolves exact score ties to the lowest entry, as ONNX TopK does
    (``stable_ties``; runtime/DEVIATIONS.md V4 #15)."""
    from v4convert.runtime.v4_attention import Indexer
    model = load(path, max_seq_len=PROMPT_LEN)
    for m in model.modules():
        if isinstance(m, Indexer):
            m.stable_ties = True
    return model


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {(s, w.value): export(src, root / f"{s}-{w.value}", Options(weights=w)).paths[0]
            for s, src in sources.items() for w in WeightType}


def _prompt(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("src", SOURCES)
def test_int4_matches_runtime_on_same_weights(src, sources, exports):
    ck = Checkpoint.open(sources[src])
    model = _reference(sources[src])
    replaced = set()
    for name, w in int4_reference_weights(ck, Options().block_size):
        model.get_parameter(name).copy_(w)
        replaced.add(name)
    # the recipe: every main-model linear is 4-bit except the absorbed kv_b / grouped wo_a, the router, the head,
    # the indexer and the V4 compressors
    rename = model_name if ck.family is Family.V4 else (lambda n: n)
    want = {rename(i.name) for i in ck.infos() if i.role.is_linear and not i.mtp
            and i.role not in (Role.ATTN_KV_B, Role.ATTN_O_A, Role.ROUTER, Role.HEAD)
            and i.role.group not in (Group.INDEXER, Group.COMPRESSOR)}
    assert replaced == want
    ids = _prompt(ck.arch.vocab)
    if ck.family is Family.V32:
        assert ck.config["index_topk"] < PROMPT_LEN          # the sparse selection really drops keys
    ref = model(ids, 0)[0]
    got = OnnxRunner(exports[(src, "int4")]).forward(ids, 0)
    kld = _kld(ref, got)
    assert kld.mean() <= 1e-5, float(kld.mean())
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("src", SOURCES)
def test_fp32_matches_original(src, sources, exports):
    ids = _prompt(1000 if src.startswith("trained") else 611, seed=1)
    ref = _reference(sources[src])(ids, 0)[0]
    got = OnnxRunner(exports[(src, "fp32")]).forward(ids, 0)
    assert _kld(ref, got).mean() <= 1e-6
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("src", SOURCES)
def test_kv_cache_greedy_equals_prefill(src, exports):
    r = OnnxRunner(exports[(src, "int4")])
    prompt = _prompt(r.vocab_size, seed=2)[:, :12]
    nxt = int(r.forward(prompt, 0)[-1].argmax())
    toks, pos = [], prompt.shape[1]
    for _ in range(32):
        toks.append(nxt)
        nxt = int(r.forward(torch.tensor([[nxt]]), pos)[-1].argmax())
        pos += 1
    full = torch.cat([prompt, torch.tensor([toks])], dim=1)
    prefill = OnnxRunner(exports[(src, "int4")]).forward(full, 0)
    assert prefill[prompt.shape[1] - 1:-1].argmax(-1).tolist() == toks
    # a multi-token chunk on top of the cache (chunked prefill) equals the same rows of one prefill
    chunked = OnnxRunner(exports[(src, "int4")])
    chunked.forward(full[:, :20], 0)
    torch.testing.assert_close(chunked.forward(full[:, 20:], 20), prefill[20:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("src", ["synth", "synth-v32", "synth-v4"])
def test_graph_is_valid_and_complete(src, sources, exports):
    path = exports[(src, "int4")]
    onnx.checker.check_model(str(path), full_check=True)            # loads the external data
    m = onnx.load(str(path), load_external_data=False)
    used = {i for n in m.graph.node for i in n.input}
    unused = [t.name for t in m.graph.initializer if t.name not in used]
    assert unused == []
    names = [i.name for i in m.graph.input]
    ck = Checkpoint.open(sources[src])
    L = ck.arch.n_layers
    if ck.family is Family.V4:
        a = V4Args.from_config(ck.config)
        caches = [(i, c) for i in range(L) for c in cache_widths(a, i)]
        assert {c for _, c in caches} >= {"key", "compressor_kv", "indexer_compressor_gate"}
    else:
        caches = [(i, c) for c in ["key"] + (["indexer_key"] if ck.family is Family.V32 else []) for i in range(L)]
    assert names == ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{c}" for i, c in caches]
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{c}" for i, c in caches]
    qmoe = [n for n in m.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == L - ck.arch.first_dense
    # every expert's rows are present and are the codes of that expert's own weights
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    blk = Options().block_size
    for node in qmoe:
        fc1, fc2 = numpy_helper.to_array(inits[node.input[2]]), numpy_helper.to_array(inits[node.input[5]])
        assert fc1.shape[0] == fc2.shape[0] == ck.arch.n_experts
        prefix = node.input[2][: -len(".experts.fc1.qweight")]
        for e in range(ck.arch.n_experts):
            p = f"{prefix}.experts.{e}"
            proj = ("w1", "w3", "w2") if ck.family is Family.V4 else ("gate_proj", "up_proj", "down_proj")
            gate, up, down = (quantize_int4(ck.dequantize(f"{p}.{w}.weight"), blk).codes.flatten(1).numpy()
                              for w in proj)
            np.testing.assert_array_equal(fc1[e, 0::2], gate)
            np.testing.assert_array_equal(fc1[e, 1::2], up)
            np.testing.assert_array_equal(fc2[e], down)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 100), block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**31),
       scale=st.floats(1e-3, 1e3))
def test_int4_codec_against_reference(n, k, block, seed, scale):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    w[0, 0] = 0.0
    q = quantize_int4(w, block)
    # independent reference: per-block loop, nibbles unpacked by hand
    pad = -(-k // block) * block
    wp = np.zeros((n, pad), np.float32)
    wp[:, :k] = w.numpy()
    codes = np.zeros((n, pad), np.int64)
    for r in range(n):
        for b in range(pad // block):
            blk_ = wp[r, b * block:(b + 1) * block]
            s = np.float32(np.abs(blk_).max()) / np.float32(7)
            assert q.scales[r, b].item() == pytest.approx(float(s), rel=1e-6)
            codes[r, b * block:(b + 1) * block] = (np.clip(np.round(blk_ / s), -8, 7) + 8) if s > 0 else 8
    packed = q.codes.numpy().reshape(n, -1)
    np.testing.assert_array_equal(packed & 15, codes[:, 0::2])
    np.testing.assert_array_equal(packed >> 4, codes[:, 1::2])
    deq = dequantize_int4(q)
    assert deq.shape == (n, k)
    assert (deq - w).abs().max() <= q.scales.max() / 2 * (1 + 1e-5) + 1e-12


def test_matmulnbits_reads_our_packing():
    """The consumer decides the layout: onnxruntime's MatMulNBits on our codes equals x @ dequant^T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(3))
    q = quantize_int4(w, 16)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=80, N=24, bits=4,
                            block_size=16, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 80])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])],
                          [numpy_helper.from_array(q.codes.numpy(), "b"),
                           numpy_helper.from_array(q.scales.reshape(-1).numpy(), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(4))
    (y,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), x @ dequantize_int4(q).T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- bad input
def _cli(*args):
    from v4convert.cli import main
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("preset,extra,needle", [
    ("v3-tiny", ["--onnx-block-size", "64"], "multiple of the block size 64"),
    ("v3-tiny", ["--onnx-block-size", "48"], "block size 48 is not supported"),
])
def test_bad_input_one_line_no_files(preset, extra, needle, tiny_ckpts, tmp_path):
    out = tmp_path / "o"
    r = _cli("export", str(tiny_ckpts[preset]), "--onnx", "--out", str(out), *extra)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not out.exists()


def test_failure_midway_leaves_no_model(sources, tmp_path, monkeypatch):
    from v4convert.export.onnx import v3
    def boom(self, x, L):
        raise RuntimeError("injected")
    monkeypatch.setattr(v3.V3Graph, "moe", boom)
    with pytest.raises(RuntimeError, match="injected"):
        export(sources["synth"], tmp_path / "o", Options())
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # neither o/ nor o.partial/


def test_cli_export_and_verify(sources, exports, tmp_path):
    r = _cli("verify", str(sources["trained"]), str(exports[("trained", "int4")].parent), "--tokens", "128",
             "--ctx", "64", "--gen-prompts", "1", "--gen-tokens", "4", "--json", str(tmp_path / "v.json"))
    assert r.exit_code == 0, r.output
    assert "onnx" in r.output and "KL divergence" in r.output




def test_cli_flags_registry_and_run(sources, tmp_path):
    """``export --onnx`` comes from the registry (its Options are the ``--onnx-*`` flags); the API takes the weight
    type by name; ``run DIR`` generates through onnxruntime and refuses runtime-only options."""
    import json

    from v4convert import api
    out = tmp_path / "cli"
    r = _cli("export", str(sources["trained"]), "--onnx", "--out", str(out), "--onnx-weights", "INT4",
             "--onnx-block-size", "16", "--no-progress")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("wrote deepseek_v3 ONNX: ") and "weights int4 block 16" in r.output
    meta = json.loads((out / "model.v4convert.json").read_text())
    assert (meta["weights"], meta["block_size"]) == ("int4", 16)
    bad = _cli("export", str(sources["trained"]), "--onnx", "--out", str(tmp_path / "b"), "--onnx-weights", "int3")
    assert bad.exit_code == 2 and "int3" in bad.output and not (tmp_path / "b").exists()
    bad = _cli("export", str(sources["trained"]), "--onnx", "--out", str(tmp_path / "b"), "--type", "q8_0")
    assert bad.exit_code == 2 and "--type is not an option of --onnx" in bad.output
    res = api.export(api.ExportArgs(src=sources["trained"], out=tmp_path / "api", format="onnx",
                                    options=Options(weights="FP32")))
    assert json.loads((tmp_path / "api" / "model.v4convert.json").read_text())["weights"] == "fp32"
    assert res.label == "deepseek_v3 ONNX" and res.paths[0] == tmp_path / "api" / "model.onnx"
    # the output rule (v4convert.outputs): an export of ours is replaced only with --overwrite; a source or a
    # directory we did not write never
    again = ["export", str(sources["trained"]), "--onnx", "--out", str(out), "--onnx-weights", "fp32"]
    r = _cli(*again)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert json.loads((out / "model.v4convert.json").read_text())["weights"] == "int4"
    r = _cli(*again, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "model.v4convert.json").read_text())["weights"] == "fp32"
    assert not (tmp_path / "cli.partial").exists() and not (tmp_path / "cli.old").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = _cli("export", str(sources["trained"]), "--onnx", "--out", str(foreign / "m.onnx"), "--overwrite")
    assert r.exit_code == 2 and "not written by v4convert" in r.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    r = _cli("export", str(sources["trained"]), "--onnx", "--out", str(sources["trained"] / "onnx"))
    assert r.exit_code == 2 and "inside the source" in r.output
    run = _cli("run", str(out), "--prompt", "Hello", "--max-new-tokens", "4")
    assert run.exit_code == 0, run.output
    assert "prefill: " in run.output and "decode: " in run.output and "tok/s" in run.output
    run = _cli("run", str(out), "--prompt", "Hello", "--packed")
    assert run.exit_code == 2 and "ONNX export" in run.output


def test_unloadable_model_is_one_line(sources, tmp_path):
    """A damaged model.onnx beside a tokenizer: `run` says so in one line, exit 2 (not a traceback)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"\x08\x07 not a protobuf")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((sources["trained"] / name).read_bytes())
    r = _cli("run", str(bad), "--prompt", "Hello", "--max-new-tokens", "2")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "onnxruntime cannot load" in lines[0]
