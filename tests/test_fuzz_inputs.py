"""Property-based fuzzing of every parser of user files (issue #13), fixed seed, < 1 min in total.

Each suite mutates a valid file (wrong JSON types anywhere, shifted/duplicated offsets, byte flips,
truncation, nesting bombs, huge counts) and requires: our reader either raises its one-line user error
or accepts -- and whatever it accepts, an independent reader accepts identically (the safetensors
library's ``deserialize`` for headers, gguf-py's ``GGUFReader`` for GGUF). Any other exception is a
bug of ours and fails the test with its traceback.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import deserialize
from safetensors.torch import save
from v4convert.formats.gguf_reader import GGUFFormatError, read_gguf_header
from v4convert.formats.gguf_writer import Metadata, TensorSpec, write_gguf
from v4convert.formats.safetensors_io import FormatError, read_header

from v4convert.checkpoint import Checkpoint, CheckpointError, MissingTensorsError
from v4convert.errors import UserError
from v4convert.inspect import build_report

# Fixed profile: derandomized (same cases every run), no example database, no deadline (2 busy cores).
N_HEADER, N_INDEX, N_CONFIG, N_GGUF = 300, 120, 200, 250
FUZZ = {"derandomize": True, "database": None, "deadline": None, "print_blob": False,
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.data_too_large]}

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), c, max_size=3)),
                          max_leaves=6)


# ------------------------------------------------------------------------------ safetensors header
def _base_file() -> bytes:
    g = torch.Generator().manual_seed(0)
    t = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randint(0, 255, (7,), dtype=torch.uint8),
         "c.scale": torch.randn(2, 2, generator=g).to(torch.bfloat16),
         "d": torch.zeros(0, 4), "e": torch.zeros(4, dtype=torch.uint8).view(torch.float8_e4m3fn)}
    return save(t, metadata={"format": "pt"})


BASE = _base_file()


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: object, data: bytes, pad: bool = True) -> bytes:
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


@st.composite
def mutated_safetensors(draw) -> bytes:
    header, data = _split(BASE)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["field", "entry", "shift", "share", "meta", "bytes", "length", "truncate",
                                 "extend", "deep", "dup-key", "root"]))
    if kind == "field":                       # wrong JSON type / value in one field
        n = draw(st.sampled_from(names))
        f = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[n][f] = draw(st.one_of(json_value, st.lists(st.integers(-5, 2**66), max_size=3),
                                      st.sampled_from(["F32", "BF16", "U8", "F8_E8M0", "I64", "X"])))
    elif kind == "entry":
        header[draw(st.sampled_from(names))] = draw(json_value)
    elif kind == "shift":                     # offsets moved into a neighbour, a gap or past the end
        n = draw(st.sampled_from(names))
        d = draw(st.integers(-12, 12))
        b, e = header[n]["data_offsets"]
        header[n]["data_offsets"] = draw(st.sampled_from([[b + d, e + d], [b, e + d], [b + d, e]]))
    elif kind == "share":                     # two tensors on one byte range (same size)
        header["c.scale"]["data_offsets"] = list(header["b"]["data_offsets"][:1]) + \
            [header["b"]["data_offsets"][0] + 8]
        header["c.scale"]["shape"] = [4]
    elif kind == "meta":
        header["__metadata__"] = draw(json_value)
    elif kind == "deep":
        depth = draw(st.sampled_from([4, 50, 5000, 200_000]))
        header["a.weight"]["x"] = "DEEP"
        raw = _join(header, data)
        h = raw[8:].split(data)[0] if data else raw[8:]
        h = h.replace(b'"DEEP"', b"[" * depth + b"]" * depth)
        return struct.pack("<Q", len(h)) + h + data
    elif kind == "dup-key":
        raw = _join(header, data, pad=False)
        h = raw[8:len(raw) - len(data)]
        h = h[:-1] + b', "b": ' + json.dumps(header["b"]).encode() + b"}"
        return struct.pack("<Q", len(h)) + h + data
    elif kind == "root":
        return _join(draw(json_value), data)
    raw = bytearray(_join(header, data))
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
    elif kind == "length":
        raw[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, len(raw) + 16), st.integers(0, 2**64 - 1))))
    elif kind == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif kind == "extend":
        raw += bytes(draw(st.integers(1, 9)))
    return bytes(raw)


@settings(max_examples=N_HEADER, **FUZZ)
@given(raw=mutated_safetensors())
def test_safetensors_header_fuzz(raw, tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw)
    try:
        entries, _ = read_header(p)
    except FormatError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)
        return
    theirs = dict(deserialize(raw))             # the reference reader must accept what we accept
    assert set(theirs) == set(entries)
    for n, e in entries.items():
        assert theirs[n]["dtype"] == e.dtype and tuple(theirs[n]["shape"]) == e.shape
        assert bytes(theirs[n]["data"]) == raw[e.start:e.end]


def test_safetensors_base_accepted_and_overlap_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(BASE)
    assert set(read_header(p)[0]) == {"a.weight", "b", "c.scale", "d", "e"}
    header, data = _split(BASE)     # two tensors sharing a byte range: safetensors refuses, so do we
    header["e"]["data_offsets"] = header["b"]["data_offsets"][:1] + [header["b"]["data_offsets"][0] + 4]
    p.write_bytes(_join(header, data))
    with pytest.raises(FormatError, match="tensor (e|b): .*overlaps"):
        read_header(p)


# ------------------------------------------------------------------------------ index
@pytest.fixture(scope="module")
def ckpt_dir(tiny_ckpts, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzzck") / "c"
    shutil.copytree(tiny_ckpts["v3-tiny"], d)
    (d / "elsewhere.txt").write_text("x")
    return d


@st.composite
def mutated_index(draw, original: dict) -> bytes:
    idx = json.loads(json.dumps(original))
    wm = idx["weight_map"]
    names = sorted(wm)
    kind = draw(st.sampled_from(["value", "wm", "root", "drop", "add", "swap", "bytes", "meta"]))
    if kind == "value":
        wm[draw(st.sampled_from(names))] = draw(st.one_of(json_value, st.sampled_from(
            ["../c/model-00001-of-000002.safetensors", "/etc/passwd", "sub/x", "", ".", "..", "config.json",
             "elsewhere.txt", "model-00002-of-000002.safetensors", "nope.safetensors", "a\x00b"])))
    elif kind == "wm":
        idx["weight_map"] = draw(json_value)
    elif kind == "root":
        idx = draw(json_value)
    elif kind == "drop":
        del wm[draw(st.sampled_from(names))]
    elif kind == "add":
        wm[draw(st.text(max_size=12))] = draw(st.sampled_from(sorted(set(wm.values()))))
    elif kind == "swap":
        a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        wm[a], wm[b] = wm[b], wm[a]
    elif kind == "meta":
        idx["metadata"] = draw(json_value)
    raw = bytearray(json.dumps(idx).encode())
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 3))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def test_index_fuzz(ckpt_dir):
    index = ckpt_dir / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    truth = original["weight_map"]

    @settings(max_examples=N_INDEX, **FUZZ)
    @given(raw=mutated_index(original))
    def check(raw):
        ran[0] += 1
        index.write_bytes(raw)
        try:
            with Checkpoint.open(ckpt_dir) as ck:
                stored = {e.name: e.path.name for i in ck.infos() for e in i.parts.values()}
                # what is read, is read from the shard that truly holds it ...
                assert all(truth[n] == s for n, s in stored.items())
                if stored != truth:     # ... and a consumer refuses an index that lists too little
                    with pytest.raises(MissingTensorsError):
                        ck.check_complete()
        except CheckpointError as e:
            assert "\n" not in str(e)
    ran = [0]
    try:
        check()
    finally:
        index.write_text(json.dumps(original))
    assert ran[0] >= N_INDEX        # the cases quoted in the report really ran


# ------------------------------------------------------------------------------ config.json
@st.composite
def mutated_config(draw, cfg: dict) -> bytes:
    cfg = json.loads(json.dumps(cfg))
    keys = sorted(cfg)
    kind = draw(st.sampled_from(["value", "int", "drop", "root", "bytes", "qc"]))
    if kind == "value":
        cfg[draw(st.sampled_from(keys))] = draw(json_value)
    elif kind == "int":
        cfg[draw(st.sampled_from(keys))] = draw(st.sampled_from([0, -1, 10**9, 2**63, 3.5, "4", True, None]))
    elif kind == "drop":
        del cfg[draw(st.sampled_from(keys))]
    elif kind == "root":
        return json.dumps(draw(json_value)).encode()
    elif kind == "qc":
        cfg["quantization_config"] = draw(json_value)
    raw = bytearray(json.dumps(cfg).encode())
    if kind == "bytes":
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@pytest.mark.parametrize("preset", ["v3-tiny", "v4-flash-tiny"])
def test_config_fuzz(tiny_ckpts, tmp_path, preset):
    cfg = json.loads((tiny_ckpts[preset] / "config.json").read_text())
    p = tmp_path / "config.json"

    @settings(max_examples=N_CONFIG // 2, **FUZZ)
    @given(raw=mutated_config(cfg))
    def check(raw):
        ran[0] += 1
        p.write_bytes(raw)
        try:
            r = build_report(p)          # the whole published inventory, sized from the config
        except UserError as e:
            assert "\n" not in str(e)
            return
        assert r["logical_tensors"] > 0
    ran = [0]
    check()
    assert ran[0] >= N_CONFIG // 2


# ------------------------------------------------------------------------------ GGUF
def _base_gguf(tmp: Path) -> bytes:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as VT
    md = Metadata()
    md.str("general.architecture", "deepseek2")
    md.u32("deepseek2.block_count", 2)
    md.arr("tokenizer.ggml.tokens", ["a", "bc", "d"], VT.STRING)
    md.arr("x.ints", [1, 2, 3], VT.INT32)
    specs = [TensorSpec("t.f32", (3, 5), Q.F32, lambda: np.arange(15, dtype=np.float32)),
             TensorSpec("t.q8", (2, 32), Q.Q8_0, lambda: np.zeros(2 * 34, dtype=np.uint8)),
             TensorSpec("t.i32", (4,), Q.I32, lambda: np.arange(4, dtype=np.int32))]
    p = write_gguf(tmp / "base.gguf", md, specs)[0]
    return p.read_bytes()


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> bytes:
    return _base_gguf(tmp_path_factory.mktemp("gguf"))


@st.composite
def mutated_gguf(draw, base: bytes) -> bytes:
    raw = bytearray(base)
    kind = draw(st.sampled_from(["bytes", "header", "count", "truncate", "u64"]))
    head = min(len(raw), 400)               # the header region, where the structure is
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, head - 1))] = draw(st.integers(0, 255))
    elif kind == "header":
        off = draw(st.sampled_from([4, 8, 16]))                 # version, tensor count, KV count
        raw[off:off + (4 if off == 4 else 8)] = struct.pack("<I" if off == 4 else "<Q",
                                                            draw(st.integers(0, 2**32 - 1 if off == 4 else 2**64 - 1)))
    elif kind == "count":
        off = draw(st.integers(24, head - 8))
        raw[off:off + 8] = struct.pack("<Q", draw(st.sampled_from([2**63, 2**40, 10**6, 65, 0])))
    elif kind == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)):]
    else:
        off = draw(st.integers(24, head - 8))
        raw[off:off + 8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(raw)


def test_gguf_reader_fuzz(base_gguf, tmp_path):
    from gguf import GGUFReader
    p = tmp_path / "m.gguf"
    p.write_bytes(base_gguf)
    assert [t.name for t in read_gguf_header(p).tensors] == ["t.f32", "t.q8", "t.i32"]

    @settings(max_examples=N_GGUF, **FUZZ)
    @given(raw=mutated_gguf(base_gguf))
    def check(raw):
        ran[0] += 1
        p.write_bytes(raw)
        try:
            h = read_gguf_header(p)
        except GGUFFormatError as e:
            assert str(e).startswith(str(p)) and "\n" not in str(e)
            return
        r = GGUFReader(p)                 # the reference reader accepts what we accept, identically
        assert [(t.name, int(t.tensor_type), t.data_offset) for t in r.tensors] == \
               [(t.name, int(t.qtype), t.start) for t in h.tensors]
    ran = [0]
    check()
    assert ran[0] >= N_GGUF
