"""MXFP4 -> NVFP4 re-pack speed, native C kernel vs the torch codec, on one fused V4 expert gate+up.

    nice -n 10 python bench/native_repack_speed.py [--n 2048 --k 7168 --parts 2] [--threads 1 2] [--reps 3]
                                                   [--e-lo 116 --e-hi 124]

Input: ``parts`` partners of ``[n, k]`` MXFP4 (random codes with a random magnitude cap per 16-block, E8M0
bytes uniform in ``[e-lo, e-hi]``; V4-Flash's experts span about 9 exponents). Torch = what
``quant/workers.py`` did before: ``torch.cat`` of the partners, then ``mxfp4_to_nvfp4``. Prints GB/s of MXFP4
input (codes + scale bytes / best of ``reps`` seconds) and checks bytes and report are identical.

Measured 2026-12-03 on the 2-CPU dev box under load (load average ~6), default arguments (15.6 MB input):
torch 0.004-0.005 GB/s (3.4-4.4 s); native 0.52 GB/s (30 ms) with 1 thread, 0.63 GB/s (25 ms) with 2;
``--e-lo 0 --e-hi 252 --threads 2`` (93 % of blocks inexact): native 0.28 GB/s, torch 0.001-0.004 GB/s.
"""
from __future__ import annotations

import argparse
import time

import torch

from v4convert.formats.mxfp4 import mxfp4_from_deepseek_native, mxfp4_to_nvfp4
from v4convert.formats.nvfp4 import NVFP4Convention
from v4convert.kernels.native.repack import mxfp4_to_nvfp4_native


def best(fn, reps: int):
    t, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def make_part(n: int, k: int, lo: int, hi: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    cap = torch.randint(1, 8, (n, k // 16, 1), generator=g, dtype=torch.uint8)
    codes = ((codes.view(n, -1, 16) & 8) | torch.minimum(codes.view(n, -1, 16) & 7, cap)).view(n, k)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scale = torch.randint(lo, hi + 1, (n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return packed, scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--e-lo", type=int, default=116)
    ap.add_argument("--e-hi", type=int, default=124)
    ap.add_argument("--torch-reps", type=int, default=1)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    parts = [make_part(a.n, a.k, a.e_lo, a.e_hi, g) for _ in range(a.parts)]
    gb = sum(p.numel() + s.numel() for p, s in parts) / 1e9
    conv = NVFP4Convention.COMPRESSED_TENSORS
    for th in a.threads:
        torch.set_num_threads(th)

        def run_torch():
            packed = torch.cat([p for p, _ in parts])
            scale = torch.cat([s for _, s in parts])
            return mxfp4_to_nvfp4(mxfp4_from_deepseek_native(packed, scale, "t"), conv, "t")

        tt, (ref, rrep) = best(run_torch, a.torch_reps)
        tn, (outs, rep) = best(lambda: mxfp4_to_nvfp4_native(parts, conv, threads=th, name="t"), a.reps)
        same = (rep == rrep and torch.equal(torch.cat([o.packed for o in outs]), ref.packed)
                and torch.equal(torch.cat([o.block_scale.view(torch.uint8) for o in outs]),
                                ref.block_scale.view(torch.uint8)))
        print(f"{a.parts} x [{a.n}, {a.k}] E8M0 {a.e_lo}..{a.e_hi}, threads {th}: torch {gb / tt:7.3f} GB/s "
              f"({tt:.2f} s), native {gb / tn:7.2f} GB/s ({tn * 1e3:.1f} ms), {tt / tn:6.0f}x, "
              f"inexact {rep.inexact_blocks}/{rep.blocks}, identical {same}", flush=True)


if __name__ == "__main__":
    main()
