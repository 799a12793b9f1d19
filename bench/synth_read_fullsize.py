"""Write a full-size synthetic DeepSeek MoE layer and read every tensor back, reporting peak RSS.

    python bench/synth_read_fullsize.py --preset v3-671b --layers 3 --out /tmp/v3-layer3

Shows that `synth` and the checkpoint reader stream: peak RSS stays at a few tensors even though
the layer is 11.5 GB of FP8. Prints bytes, seconds, GB/s and peak RSS (ru_maxrss) of each phase.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import torch

from v4convert.checkpoint import Checkpoint
from v4convert.synth import synth


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # Linux: KiB -> GB (approx. 1.024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v3-671b")
    ap.add_argument("--layers", default="3")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ap.add_argument("--read-only", action="store_true", help="skip synth: read an existing --out checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not args.read_only:
        if args.out.exists():
            shutil.rmtree(args.out)
        t0 = time.time()
        r = synth(args.preset, args.out, layers=args.layers)
        t1 = time.time()
        print(f"synth  {args.preset} --layers {args.layers}: {r.n_tensors} tensors, {r.n_bytes / 1e9:.2f} GB, "
              f"{r.n_shards} shards, {t1 - t0:.1f} s ({r.n_bytes / 1e9 / (t1 - t0):.2f} GB/s), "
              f"peak RSS so far {peak_rss_gb():.2f} GB")
    ck = Checkpoint.open(args.out)
    n = 0
    checksum = 0.0
    t2 = time.time()
    for info in ck.infos():
        w = ck.dequantize(info.name)      # one float32 tensor at a time (<= 59 MB for an expert)
        checksum += float(torch.linalg.vector_norm(w, 1))   # L1 without a full-size temporary
        n += info.nbytes
        del w
    t3 = time.time()
    print(f"read   {len(ck.names())} tensors dequantized to float32, {n / 1e9:.2f} GB stored, {t3 - t2:.1f} s "
          f"({n / 1e9 / (t3 - t2):.2f} GB/s), checksum {checksum:.6e}")
    print(f"peak RSS (whole run): {peak_rss_gb():.2f} GB")
    ck.close()
    if not (args.keep or args.read_only):
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
