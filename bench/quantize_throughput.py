"""Quantize throughput on a full-size synthetic layer (issue 16).

    python bench/quantize_throughput.py --src /work/fullsize/v3-layer3 [--workers 2] [--device cpu|cuda]
    python bench/quantize_throughput.py --src /work/fullsize/v32-layer3 --preset v32-671b --layers 3
    python bench/quantize_throughput.py --src /work/fullsize/v4f-layers --preset v4-flash --layers 2-3

Input: ``v4convert synth --preset P --layers L`` (created if missing; V3: one MoE layer, 11.5 GB FP8).
Prints, from one run: disk read speed of the source shards (page cache evicted first with
``posix_fadvise(DONTNEED)`` on those files only), quantize GB/s of source read (cache evicted again
before), the same-run buffered copy reference (reading the input while writing + fsyncing the output's size with
buffered writes; not a floor: an O_DIRECT writer beats it, the GGUF export ran in 17.4 s of a 36 s reference), peak RSS (largest process and the whole tree, sampled every 0.1 s), CPU seconds of the whole
tree and per GB, and the projected time for the whole release at this rate and on 16 cores with this disk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RELEASE_GB = {"v3-671b": 688.6, "v32-671b": 688.6, "v4-flash": 159.6}   # as published (DESIGN §3; V3.2 as V3)


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_speed(paths: list[Path], limit: int) -> float:
    """GB/s of sequential 16 MB reads over the first ``limit`` bytes of the shards (cold)."""
    evict(paths)
    buf = bytearray(16 << 20)
    done = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while done < limit:
                n = f.readinto(buf)
                if not n:
                    break
                done += n
        if done >= limit:
            break
    return done / (time.perf_counter() - t0) / 1e9


def copy_floor(paths: list[Path], read_bytes: int, write_bytes: int, out_dir: Path) -> float:
    """Seconds to read ``read_bytes`` of the (evicted) shards while writing ``write_bytes`` to a new file and fsyncing
    it, concurrently, in 16 MB requests: the buffered copy reference (reads and writes share the device). Not a
    floor: the writes are buffered (page-cache copy, writeback at fsync), and O_DIRECT writers run faster than it
    on this VM (the GGUF export of the V3 layer: 17.4 s against a 36 s reference in the same run)."""
    evict(paths)
    res: dict[str, float] = {}
    tmp = out_dir / "copy-floor.bin"

    def write() -> None:
        buf = os.urandom(16 << 20)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        done = 0
        while done < write_bytes:
            done += os.write(fd, buf[: min(len(buf), write_bytes - done)])
        os.fsync(fd)
        os.close(fd)
        res["w"] = time.perf_counter()
    t0 = time.perf_counter()
    th = threading.Thread(target=write)
    th.start()
    fd_buf = bytearray(16 << 20)
    done = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while done < read_bytes:
                n = f.readinto(fd_buf)
                if not n:
                    break
                done += n
    t_read = time.perf_counter()
    th.join()
    tmp.unlink()
    return max(t_read, res["w"]) - t0


class RSSSampler(threading.Thread):
    """Peak RSS (largest process, whole tree) and CPU seconds of the whole tree, forkserver workers included
    (RUSAGE_CHILDREN misses them: they are the fork server's children), sampled every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_tree = 0
        self.peak_proc = 0
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            try:
                procs = [me] + me.children(recursive=True)
                rss = []
                for p in procs:
                    with p.oneshot():
                        rss.append(p.memory_info().rss)
                        c = p.cpu_times()
                        self.cpu[p.pid] = c.user + c.system
                self.peak_tree = max(self.peak_tree, sum(rss))
                self.peak_proc = max(self.peak_proc, max(rss))
            except psutil.Error:
                pass
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/tmp/v3-layer3"))
    ap.add_argument("--preset", default="v3-671b", help="synth preset written to --src when it is absent "
                    "(v3-671b, v32-671b, v4-flash)")
    ap.add_argument("--layers", default="3", help="synth --layers for --preset (V4-Flash: '2-3' = one CSA, one HCA)")
    ap.add_argument("--recipe", default="nvfp4-experts")
    ap.add_argument("--release-gb", type=float, default=None, help="size of the whole release for the projection "
                    "(default: by preset: V3/V3.2 688.6, V4-Flash 160)")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default: a temp dir next to --src, removed)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--device", default=None)
    ap.add_argument("--read-limit", type=float, default=4.0, help="GB read for the disk speed measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from v4convert.checkpoint import Checkpoint
    from v4convert.quant.engine import execute
    from v4convert.quant.plan import Options, make_plan
    from v4convert.quant.recipes import RuleSet, preset

    if not (args.src / "config.json").is_file():
        print(f"creating {args.src} (synth --preset {args.preset} --layers {args.layers})...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "v4convert.cli", "synth", "--preset", args.preset, "--layers",
                        args.layers, "--out", str(args.src)], check=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shards = sorted(args.src.glob("*.safetensors"))
    disk = read_speed(shards, int(args.read_limit * 1e9))

    with Checkpoint.open(args.src) as ck:
        t0 = time.perf_counter()
        plan = make_plan(ck, RuleSet(preset(args.recipe)), Options(allow_missing=True))  # a layer subset
        t_plan = time.perf_counter() - t0
    print(plan.summary(), file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="qbench-", dir=args.out.parent if args.out else args.src.parent))
    out = args.out or (tmp / "out")
    evict(shards)
    sampler = RSSSampler()
    sampler.start()
    cpu0 = psutil.Process().cpu_times()
    t0 = time.perf_counter()
    try:
        r = execute(plan, out, workers=args.workers, overwrite=True, progress=sys.stderr.isatty(), device=device,
                    log=lambda m: print(m, file=sys.stderr))
        wall = time.perf_counter() - t0
    finally:
        sampler.stop.set()
        sampler.join()
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    cpu_s = sum(sampler.cpu.values()) - (cpu0.user + cpu0.system)
    floor = copy_floor(shards, plan.bytes_in, r.bytes_out, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    rate = plan.bytes_in / wall / 1e9
    release = args.release_gb or RELEASE_GB.get(args.preset, 688.6)
    res = {"device": device, "workers": args.workers, "cores": os.cpu_count(), "input_gb": plan.bytes_in / 1e9,
           "output_gb": r.bytes_out / 1e9, "plan_s": round(t_plan, 3), "wall_s": round(wall, 2),
           "quantize_gb_per_s": round(rate, 3), "disk_read_gb_per_s": round(disk, 3),
           "copy_floor_s": round(floor, 2), "vs_disk_read": round(rate / disk, 3),
           "vs_copy_floor": round(floor / wall, 3),
           "peak_rss_process_gb": round(sampler.peak_proc / 1e9, 3),
           "peak_rss_tree_gb": round(sampler.peak_tree / 1e9, 3),
           "release_gb": release, "projected_release_hours": round(release / rate / 3600, 2),
           # a 16-core machine with this disk: CPU-bound at 16 / cores x this run's CPU rate, I/O-bound at the
           # same-run buffered copy reference (pessimistic: O_DIRECT writes beat it); the slower sets the time
           "projected_release_hours_16_cores": round(max(release / (plan.bytes_in / 1e9 / (cpu_s / 16)),
                                                         release / (plan.bytes_in / 1e9 / floor)) / 3600, 2),
           "cpu_seconds": round(cpu_s, 1), "cpu_s_per_gb": round(cpu_s / (plan.bytes_in / 1e9), 2),
           # on a shared machine wall time mostly measures the other tenants: CPU seconds spent by this run
           # (all processes) give the rate these cores would reach if they were ours alone
           "uncontended_gb_per_s_est": round(plan.bytes_in / 1e9 / (cpu_s / (os.cpu_count() or 1)), 3),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"quantize: {res['input_gb']:.2f} GB FP8 -> {res['output_gb']:.2f} GB in {wall:.1f} s = "
              f"{rate:.3f} GB/s of FP8 input ({device}, {args.workers} workers on {os.cpu_count()} cores)")
        print(f"disk read (cold, same run): {disk:.3f} GB/s -> quantize at {res['vs_disk_read']:.2f}x of it")
        print(f"buffered copy reference (read the input while buffered-writing+fsyncing the output size, cold, same "
              f"run; not a floor): {floor:.1f} s -> quantize at {res['vs_copy_floor']:.2f}x of it")
        print(f"peak RSS: {res['peak_rss_process_gb']:.2f} GB largest process, {res['peak_rss_tree_gb']:.2f} GB all")
        print(f"projected release ({release} GB): {res['projected_release_hours']:.2f} h at this rate "
              f"(read-bound floor {release / disk / 3600:.2f} h); on 16 cores with this disk "
              f"{res['projected_release_hours_16_cores']:.2f} h")
        print(f"CPU: {res['cpu_seconds']} s over all processes -> {res['uncontended_gb_per_s_est']:.3f} GB/s if the "
              f"{os.cpu_count()} cores were not shared (1-min load average at the end: {res['load_avg_1m']})")


if __name__ == "__main__":
    main()
