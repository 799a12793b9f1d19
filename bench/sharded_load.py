"""Load speed of the sharded layout vs the same tensors sliced from HF safetensors, against cold-cache disk speed,
and per-rank peak RSS, side by side in one run (ratios, never timed assertions).

    python bench/sharded_load.py --src /work/fullsize/v3-layer3 --tp 4 --ep 4 --work /tmp/shbench

1. exports ``--src`` to the sharded layout (``--work/layout``; reused if present; removed unless ``--keep``);
2. evicts every file from the page cache (``posix_fadvise(DONTNEED)``, no root needed) before each measure;
3. per measured rank and loader: the disk's cold sequential speed (that rank file read with O_DIRECT in 64 MiB
   requests into one reused buffer: no hashing, no new memory, the limit any loader can reach; measured right
   before and right after each load because the disk is shared and drifts; the ratio is to their mean), then in
   a fresh process (one at a time, so loads do not share the disk) the time to bring that
   rank's stored tensors into RAM (as packed as they are stored, what ``runtime.load(packed=True)`` holds):
   a. ``layout``: ``RankView.raw`` as the runtime reads a layout on its first load (O_DIRECT, read-ahead threads,
      SHA-256 check of every part: ``Checksums.ALWAYS``);
   a'. ``layout-verified``: the same on a later load (the default ``Checksums.ONCE`` with the file's stamp from an
      earlier untimed load, page cache evicted after it: no hashing, the file is unchanged since it was verified);
   b. ``layout-serial``: the same, one tensor at a time, no read-ahead (read, then hash: the loader before #15);
   c. ``layout-nosha``: as a, without the SHA-256 check (``verify_checksums=False``);
   d. ``layout-buffered``: as a, buffered reads (through the page cache) instead of O_DIRECT;
   e. ``hf-slices``: the same slices through ``families.sharding.slice_stored`` on the mmapped HF shards + copy;
   the process's CPU seconds (all threads; the 2-core machine is shared, so CPU time tells contention from cost)
   and its peak RSS against the rank's share of the bytes. Results: ``bench/sharded_load.md``.
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

KINDS = ("layout", "layout-verified", "layout-serial", "layout-nosha", "layout-buffered", "hf-slices")


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read(path: Path, chunk: int = 64 << 20) -> tuple[int, float]:
    """Bytes of ``path`` and seconds to read them cold, O_DIRECT (buffered where refused) into one buffer."""
    buf = mmap.mmap(-1, chunk)                     # page-aligned, as O_DIRECT needs
    t0 = time.perf_counter()
    n = 0
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            os.preadv(fd, [buf], 0)
        except OSError:
            os.close(fd)
            fd = os.open(path, os.O_RDONLY)
        while True:
            k = os.preadv(fd, [buf], n)
            if not k:
                break
            n += k
    finally:
        os.close(fd)
        buf.close()
    return n, time.perf_counter() - t0


def _rank_job(kind: str, layout: str, src: str, rank: int, q) -> None:
    torch.set_num_threads(1)
    from v4convert.checkpoint import Checkpoint
    from v4convert.families.sharding import Part, slice_stored
    from v4convert.sharded_layout import Checksums, Manifest, RankView
    man = Manifest.read(layout)
    checks = {"layout-nosha": Checksums.NEVER, "layout-verified": Checksums.ONCE, "stamp": Checksums.ONCE}
    kept = []
    n = 0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    if kind.startswith("layout") or kind == "stamp":
        v = RankView(man, rank, verify=checks.get(kind, Checksums.ALWAYS), direct=kind != "layout-buffered",
                     prefetch=kind != "layout-serial")
        for name in v.names():
            for t in v.raw(name).values():          # owned tensors (pread), nothing to copy
                kept.append(t)
                n += t.numel() * t.element_size()
            v.release(name)
        v.close()
    else:
        ck = Checkpoint.open(src)
        for t in man.tensors:
            if t["rank"] != rank:
                continue
            info = ck.tensor_info(t["name"])
            sp = t["split"]
            part = Part(sp["dim"], sp["start"], sp["stop"]) if sp else Part()
            for s in slice_stored(info.storage, ck.raw(t["name"]), part, info.shape, t["name"]).values():
                kept.append(s.contiguous().clone())
                n += s.numel() * s.element_size()
            ck.release(t["name"])
        ck.close()
    dt = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    q.put({"kind": kind, "rank": rank, "bytes": n, "s": dt, "cpu_s": ru.ru_utime + ru.ru_stime - cpu0,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sharded-bench"))
    ap.add_argument("--ranks", default="0", help="ranks to measure (comma list or 'all')")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"loaders to measure (comma list of {', '.join(KINDS)})")
    ap.add_argument("--keep", action="store_true", help="keep the exported layout")
    args = ap.parse_args()
    from v4convert.export import sharded
    from v4convert.sharded_layout import Manifest
    layout = args.work / "layout"
    if not layout.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        r = sharded.export(args.src, layout, sharded.Options(tp=args.tp, ep=args.ep, allow_missing=True), progress=sys.stderr.isatty())
        print(f"export: {r.n_bytes / 1e9:.2f} GB in {r.seconds:.1f} s ({r.n_bytes / r.seconds / 1e9:.2f} GB/s)")
    man = Manifest.read(layout)
    files = [layout / f["file"] for f in man.files.values()]
    shards = sorted(args.src.glob("*.safetensors"))
    ranks = range(man.world.size) if args.ranks == "all" else [int(x) for x in args.ranks.split(",")]
    rows = []
    ctx = mp.get_context("spawn")
    print("each row: the disk's cold O_DIRECT sequential read speed of that rank file just before / just after "
          "(the limit; the disk is shared, so it drifts), then the cold load, its ratio to the mean of the two")
    kinds = args.kinds.split(",")
    for rank in ranks:
        for kind in kinds:
            if kind == "layout-verified":           # an untimed first load verifies the file and stamps it
                q = ctx.Queue()
                p = ctx.Process(target=_rank_job, args=("stamp", str(layout), str(args.src), rank, q))
                p.start()
                q.get()
                p.join()
            evict(files + shards)
            n, dt = disk_read(files[rank])
            before = n / dt
            evict(files + shards)
            q = ctx.Queue()
            p = ctx.Process(target=_rank_job, args=(kind, str(layout), str(args.src), rank, q))
            p.start()
            res = q.get()
            p.join()
            evict(files + shards)
            n, dt = disk_read(files[rank])
            after = n / dt
            disk = (before + after) / 2
            res.update(disk_before_Bps=before, disk_after_Bps=after, disk_Bps=disk)
            rows.append(res)
            speed = res["bytes"] / res["s"]
            print(f"rank {rank} {kind:15s}: disk {before / 1e9:4.2f}/{after / 1e9:4.2f} GB/s | {res['bytes'] / 1e9:5.2f} "
                  f"GB in {res['s']:5.2f} s = {speed / 1e9:4.2f} GB/s ({speed / disk:.2f}x disk), CPU "
                  f"{res['cpu_s']:5.2f} s, peak RSS {res['peak_rss'] / 1e9:.2f} GB "
                  f"({res['peak_rss'] / max(res['bytes'], 1):.2f}x its bytes)", flush=True)
    total = sum(f["bytes"] for f in man.files.values())
    print(f"layer bytes (all ranks): {total / 1e9:.2f} GB; 1/{man.world.size} = {total / man.world.size / 1e9:.2f} GB")
    print(json.dumps({"rows": rows}))
    if not args.keep:
        shutil.rmtree(layout)


if __name__ == "__main__":
    main()
