"""FP8-block -> GGUF encode speed, native C kernel vs the torch path, on one expert-sized tensor.

    python bench/native_gguf_speed.py [--n 7168 --k 2048] [--threads 2] [--reps 3] [--scale f32|e8m0]
    python bench/native_gguf_speed.py --ckpt DIR [--tensors 4]   # same, on a checkpoint's first FP8 tensors

Torch path = what ``export/gguf/exporter.py::_encode`` did before: ``checkpoint._decode_fp8_block`` (float32
``[N, K]``) then ``gguf_quants.quantize``. Prints GB/s of FP8 input (N*K bytes / best of ``reps`` seconds)
per GGML type, and checks the two outputs are byte-identical; for MXFP4 also the two-pass native kernel (block
maxima pass, numpy exponents, encode pass) that the fused one replaced.
"""
from __future__ import annotations

import argparse
import time

import torch
from gguf import GGMLQuantizationType as Q

from v4convert.checkpoint import _decode_fp8_block
from v4convert.formats import fp8, gguf_quants
from v4convert.kernels.native.gguf import fp8_block_to_gguf_native, fp8_block_to_mxfp4_two_pass


def best(fn, reps: int) -> tuple[float, torch.Tensor]:
    t, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def bench_ckpt(a: argparse.Namespace) -> None:
    from v4convert.checkpoint import Checkpoint
    from v4convert.families.roles import Storage
    with Checkpoint.open(a.ckpt) as ck:
        infos = [i for i in ck.infos() if i.storage is Storage.FP8_BLOCK][: a.tensors]
        for info in infos:
            parts = ck.raw(info.name)
            w, sc = parts["weight"], parts["scale"]
            gb = w.numel() / 1e9
            for q in (Q.MXFP4, Q.Q8_0, Q.F16):
                tt, ref = best(lambda: gguf_quants.quantize(ck.dequantize(info.name), q, threads=a.threads), 1)
                tn, got = best(lambda: fp8_block_to_gguf_native(w, sc, q, threads=a.threads), a.reps)
                print(f"{info.name} {tuple(info.shape)} {q.name:5}: torch {gb / tt:5.2f} GB/s, native {gb / tn:5.2f} "
                      f"GB/s, {tt / tn:5.1f}x, identical {torch.equal(ref.reshape(got.shape), got)}", flush=True)
            ck.release(info.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=7168)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scale", choices=["f32", "e8m0"], default="f32")
    ap.add_argument("--ckpt", help="time real FP8-block tensors of this checkpoint instead (Checkpoint.dequantize)")
    ap.add_argument("--tensors", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.ckpt:
        return bench_ckpt(a)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (a.n, a.k), generator=g, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x7E
    bn, bk = -(-a.n // 128), -(-a.k // 128)
    if a.scale == "f32":
        sc = (10.0 ** (torch.rand(bn, bk, generator=g) * 4 - 6)).float()
        s32 = sc
    else:
        sc = torch.randint(110, 125, (bn, bk), generator=g, dtype=torch.int32).to(torch.uint8)
        s32 = fp8.e8m0_to_float32(sc)
    gb = a.n * a.k / 1e9
    print(f"[{a.n}, {a.k}] FP8, {a.scale} scales, {a.threads} threads, best of {a.reps}")
    print(f"{'type':6} {'torch s':>8} {'GB/s':>6} {'native s':>9} {'GB/s':>6} {'speedup':>8}  identical")
    for q in (Q.MXFP4, Q.Q8_0, Q.F16, Q.BF16, Q.F32):
        tt, ref = best(lambda: gguf_quants.quantize(_decode_fp8_block(raw, s32, (a.n, a.k)), q, threads=a.threads),
                       a.reps)
        tn, got = best(lambda: fp8_block_to_gguf_native(raw, sc, q, threads=a.threads), a.reps)
        same = torch.equal(ref.reshape(a.n, -1), got)
        print(f"{q.name:6} {tt:8.3f} {gb / tt:6.2f} {tn:9.4f} {gb / tn:6.2f} {tt / tn:7.1f}x  {same}")
        if q == Q.MXFP4:       # the fused one-pass kernel above vs the two-pass one it replaced (same bytes)
            t2, got2 = best(lambda: fp8_block_to_mxfp4_two_pass(raw, sc, threads=a.threads), a.reps)
            print(f"{'  two-pass MXFP4 kernel':23} {t2:9.4f} {gb / t2:6.2f} {'':8}  {torch.equal(got2, got)}")


if __name__ == "__main__":
    main()
