"""Packed-weight linear ``y = x @ W.T`` on DeepSeek shapes: our path vs torch matmul of the dequantized weight.

    python bench/kernel_speed.py                  # CPU: the tiled PyTorch path; CUDA: the Triton kernels
    python bench/kernel_speed.py --m 1,16 --shapes v3 --reps 3

Shapes ``[N, K]`` are derived from the published configs in ``v4convert/data/ref`` (one table below):
V3 routed expert gate/up ``[2048, 7168]``, down ``[7168, 2048]``, ``q_b_proj [24576, 1536]``; V4-Flash/Pro
expert gate/up and down, ``wq_b``, ``wo_b``. Expert matrices run as NVFP4 and MXFP4, attention matrices as
FP8-block (what we keep) and NVFP4. Weights are random valid codes and scales (speed does not depend on values).

Columns: ``ours`` time, GB/s of *packed* weight bytes read, TFLOP/s (2MNK); ``torch`` = matmul of the
dequantized weight held dense (bf16 on CUDA; float32 and bf16 on CPU), its GB/s of dense bytes; ``x`` =
torch time / ours. On CUDA also % of the HBM bandwidth given by ``--hbm-gbs`` (H100 SXM 3350, H200 4800).
"""
from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch

from v4convert.kernels.packed import Codec, PackedWeight, packed_linear

REF = {"v3": "deepseek-v3-671b.config.json", "v4-flash": "deepseek-v4-flash.config.json",
       "v4-pro": "deepseek-v4-pro.config.json"}
EXPERT_CODECS = (Codec.NVFP4, Codec.MXFP4)
ATTN_CODECS = (Codec.FP8_BLOCK, Codec.NVFP4)


def shapes(model: str) -> list[tuple[str, int, int, tuple[Codec, ...]]]:
    """(label, N, K, codecs) for one published config."""
    c = json.loads(resources.files("v4convert").joinpath("data/ref/" + REF[model]).read_text())
    h, inter, ql, heads = c["hidden_size"], c["moe_intermediate_size"], c["q_lora_rank"], c["num_attention_heads"]
    out = [(f"{model} expert gate/up", inter, h, EXPERT_CODECS), (f"{model} expert down", h, inter, EXPERT_CODECS)]
    if model == "v3":
        out.append(("v3 q_b_proj", heads * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]), ql, ATTN_CODECS))
    else:
        out.append((f"{model} wq_b", heads * c["head_dim"], ql, ATTN_CODECS))
        out.append((f"{model} wo_b", h, c["o_groups"] * c["o_lora_rank"], ATTN_CODECS))
    return out


def random_packed(codec: Codec, n: int, k: int, device: torch.device, gen: torch.Generator) -> PackedWeight:
    """Random codes; block scales around 2**-8 (finite, no NaN bytes)."""
    if codec is Codec.FP8_BLOCK:
        data = torch.randint(0, 126, (n, k), dtype=torch.uint8, generator=gen)
        sc = torch.rand(-(-n // 128), -(-k // 128), generator=gen) * 1e-3
        pw = PackedWeight(codec, data, sc, torch.ones(n), (n, k), "bench")
    else:
        data = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        if codec is Codec.NVFP4:
            sb = torch.randint(0x28, 0x48, (n, k // 16), dtype=torch.uint8, generator=gen)
            pw = PackedWeight(codec, data, sb, torch.full((n,), 2.0 ** -6), (n, k), "bench")
        else:
            sb = torch.randint(116, 122, (n, k // 32), dtype=torch.uint8, generator=gen)
            pw = PackedWeight(codec, data, sb, torch.ones(n), (n, k), "bench")
    return pw.to(device)


def timeit(fn, reps: int, device: torch.device) -> float:
    """Median seconds of ``reps`` calls after one warm-up (CUDA: events around each call)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4,16,64,256", help="rows of x (comma list)")
    ap.add_argument("--shapes", default="v3,v4-flash,v4-pro", help="configs: v3, v4-flash, v4-pro")
    ap.add_argument("--reps", type=int, default=0, help="timed calls per point (default 1 CPU, 20 CUDA)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="HBM bandwidth for the %% column (CUDA)")
    ap.add_argument("--max-elems", type=float, default=60e6, help="CPU: skip matrices larger than this")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    reps = args.reps or (20 if cuda else 1)
    ms = [int(v) for v in args.m.split(",")]
    gen = torch.Generator().manual_seed(0)
    base_dtypes = (torch.bfloat16,) if cuda else (torch.float32, torch.bfloat16)
    act = torch.bfloat16 if cuda else torch.float32
    what = "Triton kernels" if cuda else f"tiled PyTorch path ({torch.get_num_threads()} threads)"
    print(f"# device {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; ours = {what}; x {act}; "
          f"median of {reps}")
    head = f"{'shape':24} {'N x K':>13} {'codec':9} {'M':>4} | {'ours ms':>9} {'GB/s':>7} {'TFLOP/s':>7}"
    head += f" {'%HBM':>5}" if cuda else ""
    for dt in base_dtypes:
        tag = str(dt).split(".")[1]
        head += f" | {tag + ' ms':>9} {'GB/s':>7} {'x':>5}"
    print(head)
    print("-" * len(head))
    for model in args.shapes.split(","):
        for label, n, k, codecs in shapes(model):
            if not cuda and n * k > args.max_elems:
                print(f"{label:24} {f'{n}x{k}':>13} skipped on CPU (> --max-elems)")
                continue
            for codec in codecs:
                pw = random_packed(codec, n, k, dev, gen)
                # dense copies built 4096 rows at a time on the device (no whole float32 weight at once)
                dense = {}
                for dt in base_dtypes:
                    w = torch.empty(n, k, dtype=dt, device=dev)
                    for r0 in range(0, n, 4096):
                        w[r0:r0 + 4096] = pw.dequantize_rows(r0, min(n, r0 + 4096))
                    dense[dt] = w
                for m in ms:
                    x = torch.randn(m, k, generator=gen).to(dev, act)
                    t = timeit(lambda: packed_linear(x, pw), reps, dev)
                    flops = 2 * m * n * k
                    row = (f"{label:24} {f'{n}x{k}':>13} {codec.value:9} {m:>4} | {t * 1e3:9.3f} "
                           f"{pw.nbytes / t / 1e9:7.3f} {flops / t / 1e12:7.4f}")
                    if cuda:
                        row += f" {100 * pw.nbytes / t / 1e9 / args.hbm_gbs:5.1f}"
                    for dt, wd in dense.items():
                        xd = x.to(dt)
                        tb = timeit(lambda: xd @ wd.T, reps, dev)
                        row += f" | {tb * 1e3:9.3f} {wd.numel() * wd.element_size() / tb / 1e9:7.3f} {tb / t:5.2f}"
                    print(row, flush=True)
                del dense


if __name__ == "__main__":
    main()
