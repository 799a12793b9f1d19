"""Sharded layout + distributed runtime: real torchrun processes (gloo, CPU) against the single-process runtime.

Parity: tiny V3, V3.2 and V4 at 1, 2 and 4 ranks (TP, EP, TP x EP; from sharded layouts and from unsharded
checkpoints sliced per rank) give the single-process logits (relative max error <= 1e-5) for a prefill and
16 decode steps. All cases of one world size share one launch (2 cores are shared: few process starts).
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from v4convert.runtime import load

from v4convert.cli import main as cli_main
from v4convert.export import sharded
from v4convert.families.sharding import ShardPlanError, World, rank_parts
from v4convert.sharded_layout import MANIFEST, Manifest, RankView, ShardedLayoutError
from v4convert.synth import synth

from .dist_worker import run_steps

TOKENS = [1, 57, 300, 12, 610, 99, 3, 45] + [7 + 37 * i for i in range(16)]     # prompt 8 + 16 decode steps
REL_TOL = 1e-5
TIMEOUT_S = 60          # per-collective timeout in the launched ranks
ROOT = Path(__file__).resolve().parents[1]

# (source preset, tp, ep, sharded layout?) per world size
CASES = {
    2: [("v3-tiny", 1, 2, True), ("v3-tp-tiny", 2, 2, True), ("v32-tiny", 2, 1, False),
        ("v32-tp-tiny", 2, 1, True), ("v4-flash-tiny", 1, 2, True), ("v4-flash-tp-tiny", 2, 2, True),
        ("v3-tp-tiny-nvfp4", 2, 1, True)],          # our NVFP4 artifact (compressed-tensors), kept packed
    4: [("v3-tiny", 4, 1, False), ("v3-tp-tiny", 2, 4, True), ("v32-tiny", 1, 4, True), ("v4-flash-tiny", 2, 4, False),
        ("v4-flash-tp-tiny", 2, 4, True)],
}


def launch(n: int, args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", V4CONVERT_DIST_TIMEOUT=str(TIMEOUT_S),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    return subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    src = dict(tiny_ckpts)
    for p in ("v3-tp-tiny", "v32-tp-tiny", "v4-flash-tp-tiny"):
        src[p] = synth(p, root / p).out
    src["v3-tp-tiny-nvfp4"] = root / "v3-tp-tiny-nvfp4"
    cli_main(["quantize", str(src["v3-tp-tiny"]), "--fp4", "--out", str(src["v3-tp-tiny-nvfp4"])],
             standalone_mode=False)
    refs = {}
    for p in {c[0] for cs in CASES.values() for c in cs}:
        refs[p] = run_steps(load(src[p], max_seq_len=64), TOKENS)
    paths = {}
    for cs in CASES.values():
        for p, tp, ep, is_layout in cs:
            if is_layout and (p, tp, ep) not in paths:
                out = root / f"{p}-tp{tp}-ep{ep}"
                sharded.export(src[p], out, sharded.Options(tp=tp, ep=ep, deepseek_mp=(tp == ep)))
                paths[(p, tp, ep)] = out
    return root, src, refs, paths


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("n", sorted(CASES))
def test_ranks_match_single_process(setup, n, tmp_path):
    """Also (2 ranks): a corrupt part only rank 1 reads fails the load on both ranks, within the launch."""
    _, src, refs, paths = setup
    specs = [f"{paths[(p, tp, ep)]}:-:-" if lay else f"{src[p]}:{tp}:{ep}" for p, tp, ep, lay in CASES[n]]
    if n == 2:
        specs.append(f"{_corrupt(paths[('v3-tiny', 1, 2)], tmp_path, 'sha')}:-:-:error")
    t0 = time.perf_counter()
    r = launch(n, [str(ROOT / "tests" / "dist_worker.py"), str(tmp_path), ",".join(map(str, TOKENS)), *specs], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    if n == 2:
        bad = len(CASES[n])
        errs = [(tmp_path / f"case{bad}-rank{k}.err").read_text() for k in range(2)]
        assert "ShardedLayoutError" in errs[1] and "fails its SHA-256 check" in errs[1], errs
        assert errs[0].startswith("DistributedError: rank 1 failed:") and "SHA-256" in errs[0], errs
        assert time.perf_counter() - t0 < 300 - TIMEOUT_S       # nobody sat in a collective until its timeout
    for i, (p, tp, ep, lay) in enumerate(CASES[n]):
        got = torch.load(tmp_path / f"case{i}.pt")
        assert got.shape == refs[p].shape
        err = _rel(got, refs[p])
        assert err <= REL_TOL, f"{p} tp={tp} ep={ep} {'layout' if lay else 'sliced'}: rel max err {err:.2e}"


def test_one_rank_layout_equals_single_process(setup, tmp_path):
    _, src, refs, _ = setup
    out = tmp_path / "one"
    sharded.export(src["v32-tiny"], out, sharded.Options())
    torch.testing.assert_close(run_steps(load(out, max_seq_len=64), TOKENS), refs["v32-tiny"], rtol=0, atol=0)
    # packed: the layout's stored parts feed the packed kernels as the checkpoint's do
    from v4convert.runtime.common import packed_linears
    m = load(out, max_seq_len=64, packed=True)
    assert packed_linears(m) > 0
    torch.testing.assert_close(run_steps(m, TOKENS), run_steps(load(src["v32-tiny"], max_seq_len=64, packed=True),
                                                               TOKENS), rtol=0, atol=0)


def test_layout_holds_each_rank_only_its_part(setup):
    paths = setup[3]
    m = Manifest.read(paths[("v3-tp-tiny", 2, 4)])
    assert (m.world.tp, m.world.ep, m.world.size) == (2, 4, 4)
    views = [RankView(m, r) for r in range(4)]
    experts = [sorted({i.expert for i in v.infos() if i.expert is not None}) for v in views]
    assert experts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # shared experts only on TP group 0; heads split in two; rank files are 4 KiB-aligned and hold nothing else
    assert [any(i.role.name.startswith("SHARED") for i in v.infos()) for v in views] == [True, True, False, False]
    q_b = "model.layers.1.self_attn.q_b_proj.weight"
    assert [v.tensor_info(q_b).shape[0] for v in views] == [256, 256, 256, 256]
    assert [v.part(q_b).start for v in views] == [0, 256, 0, 256]
    for t in m.tensors:
        for part in t["parts"].values():
            assert part["offset"] % 4096 == 0
    for v in views:
        v.close()


def test_deepseek_mp_files(setup):
    _, _, _, paths = setup
    out = paths[("v3-tp-tiny", 2, 2)]
    from safetensors import safe_open
    for r in range(2):
        with safe_open(str(out / f"model{r}-mp2.safetensors"), "pt") as f:
            keys = set(f.keys())
            assert f.get_slice("layers.1.attn.wq_b.weight").get_shape() == [256, 96]
            assert f.get_slice("embed.weight").get_shape() == [306, 160]
        assert {f"layers.1.ffn.experts.{e}.w2.scale" for e in range(4 * r, 4 * r + 4)} <= keys
        assert not any(k.startswith(f"layers.1.ffn.experts.{4 * (1 - r)}.") for k in keys)
        assert not any(k.startswith("layers.3.") for k in keys)          # MTP dropped, as DeepSeek's convert.py


def test_split_that_cuts_a_block_is_refused(tiny_ckpts, tmp_path, capsys):
    with pytest.raises(ShardPlanError, match="q_b_proj.*cuts a 128-element"):
        sharded.export(tiny_ckpts["v3-tiny"], tmp_path / "x", sharded.Options(tp=2))
    with pytest.raises(SystemExit) as e:
        cli_main(["export", str(tiny_ckpts["v3-tiny"]), "--sharded", "--tp", "2", "--out", str(tmp_path / "y")],
                 standalone_mode=False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_world_rules():
    with pytest.raises(ShardPlanError):
        World(tp=2, ep=3)
    w = World(tp=2, ep=4)
    assert w.size == 4 and w.expert_tp == 1 and w.tp_groups() == [[0, 1], [2, 3]]


def _corrupt(layout: Path, tmp: Path, how: str) -> Path:
    import shutil
    bad = tmp / f"bad-{how}"
    shutil.copytree(layout, bad)
    man = json.loads((bad / MANIFEST).read_text())
    f1 = bad / man["files"][1]["file"]
    if how == "version":
        man["version"] = 99
        (bad / MANIFEST).write_text(json.dumps(man))
    elif how == "missing":
        f1.unlink()
    elif how == "truncated":
        with open(f1, "r+b") as f:
            f.truncate(f1.stat().st_size - 100)
    elif how == "sha":
        t = next(t for t in man["tensors"] if t["rank"] == 1 and t["name"].endswith("q_a_proj.weight"))
        off = t["parts"]["weight"]["offset"]
        with open(f1, "r+b") as f:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x40]))
    return bad


@pytest.mark.parametrize("how,msg", [("version", "layout version 99"), ("missing", "rank 1 data file is missing"),
                                     ("truncated", "truncated or replaced"), ("sha", "fails its SHA-256 check")])
def test_bad_layout_is_a_user_error(setup, tmp_path, how, msg):
    _, _, _, paths = setup
    bad = _corrupt(paths[("v3-tiny", 1, 2)], tmp_path, how)
    with pytest.raises(ShardedLayoutError, match=msg):
        m = Manifest.read(bad)
        v = RankView(m, 1)
        for n in v.names():
            v.raw(n)


def test_world_size_mismatch_is_an_error(setup, capsys):
    _, _, _, paths = setup
    with pytest.raises(ValueError, match="needs 2 ranks .* this run has 1"):
        load(paths[("v3-tiny", 1, 2)], max_seq_len=16)
    with pytest.raises(SystemExit) as e:       # the CLI: one line, exit 2 (each rank of a launch does the same)
        cli_main(["run", str(paths[("v3-tiny", 1, 2)]), "--prompt", "hi"], standalone_mode=False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs 2 ranks" in err[0] and err[0].startswith("error: ")


def test_torchrun_cli_run_matches_single_process(setup, tmp_path, capsys):
    _, src, _, paths = setup
    args = ["--prompt", "def main", "--max-new-tokens", "6"]
    r = launch(2, ["-m", "v4convert", "run", str(paths[("v4-flash-tp-tiny", 2, 2)]), *args], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cli_main(["run", str(src["v4-flash-tp-tiny"]), *args], standalone_mode=False)
    single = capsys.readouterr().out
    assert r.stdout.split("\nprefill:")[0] == single.split("\nprefill:")[0]   # the text, before the timing line
    assert r.stdout.count("prefill:") == 1                  # rank 0 prints, the others stay quiet


def test_rank_parts_cover_every_tensor_once(tiny_ckpts):
    """Per tensor, the parts over the ranks of one TP/EP group tile the logical shape exactly."""
    from v4convert.checkpoint import Checkpoint
    w = World(tp=4, ep=2)
    with Checkpoint.open(tiny_ckpts["v3-tiny"]) as ck:
        for info in ck.infos():
            parts = rank_parts(info.role, info.expert, info.shape, ck.arch, w)
            assert parts, info.name
            split = [p for p in parts.values() if p.dim is not None]
            if split:
                covered = sorted({(p.start, p.stop) for p in split})
                assert covered[0][0] == 0 and covered[-1][1] == info.shape[split[0].dim]
                assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
