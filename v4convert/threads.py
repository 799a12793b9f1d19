"""How many threads / worker processes to use: the cores actually free, never more.

torch's default (one intra-op thread per core) collapses when the cores are shared: its OpenMP threads
spin-wait on each other while other processes hold the cores (measured on 2 busy cores, tiny V3 decode:
see bench/threads.py). The default here is the number of usable cores (CPU affinity and the cgroup CPU
quota) minus the load other processes put on them, sampled over ``SAMPLE_S`` seconds, at least 1.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

SAMPLE_S = 0.1                 # seconds of CPU-usage sampling behind the "free cores" estimate
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")     # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                       # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def free_cores() -> int:
    """Usable cores minus what other processes keep busy right now (psutil sample), at least 1."""
    n = usable_cores()
    try:
        import psutil
        busy = psutil.cpu_percent(interval=SAMPLE_S, percpu=True)
        try:
            cores = sorted(os.sched_getaffinity(0))
            busy = [busy[c] for c in cores if c < len(busy)] or busy
        except AttributeError:
            pass
        used = sum(busy) / 100.0
    except Exception:  # noqa: BLE001 -- psutil missing or /proc unreadable: fall back to the load average
        used = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(n, round(n - used)))


def split_threads(workers: int | None, cores: int | None = None) -> tuple[int, int]:
    """``(worker processes, threads per worker)`` with ``workers * threads <= max(workers, cores)``.

    ``workers`` None: one single-threaded worker per free core. An explicit ``workers`` gets the free
    cores divided among them (at least one thread each), so ``--workers`` never oversubscribes."""
    cores = cores or free_cores()
    if workers is None:
        return cores, 1
    return workers, max(1, cores // max(1, workers))


ENV = "V4CONVERT_THREADS"      # a fixed default for every command (tests set 1: results then never vary)


def set_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: ``$V4CONVERT_THREADS`` if set, else the free
    cores); return the number set."""
    import torch
    env = os.environ.get(ENV, "").strip()
    n = threads if threads is not None else (int(env) if env.isdigit() and int(env) > 0 else free_cores())
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


class ComputeSlots:
    """At most ``n`` threads inside :meth:`hold` at once (``set(None)``: no limit). The quantize and GGUF engines
    run ``2 * workers`` unit threads so that one unit's reads and O_DIRECT writes overlap another's encode, with
    ``workers`` slots around the kernel calls: the kernels never oversubscribe the cores. One instance per engine."""

    def __init__(self) -> None:
        self._sem: threading.Semaphore | None = None

    def set(self, n: int | None) -> None:
        self._sem = threading.Semaphore(n) if n else None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One slot around a kernel call (never nested: a slot is not re-entrant)."""
        sem = self._sem
        if sem is None:
            yield
            return
        with sem:
            yield
