"""Peak RSS of loading an FP4 artifact packed vs in its BF16 form (issue 7, item 2).

    python bench/packed_memory.py                      # synthesizes v4-flash-tiny (MXFP4 experts, FP8 attention)
    python bench/packed_memory.py --ckpt DIR           # any checkpoint Checkpoint.open reads

Each mode runs in a fresh Python process: import, open the checkpoint, note RSS (baseline), load every tensor
and keep it, then report the peak RSS (``ru_maxrss``) minus the baseline and the bytes the kept tensors hold:

* ``packed``  quantized linears as ``PackedWeight`` (``kernels.packed.from_checkpoint``), other tensors BF16;
* ``bf16``    every tensor dequantized and cast to BF16 (what a BF16 form of the artifact holds);
* ``runtime`` ``v4convert.runtime.load(..., dtype=bfloat16)`` (today's loader, dense weights + caches; its
  shard maps stay open during the load, so touched file pages count in its RSS too).

In the first two modes the shards are unmapped after each tensor (``Checkpoint.close``; the next read maps again),
so RSS measures what is held, not the page cache.

A tiny artifact's deltas are a few MB and allocator noise is ~1 MB: read the bytes-held column for the ratio,
the RSS columns for "nothing else is held".
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("packed", "bf16", "runtime")


def child(mode: str, path: str) -> dict:
    import psutil
    import torch

    from v4convert.checkpoint import Checkpoint
    from v4convert.kernels.packed import STORAGE_CODEC, from_checkpoint
    from v4convert.runtime import load
    from v4convert.runtime.loader import BUILDERS
    ck = Checkpoint.open(path)
    importlib.import_module(f"v4convert.runtime.{BUILDERS[ck.family]}")   # code imported before the baseline
    base = psutil.Process().memory_info().rss
    held = 0
    qp: dict[str, int] = {}        # codec -> logical weights
    qb: dict[str, int] = {}        # codec -> bytes held for them
    keep = []
    if mode == "runtime":
        model = load(path, dtype=torch.bfloat16, max_seq_len=64)
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        keep.append(model)
    else:
        for name in ck.names():
            info = ck.tensor_info(name)
            if mode == "packed" and info.storage.is_quantized:
                t = from_checkpoint(ck, name)
                nbytes = t.nbytes
            else:
                t = ck.dequantize(name)
                t = t.to(torch.bfloat16) if t.is_floating_point() else t
                nbytes = t.numel() * t.element_size()
            ck.close()                 # unmap the shards: their touched pages would count in RSS as well
            keep.append(t)
            held += nbytes
            if info.storage.is_quantized:
                c = STORAGE_CODEC[info.storage].value
                qp[c] = qp.get(c, 0) + info.numel
                qb[c] = qb.get(c, 0) + nbytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "baseline_mb": base / 2**20, "peak_mb": peak / 2**20, "delta_mb": (peak - base) / 2**20,
            "held_mb": held / 2**20, "bits": {c: 8 * qb[c] / qp[c] for c in qp}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory (default: synthesize --preset into a temp dir)")
    ap.add_argument("--preset", default="v4-flash-tiny")
    ap.add_argument("--medium", action="store_true",
                    help="v4-flash-tiny widened (hidden 1024, 32 experts of 512): ~140 MB of MXFP4 experts")
    ap.add_argument("--save", help="write the synthesized artifact here (kept) instead of a temp dir")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ckpt)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.ckpt
        if path is None:
            from v4convert import synth
            preset = args.preset
            if args.medium:     # a bench-only preset registered in this process (synth itself is unchanged)
                cfg = synth.preset_config("v4-flash-tiny")
                cfg.update(hidden_size=1024, moe_intermediate_size=512, n_routed_experts=32)
                preset = "v4-flash-medium"
                synth.PRESETS[preset] = (lambda: dict(cfg), 64 << 20)
            path = str(synth.synth(preset, Path(args.save) if args.save else Path(tmp) / preset).out)
        print(f"# {path}")
        print(f"{'mode':8} {'baseline MB':>11} {'peak MB':>8} {'peak-base MB':>12} {'held MB':>8}  bits per weight held")
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--ckpt", path], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            bits = ", ".join(f"{c} {b:.2f}" for c, b in sorted(r["bits"].items())) or "-"
            print(f"{mode:8} {r['baseline_mb']:11.1f} {r['peak_mb']:8.1f} {r['delta_mb']:12.2f} {r['held_mb']:8.2f}  "
                  f"{bits}")


if __name__ == "__main__":
    main()
