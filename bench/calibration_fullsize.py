"""Full-size calibration in bounded memory (issue 12 "Scale"): the streamed statistics pass on one real-size
DeepSeek-V3 MoE layer (block 3 of ``synth --preset v3-671b``: 256 experts of 2048x7168, ~11.5 GB FP8).

    python bench/calibration_fullsize.py [--src /work/fullsize/v3-layer3] [--tokens 512 --seq-len 256]
                                         [--method rtn|gptq|...] [--codec nvfp4|mxfp4] [--threads 2]
                                         [--gptq-damp D --gptq-refine N --gptq-scales before|during|search
                                          --gptq-act-order --true-sequential --gptq-target original]

Synthesizes ``--layers 3`` into SRC if absent (needs ~12 GB free). That checkpoint holds block 3 only (no
embedding, no layers 0-2), so the pass gets its hidden states from a fixed random table (``embed=``; the
values only steer the routing, not what is measured) and starts at block 3. The pass runs in a child process
(``collect_stats`` with the ``quantize --calib`` propagation quantizer, NVFP4; statistics go to a sink that
keeps only counts, as a writer would stream them out) and the parent reads the child's peak RSS from
``os.wait4`` (``ru_maxrss``). Prints one JSON line: peak RSS, time for the layer and its parts (dequantize,
quantize, the rest), expert coverage, and the projection to the 61 layers of the 671B model (3 dense + 58
MoE layers; projected as 61 MoE layers, an upper bound since dense layers hold ~1/20 of the weights).

Measured 2026-12-03, ``python bench/calibration_fullsize.py --experts 12`` (RTN propagation, 2 cores shared
with other jobs: load average 9-13): peak RSS 5.39 GiB; non-expert phase 159 s (4 runs of the attention for
the statistics passes + quantize), 11.7 s per expert (dequantize ~1.7 s, quantize ~6 s of it), so ~53 min per
MoE layer and <= 54 h for the 61 layers of the 671B model. GPTQ (``--method gptq``) did not finish one
2048x7168 expert linear in 5 min on this machine: its cost, not the pass, dominated at full size.

Measured 2026-12-04 after the GPTQ speed-up (bench/gptq_speed.py; bench/calibration.md "calib-scale"),
``--experts 3 --ffn-only`` (only the FFN linears, as the default recipes), damp 1, 2 threads: plain ``gptq``
(NVFP4) peak RSS 4.54 GiB, non-expert phase 43 s, 11.8 s per calibrated expert linear, ~37.5 s per calibrated
expert; best MXFP4 recipe (``--method awq+gptq --codec mxfp4 --gptq-refine 3 --true-sequential --gptq-target
original``) peak RSS 5.69 GiB, non-expert phase 195 s, 25.5 s per calibrated expert linear, ~81 s per calibrated
expert. With every expert calibrated: 2.7 h / 5.8 h per MoE layer, ~7 / ~15 days for 61 layers on 2 cores. Without
``--ffn-only`` GPTQ also runs on attention (``o_proj``: K = 16384, 2 GiB per float64 [K, K]): RSS > 14 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path("/work/fullsize/v3-layer3")


class _Enough(Exception):
    """``--experts N``: stop after N experts (time per layer = the non-expert phase + 256 x one expert)."""


def child(a: argparse.Namespace) -> None:
    import resource

    import torch
    torch.set_num_threads(a.threads)
    from v4convert.calib.collect import collect_stats
    from v4convert.calib.data import calibration_windows
    from v4convert.calib.method import GPTQSettings, MethodSpec, quantize_weight
    from v4convert.checkpoint import Checkpoint
    from v4convert.families.roles import Group, Role
    FFN = (Group.DENSE_MLP, Group.EXPERT, Group.SHARED_EXPERT)
    from v4convert.formats.fp4_grid import FP4Codec

    with Checkpoint.open(a.src) as ck:
        infos = list(ck.infos())
        hidden = ck.config["hidden_size"]
    targets = [i.name for i in infos if i.role.is_linear and len(i.shape) == 2 and i.role is not Role.ROUTER]
    if a.ffn_only:      # the default recipes' FP4 linears: attention is kept (no stats, no quantize)
        targets = [n for i in infos for n in [i.name] if n in targets and i.role.group in FFN]
    expert = {i.name: i.expert for i in infos}
    data = calibration_windows(a.src, None, a.tokens, a.seq_len)       # bundled corpus, training split
    table = torch.randn(4096, hidden, generator=torch.Generator().manual_seed(0))   # [4096, D] float32

    def embed(ids: torch.Tensor) -> torch.Tensor:                       # ids [B, T] -> [B, T, D]
        return table[ids % table.shape[0]]

    spec = MethodSpec.parse(a.method)
    codec = FP4Codec(a.codec)
    gs = GPTQSettings(damp=a.gptq_damp, act_order=a.gptq_act_order, scales_during=a.gptq_scales == "during",
                      scales_search=a.gptq_scales == "search", refine=a.gptq_refine)
    t = {"quantize": 0.0, "dequantize": 0.0, "quantize_experts": 0.0, "expert_linears": 0, "calls": 0,
         "data_expert_s": 0.0, "data_expert_linears": 0}

    def quantize(name, w, stats, gamax):
        t0 = time.perf_counter()
        ok = spec.needs_data and stats is not None and stats.count >= (16 if expert[name] is not None else 1)
        h = stats.hessian() if ok else None
        c = stats.cross() if ok else None                   # --gptq-target original: Xo^T X / n
        q = quantize_weight(spec, codec, w.float(), h, global_amax=gamax if codec is FP4Codec.NVFP4 else None,
                            gptq=gs, name=name, c=c).dequantize()
        dt = time.perf_counter() - t0
        t["quantize"] += dt
        t["calls"] += 1
        if expert[name] is not None:
            t["quantize_experts"] += dt
            t["expert_linears"] += 1
            if h is not None:                               # calibrated (else: below 16 tokens, the base alone)
                t["data_expert_s"] += dt
                t["data_expert_linears"] += 1
        if expert[name] is None:
            t["nonexpert_done"] = time.perf_counter() - start
        elif name.endswith("down_proj.weight"):
            done.add(expert[name])
            if len(done) == 1:
                t["first_expert_at"] = time.perf_counter() - start
            if a.experts and len(done) >= a.experts:
                raise _Enough
        return q

    deq = Checkpoint.dequantize

    def timed_deq(self, name):
        t0 = time.perf_counter()
        try:
            return deq(self, name)
        finally:
            t["dequantize"] += time.perf_counter() - t0
    Checkpoint.dequantize = timed_deq
    seen: dict[str, int] = {}
    done: set[int] = set()
    start = time.perf_counter()
    try:
        col = collect_stats(a.src, data, targets, quantize=quantize, embed=embed, spill_dir=a.spill_dir or Path(a.src).parent,
                            sink=lambda n, s: seen.__setitem__(n, s.count), batch=4,
                            target_original=a.gptq_target == "original", sequential=a.true_sequential)
        cov = next(iter(col.coverage.values()))
        cover = [min(cov), sorted(cov)[len(cov) // 2], max(cov)]
    except _Enough:
        cover = None
    total = time.perf_counter() - start
    per_expert = (total - t["first_expert_at"]) / max(1, len(done) - 1) if len(done) > 1 else None
    n_exp = sum(1 for n in targets if n.endswith("down_proj.weight") and expert[n] is not None)
    layer = total if cover else t["first_expert_at"] + per_expert * (n_exp - 1)
    print(json.dumps({"elapsed_s": total, "experts_done": len(done), "of_experts": n_exp,
                      "nonexpert_phase_s": t.get("nonexpert_done"), "per_expert_s": per_expert,
                      "layer_s": layer, "dequantize_s": t["dequantize"], "quantize_s": t["quantize"],
                      "quantize_calls": t["calls"], "quantize_expert_linears": t["expert_linears"],
                      "quantize_per_expert_linear_s": t["quantize_experts"] / max(1, t["expert_linears"]),
                      "calibrated_expert_linears": t["data_expert_linears"],
                      "quantize_per_calibrated_expert_linear_s": t["data_expert_s"] / max(1, t["data_expert_linears"]),
                      "linears_with_stats": len(seen), "experts_min_median_max_tokens": cover,
                      "peak_rss_gib_child": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=SRC)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--method", default="rtn", help="propagation quantizer (gptq on 7168-wide experts is slow)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=0, help="stop after N experts (0: the whole layer)")
    p.add_argument("--spill-dir", type=Path, default=None, help="temporary spill files (default: SRC's parent)")
    p.add_argument("--ffn-only", action="store_true", help="calibrate/quantize only the FFN linears (experts, "
                   "shared experts, dense MLP), as the default recipes; attention is kept")
    p.add_argument("--codec", default="nvfp4", choices=["nvfp4", "mxfp4"], help="FP4 grid of the quantizer")
    p.add_argument("--gptq-damp", type=float, default=1.0, help="quantize's default (calib.DEFAULT_GPTQ_DAMP)")
    p.add_argument("--gptq-refine", type=int, default=0)
    p.add_argument("--gptq-scales", default="before", choices=["before", "during", "search"])
    p.add_argument("--gptq-act-order", action="store_true")
    p.add_argument("--true-sequential", action="store_true")
    p.add_argument("--gptq-target", default="self", choices=["self", "original"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if not (a.src / "config.json").is_file():
        free = shutil.disk_usage(a.src.parent if a.src.parent.exists() else "/").free
        print(f"synthesizing v3-671b --layers 3 into {a.src} ({free / 2**30:.0f} GiB free)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "v4convert", "synth", "--preset", "v3-671b", "--layers", "3",
                        "--out", str(a.src)], check=True)
    args = [sys.executable, __file__, "--child", "--src", str(a.src), "--tokens", str(a.tokens),
            "--seq-len", str(a.seq_len), "--method", a.method, "--threads", str(a.threads),
            "--experts", str(a.experts), *(["--spill-dir", str(a.spill_dir)] if a.spill_dir else []), "--codec", a.codec, "--gptq-damp", str(a.gptq_damp),
            "--gptq-refine", str(a.gptq_refine), "--gptq-scales", a.gptq_scales, "--gptq-target", a.gptq_target]
    args += ["--ffn-only"] * a.ffn_only + ["--gptq-act-order"] * a.gptq_act_order + ["--true-sequential"] * a.true_sequential
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=dict(os.environ, V4CONVERT_THREADS=str(a.threads)))
    out = proc.stdout.read().decode()
    _, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"child failed ({status}): {out[-2000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    r.update(peak_rss_gib=ru.ru_maxrss * 1024 / 2**30, wall_s=time.perf_counter() - t0, method=a.method,
             codec=a.codec, flags=" ".join(args[args.index("--codec"):]), threads=a.threads, projection_61_layers_h=61 * r["layer_s"] / 3600)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
