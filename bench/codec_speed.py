"""Throughput of the FP8-block -> NVFP4 (RTN) re-quantization hot path on one full-size expert.

Prints GB/s of FP8 input bytes (weight bytes only) for the fused path
(:func:`v4convert.formats.fp8_block.fp8_block_to_nvfp4`) and, for comparison, the naive
composition ``nvfp4_quantize(fp8_block_dequantize(t))``, and the native C kernel
(:func:`v4convert.kernels.native.fp8_block_to_nvfp4_native`, ``--threads`` pthreads); checks they
are byte-identical.

    python bench/codec_speed.py --threads 2 [--rows 7168 --cols 2048 --repeats 5]

Wall time is the best of ``--repeats``; CPU time (all threads) is reported beside it because
the build machine's cores are shared and wall time there depends on other load.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from v4convert.formats.fp8_block import FP8BlockTensor, FP8ScaleFormat, fp8_block_dequantize, fp8_block_to_nvfp4
from v4convert.kernels.native import fp8_block_to_nvfp4_native, native_status
from v4convert.formats.nvfp4 import Backend, NVFP4Convention, nvfp4_quantize


def synthetic_expert(rows: int, cols: int, seed: int = 0) -> FP8BlockTensor:
    """An E4M3 weight with F32 128-block scales shaped like a DeepSeek V3 expert's."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 120.0).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand((rows + 127) // 128, (cols + 127) // 128, generator=g) * 1e-4 + 1e-5
    return FP8BlockTensor(weight=w, scale=s, fmt=FP8ScaleFormat.F32)


def timed(fn, repeats: int) -> tuple[float, float]:
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=7168)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = synthetic_expert(args.rows, args.cols)
    gb = t.weight.numel() / 1e9  # one byte per FP8 element
    conv = NVFP4Convention.COMPRESSED_TENSORS
    print(f"expert {args.rows}x{args.cols} FP8 ({gb * 1e3:.1f} MB), threads={args.threads}, "
          f"cpus={os.cpu_count()}, load avg={os.getloadavg()[0]:.2f}")

    w0 = time.perf_counter()
    fast = fp8_block_to_nvfp4(t, convention=conv, backend=Backend.COMPILED)  # includes compile
    print(f"first call (torch.compile warm-up): {time.perf_counter() - w0:.1f} s")
    wall, cpu = timed(lambda: fp8_block_to_nvfp4(t, convention=conv, backend=Backend.COMPILED), args.repeats)
    print(f"fused compiled : {wall * 1e3:7.1f} ms wall  {cpu * 1e3:7.1f} ms cpu  -> {gb / wall:.3f} GB/s of FP8 input")
    ok, why = native_status()
    if ok:
        nat = fp8_block_to_nvfp4_native(t, convention=conv, threads=args.threads)
        same_nat = torch.equal(nat.packed, fast.packed) and torch.equal(
            nat.block_scale.view(torch.uint8), fast.block_scale.view(torch.uint8))
        wall_n, cpu_n = timed(lambda: fp8_block_to_nvfp4_native(t, convention=conv, threads=args.threads), args.repeats)
        print(f"native C       : {wall_n * 1e3:7.1f} ms wall  {cpu_n * 1e3:7.1f} ms cpu  -> {gb / wall_n:.3f} GB/s "
              f"({gb / cpu_n:.3f} GB/s per CPU-second); byte-identical to fused: {same_nat}")
    else:
        print(f"native C       : unavailable ({why})")
    wall_e, cpu_e = timed(lambda: fp8_block_to_nvfp4(t, convention=conv, backend=Backend.EAGER), 2)
    print(f"fused eager    : {wall_e * 1e3:7.1f} ms wall  {cpu_e * 1e3:7.1f} ms cpu  -> {gb / wall_e:.3f} GB/s")
    if not args.skip_naive:
        ref_wall, ref_cpu = timed(lambda: nvfp4_quantize(fp8_block_dequantize(t), convention=conv), 1)
        ref = nvfp4_quantize(fp8_block_dequantize(t), convention=conv)
        same = torch.equal(ref.packed, fast.packed) and torch.equal(
            ref.block_scale.view(torch.uint8), fast.block_scale.view(torch.uint8))
        print(f"naive dequant+quantize: {ref_wall * 1e3:7.1f} ms wall -> {gb / ref_wall:.3f} GB/s; "
              f"byte-identical to fused: {same}")


if __name__ == "__main__":
    main()
