"""llama.cpp importance matrix: `v4convert calibrate --imatrix` (file layout, values against a direct computation)
and `export --gguf --type Q4_K_M --imatrix` (llama.cpp's quantizer takes it: keys, changed tensors, legacy .dat)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from v4convert.calib.data import calibration_windows
from v4convert.cli import main

pytest.importorskip("llama_cpp")
from gguf import GGUFReader, GGUFValueType  # noqa: E402  (gguf-py: llama.cpp's own reader, an independent parser)

CKPT = Path(__file__).resolve().parent.parent / "v4convert" / "data" / "tiny-v3"
TEXT = "def f(x):\n    return [x + i for i in range(10)]\n\nclass A:\n    pass\n" * 200
TOKENS, SEQ = 192, 64                          # 3 windows x 64 tokens


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(calibration text, our imatrix made by the CLI) on the bundled trained tiny V3."""
    d = tmp_path_factory.mktemp("imatrix")
    txt = d / "c.txt"
    txt.write_text(TEXT)
    out = d / "tiny.imatrix.gguf"
    r = CliRunner().invoke(main, ["calibrate", str(CKPT), "--calib", str(txt), "--calib-tokens", str(TOKENS),
                                  "--calib-seq-len", str(SEQ), "--imatrix", str(out)])
    assert r.exit_code == 0, r.output
    return txt, out


def _fields(path: Path) -> dict:
    return {k: f for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def test_file_layout_as_llama_imatrix_writes_it(made):
    """KVs and tensor shapes read by gguf-py: general.type, datasets (string array), u32 chunk_count/size, per
    weight F32 in_sum2 ne {K, n_mat} and counts ne {1, n_mat}; routed experts stacked (n_mat = 16) and their
    counts add up to tokens x top-k (every token goes to 4 experts)."""
    _, out = made
    f = _fields(out)
    assert f["general.type"].contents() == "imatrix"
    assert f["imatrix.datasets"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert f["imatrix.chunk_count"].types == [GGUFValueType.UINT32] and f["imatrix.chunk_count"].contents() == 3
    assert f["imatrix.chunk_size"].types == [GGUFValueType.UINT32] and f["imatrix.chunk_size"].contents() == SEQ
    t = {x.name: x for x in GGUFReader(out).tensors}
    names = {n.rsplit(".", 1)[0] for n in t}
    assert all(n + ".in_sum2" in t and n + ".counts" in t for n in names)
    assert all(x.tensor_type.name == "F32" for x in t.values())
    # layer 0 dense (7 linears), layers 1-3 MoE: 4 attention + 3 shared + 3 stacked experts
    assert len(names) == 7 + 3 * 10
    assert list(t["blk.0.ffn_down.weight.in_sum2"].shape) == [384, 1]
    assert list(t["blk.0.ffn_down.weight.counts"].shape) == [1, 1]
    assert float(t["blk.0.ffn_down.weight.counts"].data[0, 0]) == TOKENS
    assert list(t["blk.2.ffn_down_exps.weight.in_sum2"].shape) == [96, 16]
    assert list(t["blk.2.ffn_gate_exps.weight.counts"].shape) == [1, 16]
    assert float(np.asarray(t["blk.2.ffn_up_exps.weight.counts"].data).sum()) == TOKENS * 4
    assert not any(n.startswith(("blk.0.attn_k_b", "blk.0.attn_v_b", "token_embd", "output")) for n in names)


def test_sums_and_counts_equal_a_direct_computation(made):
    """in_sum2 / counts = sum of x^2 per input column and the rows seen, from forward pre-hooks on the runtime's
    own modules during a plain forward of the unquantized model on the same windows."""
    from v4convert.runtime import load
    txt, out = made
    data = calibration_windows(CKPT, txt, TOKENS, SEQ)
    model = load(CKPT, dtype=torch.float32, max_seq_len=SEQ, max_batch_size=data.windows.shape[0])
    want: dict[str, list] = {}
    mods = {"blk.0.attn_q_b.weight": "model.layers.0.self_attn.q_b_proj",
            "blk.1.ffn_down_shexp.weight": "model.layers.1.mlp.shared_experts.down_proj",
            **{f"blk.3.ffn_down_exps.weight#{e}": f"model.layers.3.mlp.experts.{e}.down_proj" for e in range(16)}}
    hooks = []
    for key, m in mods.items():
        def hook(mod, a, key=key):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            s, c = want.get(key, (0, 0))
            want[key] = (s + (x * x).sum(0), c + x.shape[0])
        hooks.append(model.get_submodule(m).register_forward_pre_hook(hook))
    with torch.inference_mode():
        model(data.windows)
    for h in hooks:
        h.remove()
    t = {x.name: np.asarray(x.data) for x in GGUFReader(out).tensors}
    for name in ("blk.0.attn_q_b.weight", "blk.1.ffn_down_shexp.weight"):
        s, c = want[name]
        np.testing.assert_allclose(t[name + ".in_sum2"][0], s.numpy(), rtol=1e-5)
        assert t[name + ".counts"][0, 0] == c == TOKENS
    sums, counts = t["blk.3.ffn_down_exps.weight.in_sum2"], t["blk.3.ffn_down_exps.weight.counts"].reshape(-1)
    for e in range(16):
        s, c = want.get(f"blk.3.ffn_down_exps.weight#{e}", (torch.zeros(96, dtype=torch.float64), 0))
        assert counts[e] == c
        np.testing.assert_allclose(sums[e], s.numpy(), rtol=1e-5, atol=1e-6)


def _legacy_dat(gguf_imatrix: Path, path: Path) -> None:
    """Write the same importance in llama-imatrix's legacy .dat format (values = mean x^2 * ncall, which the
    quantizer divides by ncall; ncall = 1 here so the float32 means are exactly those of the GGUF path), with the
    chunk count and dataset trailer."""
    t = {x.name: np.asarray(x.data, dtype=np.float32) for x in GGUFReader(gguf_imatrix).tensors}
    names = sorted(n[: -len(".in_sum2")] for n in t if n.endswith(".in_sum2"))
    b = struct.pack("<i", len(names))
    for n in names:
        s, c = t[n + ".in_sum2"], t[n + ".counts"].reshape(-1)
        ncall = 1
        mean = np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1).astype(np.float32), np.float32(1))
        b += struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", ncall, mean.size) + mean.tobytes()
    b += struct.pack("<i", 3) + struct.pack("<i", 4) + b"test"
    path.write_bytes(b)


def _export(out: Path, *extra: str):
    return CliRunner().invoke(main, ["export", str(CKPT), "--gguf", "--type", "q4_k_m", "--no-modelfile",
                                     "--out", str(out), *extra])


def test_llama_quantizer_uses_it(made, tmp_path):
    """Q4_K_M through llama.cpp's quantizer: the output records quantize.imatrix.{file,dataset,entries_count,
    chunks_count}; the tensors llama.cpp quantizes with an imatrix-aware type (q4_K / q5_0 / q6_K here) differ
    from the plain Q4_K_M, Q8_0 ones (which ignore an imatrix) do not; a legacy .dat carrying the same values
    gives byte-identical tensors."""
    _, im = made
    with_, without, legacy = tmp_path / "with.gguf", tmp_path / "without.gguf", tmp_path / "legacy.gguf"
    for out, extra in ((with_, ["--imatrix", str(im)]), (without, [])):
        r = _export(out, *extra)
        assert r.exit_code == 0, r.output
    f = _fields(with_)
    assert f["quantize.imatrix.file"].contents() == str(im)
    assert f["quantize.imatrix.dataset"].contents().endswith("c.txt")
    assert f["quantize.imatrix.entries_count"].contents() == 37
    assert f["quantize.imatrix.chunks_count"].contents() == 3
    assert not any(k.startswith("quantize.imatrix") for k in _fields(without))
    a = {x.name: x for x in GGUFReader(with_).tensors}
    b = {x.name: x for x in GGUFReader(without).tensors}
    covered = {n.rsplit(".", 1)[0] for n in (x.name for x in GGUFReader(im).tensors)}
    for n, x in a.items():
        same = np.array_equal(np.asarray(x.data), np.asarray(b[n].data))
        if n in covered and x.tensor_type.name not in ("Q8_0", "F32"):
            assert not same, n
        else:
            assert same, n
    dat = tmp_path / "legacy.dat"
    _legacy_dat(im, dat)
    r = _export(legacy, "--imatrix", str(dat))
    assert r.exit_code == 0, r.output
    c = {x.name: x for x in GGUFReader(legacy).tensors}
    assert all(np.array_equal(np.asarray(c[n].data), np.asarray(x.data)) for n, x in a.items())
    assert _fields(legacy)["quantize.imatrix.dataset"].contents() == "test"


def test_bad_inputs_exit_2(made, tmp_path):
    _, im = made
    cases = [
        (["calibrate", str(CKPT), "--calib", str(tmp_path / "nope.txt"), "--imatrix", str(tmp_path / "x.gguf")],
         "not found"),
        (["calibrate", str(CKPT), "--calib", str(made[0]), "--calib-tokens", "0", "--imatrix", str(tmp_path / "x.gguf")],
         "--calib-tokens"),
        (["calibrate", str(CKPT), "--calib", str(made[0]), "--imatrix", str(tmp_path / "x.dat")], ".gguf"),
    ]
    cases.append((["calibrate", str(CKPT), "--calib", str(made[0]), "--imatrix", str(im)], "--overwrite"))
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\x00\x01")
    cases.append((["export", str(CKPT), "--gguf", "--type", "q4_k_m", "--out", str(tmp_path / "g.gguf"),
                   "--imatrix", str(garbage)], "imatrix"))
    cases.append((["export", str(CKPT), "--gguf", "--type", "Q8_0", "--out", str(tmp_path / "h.gguf"),
                   "--imatrix", str(im)], "--imatrix"))
    # an imatrix of another model: same names, wrong row length
    from v4convert.export.gguf.imatrix import read_imatrix, write_imatrix
    other = read_imatrix(im)
    s, c = other.entries["blk.0.ffn_down.weight"]
    other.entries["blk.0.ffn_down.weight"] = (np.ones((1, 100), np.float32), c)
    wrong = tmp_path / "wrong.gguf"
    write_imatrix(wrong, other)
    cases.append((["export", str(CKPT), "--gguf", "--type", "q4_k_m", "--out", str(tmp_path / "w.gguf"),
                   "--imatrix", str(wrong)], "blk.0.ffn_down.weight"))
    for args, needle in cases:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        lines = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (args, r.output)
    assert not (tmp_path / "w.gguf").exists() and not (tmp_path / "g.gguf").exists()


def test_v4_imatrix_fits_llama_quantizer(tiny_ckpts, made, tmp_path):
    """V4 (deepseek4, hyper-connections, hash-routed layers): every entry we write matches a tensor of the
    exported model with the size llama.cpp checks, and its quantizer records the keys."""
    from v4convert.export.gguf.imatrix import read_imatrix
    ck = tiny_ckpts["v4-flash-tiny"]
    im, out = tmp_path / "v4.imatrix.gguf", tmp_path / "v4.gguf"
    r = CliRunner().invoke(main, ["calibrate", str(ck), "--calib", str(made[0]), "--calib-tokens", "128",
                                  "--calib-seq-len", "64", "--imatrix", str(im)])
    assert r.exit_code == 0, r.output
    entries = read_imatrix(im).entries
    assert any("_exps." in n for n in entries) and any(".attn_kv." in n for n in entries)
    r = CliRunner().invoke(main, ["export", str(ck), "--gguf", "--type", "q4_k_m", "--no-modelfile", "--out",
                                  str(out), "--imatrix", str(im)])
    assert r.exit_code == 0, r.output
    assert f"{len(entries)} entries, {len(entries)} match tensors of the model" in r.output
    assert _fields(out)["quantize.imatrix.entries_count"].contents() == len(entries)


def test_llama_cpp_tools_agree(made, tmp_path):
    """llama.cpp's own tools, built from the llama.cpp vendored in llama-cpp-python (``.ci/llama_tools.sh``,
    cached): ``llama-quantize --imatrix OURS`` writes the same tensors and quantize.imatrix.* values as our path
    through the library; an imatrix made by ``llama-imatrix`` covers every weight ours does, with the same
    shapes, and our export takes it."""
    import subprocess

    from v4convert.export.gguf.exporter import _imatrix_args
    from v4convert.export.gguf.imatrix import read_imatrix
    from v4convert.export.gguf.types import LlamaQuant, llama_quantize
    txt, im = made
    root = Path(__file__).resolve().parent.parent
    tools = subprocess.run(["bash", str(root / ".ci" / "llama_tools.sh")], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    bf16, ours, theirs = tmp_path / "bf16.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    r = CliRunner().invoke(main, ["export", str(CKPT), "--gguf", "--type", "BF16", "--no-modelfile", "--out", str(bf16)])
    assert r.exit_code == 0, r.output
    weights, kv = _imatrix_args(read_imatrix(im), im, bf16, None)
    llama_quantize(bf16, ours, LlamaQuant.Q4_K_M, [], imatrix=weights, kv=kv)
    p = subprocess.run([f"{tools}/llama-quantize", "--imatrix", str(im), str(bf16), str(theirs), "Q4_K_M"],
                       capture_output=True, text=True, errors="replace")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    fo, ft = _fields(ours), _fields(theirs)
    for k in ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
              "quantize.imatrix.chunks_count"):
        assert fo[k].contents() == ft[k].contents(), k
    a = {x.name: x for x in GGUFReader(ours).tensors}
    b = {x.name: x for x in GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)), n
    made_by_llama = tmp_path / "llama.imatrix.gguf"
    p = subprocess.run([f"{tools}/llama-imatrix", "-m", str(bf16), "-f", str(txt), "-c", "64", "--chunks", "3",
                        "-o", str(made_by_llama), "--no-ppl", "-t", "1"], capture_output=True, text=True, errors="replace")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    theirs_im, ours_im = read_imatrix(made_by_llama), read_imatrix(im)
    for n, (s, c) in ours_im.entries.items():
        assert n in theirs_im.entries, n
        assert theirs_im.entries[n][0].shape == s.shape and theirs_im.entries[n][1].shape == c.shape, n
    r = _export(tmp_path / "with-llama-imatrix.gguf", "--imatrix", str(made_by_llama))
    assert r.exit_code == 0, r.output
