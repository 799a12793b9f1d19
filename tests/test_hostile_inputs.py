"""One regression test per class of issue #13 (hostile inputs) and items 2-3 of issue #20.

Every case runs the CLI and requires exactly one ``error: ...`` line, exit 2, no traceback, and nothing
written under the output's final name.
"""
from __future__ import annotations

import itertools
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from v4convert.checkpoint import Checkpoint
from v4convert.cli import main

from .test_gguf_export import synth_config


def one_line_error(args: list[str], *words: str) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [x for x in r.output.splitlines() if x.strip()]
    errs = [x for x in lines if x.startswith("error: ")]
    assert len(errs) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in errs[0], errs[0]
    return errs[0]


def ok(args: list[str]):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def first_shard(root: Path) -> Path:
    return min(root.glob("model-*.safetensors"))


def rewrite_header(shard: Path, mutate) -> None:
    """Apply ``mutate(header dict)`` to a shard's JSON header, keeping the data block as is."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    shard.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def quantize(src: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(src), "--fp4", "--out", str(out), "--workers", "1", "--shard-size", "300KB", *extra]


# ------------------------------------------------------------------ wrong JSON types anywhere
def test_wrong_json_types_are_one_line(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    cases = {
        "offsets as strings": lambda h: h[next(k for k in h if k != "__metadata__")].update(
            data_offsets=["0", "10"]),
        "offsets as floats": lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=[0.0, 8.0]),
        "dtype as a list": lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype=["F32"]),
    }
    for i, (what, mutate) in enumerate(cases.items()):
        root = copy(src, tmp_path / f"h{i}")
        rewrite_header(first_shard(root), mutate)
        one_line_error(["inspect", str(root)], first_shard(root).name)
    root = copy(src, tmp_path / "wm")
    idx = json.loads((root / "model.safetensors.index.json").read_text())
    idx["weight_map"] = list(idx["weight_map"].items())
    (root / "model.safetensors.index.json").write_text(json.dumps(idx))
    one_line_error(["inspect", str(root)], "weight_map")
    for i, (key, value, words) in enumerate([(None, [1, 2], "not a JSON object"),
                                             ("quantization_config", "fp8", "quantization_config"),
                                             ("num_hidden_layers", "3", "num_hidden_layers"),
                                             ("vocab_size", None, "vocab_size")]):
        root = copy(src, tmp_path / f"c{i}")
        cfg = json.loads((root / "config.json").read_text())
        if key is None:
            cfg = value
        elif value is None:
            del cfg[key]
        else:
            cfg[key] = value
        (root / "config.json").write_text(json.dumps(cfg))
        one_line_error(["inspect", str(root)], "config.json", words)
        one_line_error(quantize(root, tmp_path / f"q{i}"), words)
        assert not (tmp_path / f"q{i}").exists()


def test_config_of_random_bytes_names_the_file(tiny_ckpts, tmp_path):
    root = copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    (root / "config.json").write_bytes(bytes(range(256)) * 4)
    one_line_error(["inspect", str(root)], str(root / "config.json"), "UTF-8")
    one_line_error(["export", str(root), "--gguf", "--out", str(tmp_path / "m.gguf")], "config.json")


def test_control_characters_in_index_names_stay_one_line(tiny_ckpts, tmp_path):
    """A tensor name with a newline in the index (found by the index fuzz suite under hypothesis 6.170) is shown
    escaped, so the error is still one line."""
    root = copy(tiny_ckpts["v3-tiny"], tmp_path / "c")
    idx = root / "model.safetensors.index.json"
    body = json.loads(idx.read_text())
    shard = next(iter(body["weight_map"].values()))
    body["weight_map"]["evil\nname"] = shard
    idx.write_text(json.dumps(body))
    one_line_error(["inspect", str(root)], "'evil\\nname'", "not in the shard")


# ------------------------------------------------------------------ headers the format forbids
def test_shared_and_overlapping_byte_ranges_refused(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    for i, how in enumerate(["share", "overlap"]):
        root = copy(src, tmp_path / f"c{i}")
        shard = first_shard(root)

        def mutate(h, how=how):
            names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
            a, b = next((x, y) for x, y in itertools.pairwise(names)
                        if h[x]["dtype"] == h[y]["dtype"] and h[x]["shape"] == h[y]["shape"])
            if how == "share":          # b reads a's bytes: quantize would convert the wrong tensor
                h[b]["data_offsets"] = list(h[a]["data_offsets"])
            else:                       # b starts 4 bytes early, inside a
                h[b]["data_offsets"] = [v - 4 for v in h[b]["data_offsets"]]
        rewrite_header(shard, mutate)
        one_line_error(quantize(root, tmp_path / f"q{i}"), shard.name, "overlaps")
        assert not (tmp_path / f"q{i}").exists() and not (tmp_path / f"q{i}.partial").exists()


# ------------------------------------------------------------------ pathological sizes, bounded memory
HOSTILE_SCRIPT = r"""
import json, struct, sys, resource
from pathlib import Path
from v4convert.cli import main
from click.testing import CliRunner
d = Path(sys.argv[1])
codes = []
for args in ([["inspect", str(d / "layers.json")], ["inspect", str(d / "deep")], ["inspect", str(d / "huge")],
              ["inspect", str(d / "count.json")]]):
    codes.append(CliRunner().invoke(main, args).exit_code)
print(json.dumps({"codes": codes, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_pathological_sizes_bounded_memory(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "layers.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    (tmp_path / "count.json").write_text(json.dumps({**cfg, "n_routed_experts": 4096, "num_hidden_layers": 1024}))
    deep = copy(src, tmp_path / "deep")                  # a header nested 200,000 deep
    h = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    first_shard(deep).write_bytes(struct.pack("<Q", len(h)) + h)
    huge = copy(src, tmp_path / "huge")                  # a shape declaring 2^80 elements in 8 bytes
    rewrite_header(first_shard(huge), lambda hd: hd[next(k for k in hd if k != "__metadata__")].update(
        shape=[2**40, 2**40], dtype="U8"))
    r = subprocess.run([sys.executable, "-c", HOSTILE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["codes"] == [2, 2, 2, 2]
    assert res["maxrss_kb"] < 1 << 20, f"peak RSS {res['maxrss_kb'] / 1024:.0f} MB on tiny hostile inputs"
    one_line_error(["inspect", str(tmp_path / "layers.json")], "num_hidden_layers", "1000000000")
    one_line_error(["inspect", str(deep)], "nested deeper")


# ------------------------------------------------------------------ paths that leave the checkpoint
def test_symlinks_leaving_the_checkpoint_refused_hf_cache_allowed(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    # single-file checkpoint whose model.safetensors links outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(_all(src), str(outside / "model.safetensors"), metadata={"format": "pt"})
    root = tmp_path / "c"
    root.mkdir()
    shutil.copy(src / "config.json", root / "config.json")
    (root / "model.safetensors").symlink_to(outside / "model.safetensors")
    one_line_error(["inspect", str(root)], "outside the checkpoint")
    # config.json and side files linking out are refused too
    (root / "model.safetensors").unlink()
    shutil.copy(outside / "model.safetensors", root / "model.safetensors")
    (outside / "secret").write_text("not yours")
    (root / "notes.txt").symlink_to(outside / "secret")
    one_line_error(quantize(root, tmp_path / "q"), "notes.txt", "outside the checkpoint")
    assert not (tmp_path / "q").exists()
    # the Hugging Face cache layout: snapshots/REV/* -> ../../blobs/HASH
    repo = tmp_path / "hub" / "models--deepseek-ai--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        blob = repo / "blobs" / f"h{abs(hash(p.name))}"
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(Path("../../blobs") / blob.name)
    with Checkpoint.open(snap) as ck:
        assert len(ck.names()) > 0
    ok(["inspect", str(snap)])


# ------------------------------------------------------------------ NaN in a tensor we keep as is
def test_nan_in_kept_fp8_tensor_refused_unless_allowed(tiny_ckpts, tmp_path):
    src = copy(tiny_ckpts["v3-tiny"], tmp_path / "src")
    name = "model.layers.0.self_attn.o_proj.weight"      # kept as FP8 by the default recipe
    with Checkpoint.open(src) as ck:
        e = ck.tensor_info(name).parts["weight"]
    with open(e.path, "r+b") as f:
        f.seek(e.start + 17)
        f.write(b"\x7f")                                  # E4M3 NaN
    one_line_error(quantize(src, tmp_path / "q"), name, "NaN", "--allow-nonfinite")
    assert not (tmp_path / "q").exists()
    ok(quantize(src, tmp_path / "q2", "--allow-nonfinite"))
    one_line_error(["export", str(src), "--gguf", "--out", str(tmp_path / "m.gguf")], name, "NaN")
    assert not list(tmp_path.glob("m*.gguf"))


# ------------------------------------------------------------------ issue #20 item 2: missing tensors
def test_missing_tensors_refused_unless_allowed(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    root = tmp_path / "c"
    root.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, root / f)
    tensors = {k: t for k, t in _all(src).items() if ".layers.2." not in k}
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    with Checkpoint.open(root) as ck:
        n = len(ck.missing())
    msg = one_line_error(quantize(root, tmp_path / "q"), f"{n} tensors", "model.layers.2.", "--allow-missing")
    assert msg.count("model.layers.2.") == 3            # the first few, not all of them
    one_line_error(["export", str(root), "--gguf", "--out", str(tmp_path / "m.gguf")], f"{n} tensors")
    one_line_error(["export", str(root), "--mlx", "--out", str(tmp_path / "mlx")], f"{n} tensors")
    one_line_error(["export", str(root), "--sharded", "--tp", "1", "--out", str(tmp_path / "sh")], f"{n} tensors")
    assert not (tmp_path / "mlx").exists() and not (tmp_path / "sh").exists()
    ok(["export", str(root), "--sharded", "--tp", "1", "--out", str(tmp_path / "sh"), "--allow-missing"])
    assert json.loads((tmp_path / "sh" / ".v4convert-output.json").read_text())["allowed_missing"]["count"] == n
    one_line_error(["run", str(root), "--prompt", "hi"], f"{n} tensors")          # the runtime refuses too
    one_line_error(["verify", str(src), str(root)], f"{n} tensors")
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob("*.gguf"))
    ok(quantize(root, tmp_path / "q", "--allow-missing"))
    meta = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["metadata"]["v4convert"]
    assert meta["allowed_missing"]["count"] == n
    # a wholly absent MTP block (transformers drops it) is not an incomplete download
    no_mtp = tmp_path / "nomtp"
    no_mtp.mkdir()
    shutil.copy(src / "config.json", no_mtp / "config.json")
    save_file({k: t for k, t in _all(src).items() if ".layers.3." not in k},
              str(no_mtp / "model.safetensors"), metadata={"format": "pt"})
    with Checkpoint.open(no_mtp) as ck:
        assert ck.missing() and all(s.mtp for s in ck.missing())
        assert ck.check_complete() == {"mtp_absent": True}


def _all(src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 -- safe_open is not a dict
    return out


# ------------------------------------------------------------------ issue #20 item 3: one-line errors
def test_item3_one_line_errors(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    if not torch.cuda.is_available():
        one_line_error(quantize(src, tmp_path / "q", "--device", "cuda"), "--device cuda")
    one_line_error(["run", str(src), "--prompt", "x", "--device", "cuda:7"], "--device cuda:7")
    one_line_error(["verify", str(src), str(src), "--device", "nonsense"], "--device")
    r = CliRunner().invoke(main, quantize(src, tmp_path / "q", "--shard-size", "abc"))
    assert r.exit_code == 2 and "cannot parse size 'abc'" in r.output and "invalid literal" not in r.output
    assert not (tmp_path / "q").exists()
    # verify against a model with a smaller vocabulary
    cfg = json.loads((src / "config.json").read_text())
    small = synth_config({**cfg, "vocab_size": 600}, tmp_path / "small")
    one_line_error(["verify", str(src), str(small), "--tokens", "130", "--ctx", "64", "--gen-prompts", "1",
                    "--gen-tokens", "2"], "vocabulary", "600", "611")


# ------------------------------------------------------------------ missing or degenerate config keys
@pytest.mark.parametrize("preset,key,value,words", [
    ("v4-flash-tiny", "sliding_window", None, "sliding_window"),
    ("v3-tiny", "rope_scaling.original_max_position_embeddings", None, "original_max_position_embeddings"),
    ("v3-tiny", "n_group", 0, "n_group 0"),
    ("v3-tiny", "rope_scaling", "yarn", "rope_scaling must be an object"),
    ("v3-tiny", "rms_norm_eps", "1e-6", "rms_norm_eps must be a finite number"),
    ("v4-flash-tiny", "hc_eps", None, "hc_eps"),
])
def test_degenerate_config_keys_one_line(tiny_ckpts, tmp_path, preset, key, value, words):
    root = copy(tiny_ckpts[preset], tmp_path / "c")
    cfg = json.loads((root / "config.json").read_text())
    tgt, k = (cfg[key.split(".")[0]], key.split(".")[1]) if "." in key else (cfg, key)
    if value is None:
        del tgt[k]
    else:
        tgt[k] = value
    (root / "config.json").write_text(json.dumps(cfg))
    one_line_error(["export", str(root), "--gguf", "--out", str(tmp_path / "m.gguf")], "config.json", words)
    one_line_error(["run", str(root), "--prompt", "hi", "--max-new-tokens", "1"], "config.json", words)
    assert not list(tmp_path.glob("*.gguf"))
