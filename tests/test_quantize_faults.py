"""quantize under faults: SIGKILL + resume (byte-identical), refusals, disk full, truncated shard, NaN, bad rules."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from v4convert.checkpoint import Checkpoint, CheckpointError
from v4convert.quant.engine import OutputExistsError, execute, partial_dir
from v4convert.outputs import write_marker
from v4convert.quant.plan import Options, QuantizeError, make_plan
from v4convert.quant.recipes import Recipe, RecipeError, RecipeName, RuleSet, preset
from v4convert.families.roles import Group
from v4convert.quant.unit_io import DiskFullError, SourceReadError

from .test_quantize import run_quantize

SHARD = "300000"                    # bytes: the API runs below use shard_bytes=300_000


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "v4convert.cli", "quantize", *args]


def same_tree(a: Path, b: Path) -> None:
    fa = sorted(p.name for p in a.iterdir())
    assert fa == sorted(p.name for p in b.iterdir())
    for n in fa:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope="module")
def reference(tiny_ckpts, tmp_path_factory) -> Path:
    """Uninterrupted CLI run of v3-tiny (the byte-identity reference)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run(cli(str(tiny_ckpts["v3-tiny"]), "--fp4", "--out", str(out), "--workers", "1",
                       "--shard-size", SHARD), check=True, capture_output=True)
    return out


def test_sigkill_and_resume_byte_identical(tiny_ckpts, tmp_path, reference):
    out = tmp_path / "out"
    args = cli(str(tiny_ckpts["v3-tiny"]), "--fp4", "--out", str(out), "--workers", "1", "--shard-size", SHARD,
               "--sync-every", "1")       # journal after every unit
    done = partial_dir(out) / ".journal" / "done"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n = 0
    while proc.poll() is None:
        n = len(done.read_text().splitlines()) if done.is_file() else 0
        if n >= 45:         # of 107 units: several shards complete
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed"
    assert not out.exists() and partial_dir(out).is_dir()
    # also truncate one output shard: resume must notice and redo that shard's units
    shard = sorted(partial_dir(out).glob("*.safetensors"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming:" in r.stderr
    assert not partial_dir(out).exists()
    same_tree(out, reference)


def test_output_exists_and_foreign_partial(tiny_ckpts, tmp_path, reference):
    src = tiny_ckpts["v3-tiny"]
    out = tmp_path / "out"
    shutil.copytree(reference, out)              # a previous output of ours: only with --overwrite
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_quantize(src, out)
    r = subprocess.run(cli(str(src), "--fp4", "--out", str(out), "--workers", "1"), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--overwrite" in r.stderr
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, RuleSet(preset("nvfp4-experts")), Options(shard_bytes=300_000))
    execute(plan, out, overwrite=True, log=lambda m: None)
    same_tree(out, reference)
    # a .partial left by our run with other options is not silently reused
    other = tmp_path / "o2"
    partial_dir(other).mkdir()
    write_marker(partial_dir(other), "quantize", "writing", fingerprint="0" * 64)
    (partial_dir(other) / ".journal").mkdir()
    (partial_dir(other) / ".journal" / "plan.sha256").write_text("0" * 64)
    with pytest.raises(OutputExistsError, match="different plan"):
        execute(plan, other, log=lambda m: None)


def test_disk_full_midway_then_resume(tiny_ckpts, tmp_path, reference, monkeypatch):
    import v4convert.quant.unit_io as w          # the module whose Writer calls os.pwrite
    src = tiny_ckpts["v3-tiny"]
    out = tmp_path / "out"
    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, off):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(w.os, "pwrite", full)
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, RuleSet(preset("nvfp4-experts")), Options(shard_bytes=300_000))
    with pytest.raises(DiskFullError, match="disk full"):
        execute(plan, out, sync_bytes=1, log=lambda m: None)
    assert not out.exists() and partial_dir(out).is_dir()
    monkeypatch.setattr(w.os, "pwrite", real)
    execute(plan, out, log=lambda m: None)
    same_tree(out, reference)


def test_not_enough_space_refused_before_work(tiny_ckpts, tmp_path, monkeypatch):
    import v4convert.quant.engine as eng
    monkeypatch.setattr(eng.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DiskFullError, match="only 0.00 GB is free"):
        run_quantize(tiny_ckpts["v3-tiny"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_shard_truncated_mid_run(tiny_ckpts, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpts["v3-tiny"], src)
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, RuleSet(preset("nvfp4-experts")), Options(shard_bytes=300_000))
    shard = sorted(src.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 5000)        # after planning: as if it shrank during the run
    with pytest.raises(SourceReadError, match=shard.name + ".*short read"):
        execute(plan, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_nan_tensor_named(tiny_ckpts, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpts["v3-tiny"], src)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    with Checkpoint.open(src) as ck:
        e = ck.tensor_info(name).parts["weight"]
    with open(e.path, "r+b") as f:
        f.seek(e.start + 1234)
        f.write(b"\x7f")                                    # E4M3 NaN
    with pytest.raises(QuantizeError, match=f"{name}.*NaN"):
        run_quantize(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    r = subprocess.run(cli(str(src), "--fp4", "--out", str(tmp_path / "o2"), "--workers", "1", "--overwrite"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and name in r.stderr and "Traceback" not in r.stderr


def test_unknown_tensor_and_bad_rules(tiny_ckpts, tmp_path):
    src = tiny_ckpts["v3-tiny"]
    # a recipe without a rule for every group cannot exist
    with pytest.raises(RecipeError, match="no rule for group"):
        Recipe(RecipeName.NVFP4_EXPERTS, "partial", {Group.EXPERT: preset("nvfp4-experts").groups[Group.EXPERT]})
    with pytest.raises(QuantizeError, match="input_layernorm.*not a linear"):
        run_quantize(src, tmp_path / "a", overrides=["input_layernorm*=nvfp4"])
    with pytest.raises(QuantizeError, match="matched no tensor"):
        run_quantize(src, tmp_path / "b", keep=["layers.99.*"])
    with pytest.raises(QuantizeError, match="DeepSeek container holds MXFP4 only"):
        from v4convert.formats.containers import Container
        run_quantize(src, tmp_path / "c", container=Container.DEEPSEEK)
    with pytest.raises(RecipeError, match="unknown codec"):
        RuleSet(preset("nvfp4-experts"), overrides=["attn*=int3"])
    # a tensor name no family table knows: the reader refuses, naming it
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    from safetensors.torch import save_file
    import json
    save_file({"model.layers.1.mlp.mystery.weight": torch.zeros(4, 4)}, str(bad / "extra.safetensors"),
              metadata={"format": "pt"})
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.1.mlp.mystery.weight"] = "extra.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    r = subprocess.run(cli(str(bad), "--fp4", "--out", str(tmp_path / "d")), capture_output=True, text=True)
    assert r.returncode == 2 and "model.layers.1.mlp.mystery.weight" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(CheckpointError):
        Checkpoint.open(bad)
