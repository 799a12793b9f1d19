"""MLX export throughput on a full-size synthetic layer, side by side with the GGUF export of the same layer.

    v4convert synth --preset v3-671b --layers 3 --out /tmp/v3-layer3        # one MoE layer, 11.5 GB FP8
    python bench/mlx_export.py --ckpt /tmp/v3-layer3 --out /tmp/v3-layer3.mlx [--quant affine8 --experts mxfp4]

Reports, for each exporter: seconds, GB/s read from the checkpoint and written, peak RSS (total, and the
anonymous part: what the exporter itself holds; the file-backed part is reclaimable page cache of the
mmapped shards), and the MLX / GGUF time ratio. Defaults mirror each other: experts MXFP4, the rest
8-bit (MLX affine 8-bit in groups of 64, GGUF Q8_0 in blocks of 32).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gguf_export import _RssSampler  # the one RSS sampler of bench/


def _run(fn) -> tuple[object, dict]:
    sampler = _RssSampler()
    sampler.start()
    r = fn()
    sampler.stop.set()
    sampler.join()
    return r, {"peak_rss_anon_bytes": sampler.peak["RssAnon"], "peak_rss_file_bytes": sampler.peak["RssFile"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quant", default="affine8")
    ap.add_argument("--experts", default="mxfp4")
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF side")
    a = ap.parse_args()

    from v4convert.checkpoint import Checkpoint
    from v4convert.export.mlx import Options, export_mlx
    from v4convert.export.gguf.exporter import export_gguf
    from v4convert.export.gguf.types import TypeMix
    with Checkpoint.open(a.ckpt) as ck:
        read_bytes = sum(i.nbytes for i in ck.infos())
    progress = sys.stderr.isatty()
    res: dict = {"checkpoint_bytes": read_bytes, "cpus": os.cpu_count(), "torch_threads": None}
    import torch
    res["torch_threads"] = torch.get_num_threads()

    r, rss = _run(lambda: export_mlx(a.ckpt, a.out, Options(quant=a.quant, experts=a.experts, allow_missing=True), progress=progress))
    res["mlx"] = {"bytes": r.n_bytes, "seconds": r.seconds, "read_GBps": read_bytes / r.seconds / 1e9,
                  "write_GBps": r.n_bytes / r.seconds / 1e9, "files": len(r.paths), **rss,
                  "peak_rss_bytes_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    shutil.rmtree(a.out)
    print(json.dumps({"mlx": res["mlx"]}), flush=True)        # the MLX side on its own, before the GGUF run
    if not a.no_gguf:
        g_out = a.out.with_suffix(".gguf")
        g, rss = _run(lambda: export_gguf(a.ckpt, g_out, TypeMix(), progress=progress, modelfile=False, allow_missing=True))
        res["gguf"] = {"bytes": g.n_bytes, "seconds": g.seconds, "read_GBps": read_bytes / g.seconds / 1e9,
                       "write_GBps": g.n_bytes / g.seconds / 1e9, **rss}
        res["mlx_over_gguf_time"] = r.seconds / g.seconds
        for p in g.paths:
            p.unlink()
    res["load_avg_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
