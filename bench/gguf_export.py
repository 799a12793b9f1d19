"""GGUF export benchmarks.

1. Quantizer speed: ours (``formats.gguf_quants``) vs gguf-py's numpy reference on the same 16M-weight
   matrix (best of N, alternating so both see the same machine load), with a byte-identity check.
2. Export throughput on a full-size layer (``v4convert synth --preset v3-671b --layers 3``, or a real
   layer's shards): GB/s read from the checkpoint and written to the GGUF, the cold disk read speed of the
   same shards measured in the same run (page cache evicted with ``posix_fadvise(DONTNEED)`` before the
   read and again before the export, as ``bench/quantize_throughput.py``), their ratio, and peak RSS.
   A one-layer checkpoint lacks the other layers: exported with ``allow_missing``.

    python bench/gguf_export.py quant [--rows 4096 --cols 4096 --repeat 3]
    python bench/gguf_export.py layer --ckpt /tmp/v3-layer3 --out /tmp/v3-layer3.gguf [--workers N] [--floor]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from v4convert.formats import gguf_quants

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_throughput import copy_floor, evict, read_speed  # noqa: E402  (bench/ is not a package)


def bench_quant(rows: int, cols: int, repeat: int) -> dict:
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02)
    xn = x.numpy()
    out = {}
    for qt in (Q.MXFP4, Q.Q8_0, Q.Q4_0):
        ours_t, ref_t = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            ours = gguf_quants.quantize(x, qt)
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = quants.quantize(xn, qt)
            ref_t.append(time.perf_counter() - t)
        same = bool(np.array_equal(ours.numpy(), ref))
        out[qt.name] = {"weights": rows * cols, "ours_s": min(ours_t), "gguf_py_s": min(ref_t),
                        "speedup": min(ref_t) / min(ours_t), "byte_identical": same}
        print(f"{qt.name:6s} {rows * cols / 1e6:.1f}M weights: ours {min(ours_t):.3f} s, gguf-py {min(ref_t):.3f} s, "
              f"x{min(ref_t) / min(ours_t):.1f}, byte-identical {same}", flush=True)
    return out


class _RssSampler(threading.Thread):
    """Peak anonymous RSS (heap: what the exporter holds) and file-backed RSS (mmapped shards, reclaimable
    page cache) from /proc/self/status, sampled every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for line in Path("/proc/self/status").read_text().splitlines():
                k = line.split(":")[0]
                if k in self.peak:
                    self.peak[k] = max(self.peak[k], int(line.split()[1]) * 1024)


def bench_layer(ckpt: Path, out: Path, workers: int | None, read_limit: float, floor: bool = False) -> dict:
    from v4convert.checkpoint import Checkpoint
    from v4convert.export.gguf.exporter import TypeMix, export_gguf
    with Checkpoint.open(ckpt) as ck:
        read_bytes = sum(i.nbytes for i in ck.infos())
        shards = ck.shards()
    load0 = os.getloadavg()
    disk = read_speed(shards, int(read_limit * 1e9))      # cold: evicts first
    evict(shards)
    kw = {"workers": workers} if workers is not None else {}
    if "workers" not in inspect.signature(export_gguf).parameters:
        kw = {}                                           # the exporter before the engine (issue #16)
    sampler = _RssSampler()
    sampler.start()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    r = export_gguf(ckpt, out, TypeMix(), progress=sys.stderr.isatty(), modelfile=False, allow_missing=True,
                    overwrite=True, **kw)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    sampler.stop.set()
    sampler.join()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"checkpoint_bytes": read_bytes, "gguf_bytes": r.n_bytes, "seconds": r.seconds,
           "read_GBps": read_bytes / r.seconds / 1e9, "write_GBps": r.n_bytes / r.seconds / 1e9,
           "disk_read_GBps": disk, "read_vs_disk": read_bytes / r.seconds / 1e9 / disk, "workers": kw.get("workers"),
           "peak_rss_bytes": rss,
           "export_user_s": ru1.ru_utime - ru0.ru_utime, "export_sys_s": ru1.ru_stime - ru0.ru_stime,
           "load_avg_before": load0, "peak_rss_anon_bytes": sampler.peak["RssAnon"],
           "peak_rss_file_bytes": sampler.peak["RssFile"], "tensors": r.n_tensors,
           "cpus": os.cpu_count(), "load_avg_after": os.getloadavg()}
    for p in r.paths:
        p.unlink()
    if floor:       # buffered copy reference (not a floor): read the input while writing the GGUF's size (after the export)
        res["copy_floor_s"] = copy_floor(shards, read_bytes, r.n_bytes, out.parent)
        res["export_vs_floor"] = r.seconds / res["copy_floor_s"]
    print(json.dumps(res, indent=2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quant")
    q.add_argument("--rows", type=int, default=4096)
    q.add_argument("--cols", type=int, default=4096)
    q.add_argument("--repeat", type=int, default=3)
    layer = sub.add_parser("layer")
    layer.add_argument("--ckpt", type=Path, required=True)
    layer.add_argument("--out", type=Path, required=True)
    layer.add_argument("--workers", type=int, default=None, help="export workers (default: the exporter's)")
    layer.add_argument("--read-limit", type=float, default=4.0, help="GB read for the disk speed measurement")
    layer.add_argument("--floor", action="store_true", help="also time the buffered copy reference after the export (not a floor: O_DIRECT writers beat it): the "
                       "input read while the output's bytes are written (bench/quantize_throughput.py copy_floor)")
    a = ap.parse_args()
    if a.cmd == "quant":
        bench_quant(a.rows, a.cols, a.repeat)
    else:
        bench_layer(a.ckpt, a.out, a.workers, a.read_limit, a.floor)


if __name__ == "__main__":
    main()
