"""Seconds per linear of the calibrated FP4 methods at DeepSeek-V3 expert size (issue 12 "Scale").

    python bench/gptq_speed.py [--shapes 2048x7168,7168x2048] [--rows 2048] [--tokens 1024] [--threads 2]
                               [--only LABEL,...] [--codecs nvfp4,mxfp4] [--profile]

One random weight ``W [N, K]`` (N x K = out x in: gate/up 2048x7168, down 7168x2048) and a realistic Hessian
``H = X^T X / n`` from ``--tokens`` rows ``X`` (per-channel log-normal magnitudes, a few outlier channels,
a shared low-rank component, so H is correlated and rank-deficient below K like a real expert's) are quantized
with the recipes of bench/calibration.md (``calib.method.quantize_weight``, the same call as ``quantize
--calib``). ``--rows R`` keeps only the first R output rows (rows are independent in every step except the
Hessian factorisation, so time scales ~linearly in R for the per-row parts); ``--profile`` prints the top of
cProfile's cumulative table per row. Prints one line per (shape, codec, recipe): seconds (wall, best of 1) and
CPU seconds (all threads; the build machine's cores are shared).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from v4convert.calib.method import GPTQSettings, MethodSpec, quantize_weight
from v4convert.formats.fp4_grid import FP4Codec

# label -> (method, settings, with C = Xo^T X / n for --gptq-target original)
RECIPES: dict[str, tuple[str, GPTQSettings, bool]] = {
    "gptq": ("gptq", GPTQSettings(), False),
    "gptq damp=1": ("gptq", GPTQSettings(damp=1.0), False),
    "awq+gptq damp=1": ("awq+gptq", GPTQSettings(damp=1.0), False),
    "gptq+four-over-six damp=1": ("gptq+four-over-six", GPTQSettings(damp=1.0), False),
    "gptq act-order damp=1": ("gptq", GPTQSettings(damp=1.0, act_order=True), False),
    "gptq scales-search damp=1": ("gptq", GPTQSettings(damp=1.0, scales_search=True), False),
    "gptq refine=3 damp=1": ("gptq", GPTQSettings(damp=1.0, refine=3), False),
    # the best recipes (bench/calibration.md, calib-mx section), target=original = with C
    "mxfp4 best: awq+gptq refine=3 target=original damp=1": ("awq+gptq", GPTQSettings(damp=1.0, refine=3), True),
    "nvfp4 best: gptq+4/6 scales-search refine=3 target=original damp=1":
        ("gptq+four-over-six", GPTQSettings(damp=1.0, scales_search=True, refine=3), True),
}


def hessians(k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, C) float32 ``[K, K]``: ``X^T X / n`` of ``n`` correlated rows and ``Xo^T X / n`` with ``Xo = X + noise``
    (the original stream beside a slightly drifted quantized one)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(k, generator=g) * 0.5)                     # per-channel RMS, log-normal
    mag[torch.randperm(k, generator=g)[: max(1, k // 256)]] *= 20.0        # outlier channels
    low = torch.randn(n, 16, generator=g) @ torch.randn(16, k, generator=g) * 0.3   # shared low-rank part
    x = (torch.randn(n, k, generator=g) + low) * mag                       # [n, K]
    xo = x + 0.05 * torch.randn(n, k, generator=g) * mag
    return x.T @ x / n, xo.T @ x / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2048x7168,7168x2048")
    p.add_argument("--rows", type=int, default=0, help="keep only the first R output rows (0: all)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--codecs", default="nvfp4,mxfp4")
    p.add_argument("--only", default="", help="comma-separated recipe labels (default: all for the codec)")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        h, c = hessians(k, a.tokens)
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
        if a.rows:
            w = w[: a.rows].contiguous()
        for codec in (FP4Codec(v) for v in a.codecs.split(",")):
            for label, (method, gs, with_c) in RECIPES.items():
                if only and label not in only:
                    continue
                if label.startswith(("mxfp4 best", "nvfp4 best")) and not label.startswith(codec.value):
                    continue
                spec = MethodSpec.parse(method)
                if codec is FP4Codec.MXFP4 and "four-over-six" in method:
                    continue
                prof = cProfile.Profile() if a.profile else None
                w0, c0 = time.perf_counter(), time.process_time()
                if prof:
                    prof.enable()
                quantize_weight(spec, codec, w, h, gptq=gs, c=c if with_c else None, name=label)
                if prof:
                    prof.disable()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                print(f"{w.shape[0]}x{k} {codec.value:5s} {label:70s} {wall:8.2f} s  (cpu {cpu:7.2f} s)", flush=True)
                if prof:
                    pstats.Stats(prof).sort_stats("cumulative").print_stats(14)


if __name__ == "__main__":
    main()
