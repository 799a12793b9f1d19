"""The bundled trained tiny models are published-layout checkpoints that learned something.

Checks: every tensor of the family inventory, stored as published (V3: F8_E4M3 + F32 ``weight_scale_inv``;
V4: F8_E4M3 + F8_E8M0 ``.scale``, MXFP4 experts I8 + E8M0 per 32); >= 8 routed experts; package data
<= 30 MB; the corpus manifest describes this interpreter's stdlib files (sha256) when the Python version is the
one it was made with; the recorded held-out perplexity beats the unigram baseline, and the released checkpoint
run by our runtime scores the held-out text the way the training report says.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

from v4convert.checkpoint import Checkpoint
from v4convert.demo import bundled_model
from v4convert.families.layout import Arch, inventory
from v4convert.families.roles import Family, Storage

DATA = Path(__file__).resolve().parents[1] / "v4convert" / "data"


def _header_dtypes(path: Path) -> dict[str, str]:
    """name -> safetensors dtype string of every tensor in a checkpoint directory (read from the headers)."""
    out: dict[str, str] = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = json.loads(fh.read(n))
        out.update({k: v["dtype"] for k, v in head.items() if k != "__metadata__"})
    return out


@pytest.mark.parametrize("fam,family", [("v3", Family.V3), ("v4", Family.V4)])
def test_published_layout(fam, family):
    path = bundled_model(fam)
    dtypes = _header_dtypes(path)
    with Checkpoint.open(path) as ck:
        assert ck.family is family
        arch = Arch.from_config(ck.config)
        assert arch.n_experts >= 8 and arch.top_k >= 2
        assert set(ck.names()) == {s.name for s in inventory(arch)}
        stored = {}
        for name in ck.names():
            info = ck.tensor_info(name)
            assert info.storage is info.published, name
            stored[info.storage] = stored.get(info.storage, 0) + 1
            stem = name[: -len(".weight")]
            if info.storage is Storage.FP8_BLOCK:
                assert dtypes[name] == "F8_E4M3"
                if family is Family.V3:
                    assert dtypes[stem + ".weight_scale_inv"] == "F32", name
                else:
                    assert dtypes[stem + ".scale"] == "F8_E8M0", name
            elif info.storage is Storage.MXFP4:
                assert dtypes[name] == "I8" and dtypes[stem + ".scale"] == "F8_E8M0", name
        if family is Family.V4:
            assert stored[Storage.MXFP4] == arch.n_experts * 3 * arch.n_layers
            assert ck.raw("layers.1.ffn.experts.3.w2.weight")["scale"].shape[-1] * 32 == arch.moe_inter
        else:
            assert stored[Storage.FP8_BLOCK] > 0 and Storage.MXFP4 not in stored


def test_package_data_size():
    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, total


def test_corpus_manifest():
    man = json.loads((DATA / "corpus" / "MANIFEST.json").read_text())
    held = (DATA / "corpus" / "heldout.txt").read_text(encoding="utf-8")
    assert hashlib.sha256(held.encode()).hexdigest() == man["heldout_txt_sha256"]
    files = man["files"]
    assert [f["path"] for f in files] == sorted(f["path"] for f in files)
    assert {f["split"] for f in files} == {"train", "heldout"}
    if man["python"] == sys.version.split()[0]:       # same interpreter: the listed files are these bytes
        root = Path(man["stdlib"])
        for f in files[:: max(1, len(files) // 12)]:
            assert hashlib.sha256((root / f["path"]).read_bytes()).hexdigest() == f["sha256"], f["path"]
        first_held = next(f for f in files if f["split"] == "heldout")
        assert held.startswith((root / first_held["path"]).read_text(encoding="utf-8")[:2000])


@pytest.mark.parametrize("fam", ["v3", "v4"])
def test_trained_better_than_unigram(fam):
    rep = json.loads((bundled_model(fam) / "train_report.json").read_text())
    assert rep["ppl_heldout_runtime"] < 0.6 * rep["ppl_unigram"], rep
    assert rep["runtime_vs_transformers_rel_max_err"] < 1e-4
    assert math.isclose(rep["ppl_heldout_runtime"], rep["ppl_heldout_published_hf"], rel_tol=1e-3)
