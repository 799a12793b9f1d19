"""The sharded layout on disk (``export --sharded``): a versioned JSON manifest plus one data file per rank.

``DIR/manifest.json``::

    {"format": "v4convert-sharded", "version": 1,
     "world": {"tp": T, "ep": E, "size": N},
     "config": {... config.json ...}, "recipe": {...},
     "files": [{"rank": r, "file": "rank-0000r-of-0000N.bin", "bytes": B}, ...],
     "tensors": [{"name", "role", "codec", "shape" (full logical), "rank", "split": null | {"dim", "start", "stop"},
                  "local_shape", "parts": {"weight": {"dtype", "shape", "offset", "bytes", "sha256"}, "scale": ...}}]}

Every stored part starts at a multiple of 4 KiB (``ALIGN``) of its rank file, so it can be mmapped or read with
O_DIRECT; a data file is nothing but those parts and zero padding. ``RankView`` opens one rank's file and
answers like ``v4convert.checkpoint.Checkpoint`` (``names``, ``tensor_info``, ``raw``, ``dequantize``) with the
rank's local shapes, checking each part's SHA-256 when it is first read.

Checksums (``Checksums``, ``V4CONVERT_CHECKSUMS``): by default (``once``) a rank file is hashed on its first
load; a load that checked every part of it records a stamp in ``~/.cache/v4convert/verified/`` keyed by the
manifest's digest and the file's device, inode, size, mtime and ctime, and later loads of the unchanged file
skip the hash (like git's index: any write or replacement changes ctime). ``always`` hashes on every load
(catches silent media corruption too), ``never`` skips it.
"""
from __future__ import annotations

import bisect
import enum
import hashlib
import json
import mmap
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from v4convert.formats.safetensors_io import ST_DTYPES, TensorEntry

from .checkpoint import TensorInfo, decode
from .errors import UserError
from .paths import user_cache
from .families.layout import Arch, LayoutError
from .families.roles import Role, Storage
from .families.sharding import Part, World

FORMAT = "v4convert-sharded"
VERSION = 1
MANIFEST = "manifest.json"
ALIGN = 4096
REQUEST = 64 << 20      # bytes per read request (one preadv over consecutive parts, each into its own buffer)
AHEAD = 192 << 20       # bytes read ahead of the caller of RankView.raw (memory beyond the tensors it holds)
POPULATE = 1 << 20      # bytes from which a part buffer is its own pre-populated mapping
POPULATE_FLAG = getattr(mmap, "MAP_POPULATE", 0)
READERS = 2             # requests in flight: one thread's pages fault in (kernel zero-fill) while another's read
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class ShardedLayoutError(UserError):
    """A sharded layout that is not what its manifest claims (or not for this world)."""


class Checksums(enum.Enum):
    """When ``RankView`` checks the stored parts against the manifest's SHA-256 (module docstring)."""

    ALWAYS = "always"   # every part, every load
    ONCE = "once"       # until one load has checked the whole rank file; skipped while the file is unchanged
    NEVER = "never"


CHECKSUMS_ENV = "V4CONVERT_CHECKSUMS"


def checksums_mode(verify: bool | Checksums | str = True) -> Checksums:
    """``verify`` as a mode: False = NEVER; True = ``$V4CONVERT_CHECKSUMS`` (default ONCE)."""
    if isinstance(verify, Checksums):
        return verify
    if verify is False:
        return Checksums.NEVER
    value = verify if isinstance(verify, str) else os.environ.get(CHECKSUMS_ENV, Checksums.ONCE.value)
    try:
        return Checksums(value.strip().lower())
    except ValueError:
        raise ShardedLayoutError(f"{CHECKSUMS_ENV}={value!r}: expected one of "
                                 f"{', '.join(c.value for c in Checksums)}") from None


def _stamp(manifest: Manifest, path: Path) -> Path:
    """Where the "every part checked" stamp of ``path`` under ``manifest`` lives (its current stat)."""
    st = os.stat(path)
    key = json.dumps([manifest.digest, str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                      st.st_ctime_ns])
    return user_cache("verified") / hashlib.sha256(key.encode()).hexdigest()


def _write_stamp(stamp: Path) -> None:
    """Record a verified file; a cache we cannot write only means the next load hashes again."""
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        tmp.write_text("sha256 verified\n")
        os.replace(tmp, stamp)
    except OSError:
        pass


def rank_file(rank: int, size: int) -> str:
    return f"rank-{rank:05d}-of-{size:05d}.bin"


def is_sharded_layout(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def sha256_of(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (contiguous little-endian, as stored)."""
    t = t.contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(memoryview(t.view(torch.uint8).reshape(-1).numpy())).hexdigest()


def _plain_empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _aligned_empty(nbytes: int) -> torch.Tensor:
    """A new uint8 tensor of ``nbytes`` whose address is a multiple of ALIGN (its own allocation, not zeroed).

    From POPULATE bytes: its own anonymous mapping, its pages made present in one MAP_POPULATE call (~30 %
    less kernel CPU than faulting 4 KiB pages one by one), unmapped when the tensor is freed."""
    if nbytes >= POPULATE and POPULATE_FLAG:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | POPULATE_FLAG)
        return torch.frombuffer(m, dtype=torch.uint8)
    alloc = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = (-alloc.data_ptr()) % ALIGN
    return alloc[shift:shift + nbytes]


@dataclass
class _Run:
    """One read request in flight: tensors ``first..last`` (file order), ``left`` bytes of them not yet taken."""
    first: int
    last: int
    left: int
    future: Future


@dataclass(frozen=True)
class Manifest:
    root: Path
    world: World
    config: dict
    files: dict[int, dict]
    tensors: list[dict]
    raw: dict
    digest: str = ""     # SHA-256 of manifest.json's bytes (keys the verified-file stamps)

    @staticmethod
    def read(root: str | Path) -> Manifest:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ShardedLayoutError(f"{path}: no manifest (not a sharded layout directory)")
        data = path.read_bytes()
        try:
            m = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShardedLayoutError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ShardedLayoutError(f"{path}: format is {m.get('format') if isinstance(m, dict) else None!r}, "
                                     f"expected {FORMAT!r}")
        if m.get("version") != VERSION:
            raise ShardedLayoutError(f"{path}: layout version {m.get('version')!r}, this v4convert reads version "
                                     f"{VERSION} (re-export with this version)")
        try:
            w = m["world"]
            world = World(int(w["tp"]), int(w["ep"]))
            if world.size != int(w["size"]):
                raise ShardedLayoutError(f"{path}: world size {w['size']} != max(tp, ep) = {world.size}")
            files = {int(f["rank"]): f for f in m["files"]}
            tensors = list(m["tensors"])
            config = dict(m["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardedLayoutError(f"{path}: malformed manifest ({e.__class__.__name__}: {e})") from None
        if sorted(files) != list(range(world.size)):
            raise ShardedLayoutError(f"{path}: files list ranks {sorted(files)}, expected 0..{world.size - 1}")
        for f in files.values():
            name = str(f.get("file", ""))
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                raise ShardedLayoutError(f"{path}: rank file name {name!r} escapes the layout directory")
        return Manifest(root, world, config, files, tensors, m, hashlib.sha256(data).hexdigest())


class RankView:
    """One rank's tensors of a sharded layout, read like a ``Checkpoint`` (local shapes).

    ``verify``: check each part's SHA-256 on its first read (a mismatch raises ``ShardedLayoutError``); True =
    ``checksums_mode()``'s default (``once``: skipped for a file a previous load verified whole), False = never,
    or a ``Checksums``.
    ``direct``: read with O_DIRECT (bypasses the page cache; falls back to buffered reads where unsupported).
    ``prefetch``: reader threads read ahead in file order while the caller walks ``names()`` in order.
    """

    def __init__(self, manifest: Manifest, rank: int, verify: bool | Checksums = True, direct: bool = False,
                 prefetch: bool = True) -> None:
        self.manifest, self.rank, self.direct = manifest, rank, direct
        self.checksums = checksums_mode(verify)
        self.prefetch = prefetch
        self._aligned = False
        self.root = manifest.root
        self.config = manifest.config
        try:
            self.arch = Arch.from_config(self.config, str(manifest.root / MANIFEST))
        except LayoutError as e:
            raise ShardedLayoutError(str(e)) from None
        f = manifest.files[rank]
        self.path = manifest.root / f["file"]
        if not self.path.is_file():
            raise ShardedLayoutError(f"{self.path}: rank {rank} data file is missing")
        size = self.path.stat().st_size
        if size != int(f["bytes"]):
            raise ShardedLayoutError(f"{self.path}: rank {rank} data file has {size} bytes, the manifest says "
                                     f"{f['bytes']} (truncated or replaced?)")
        self._infos: dict[str, TensorInfo] = {}
        self._parts: dict[str, Part] = {}
        self._sha: dict[tuple[str, str], str] = {}
        for t in manifest.tensors:
            if int(t["rank"]) != rank:
                continue
            entries = {}
            for comp, p in t["parts"].items():
                dtype, shape, off, nb = p["dtype"], tuple(p["shape"]), int(p["offset"]), int(p["bytes"])
                if dtype not in ST_DTYPES or off % ALIGN or off + nb > size:
                    raise ShardedLayoutError(f"{self.path}: tensor {t['name']}: bad part {comp} "
                                             f"({dtype} at {off}+{nb}, file {size} bytes)")
                entries[comp] = TensorEntry(t["name"], self.path, dtype, shape, off, off + nb)
                self._sha[(t["name"], comp)] = p["sha256"]
            sp = t.get("split")
            part = Part(int(sp["dim"]), int(sp["start"]), int(sp["stop"])) if sp else Part()
            role = Role[t["role"]]
            self._parts[t["name"]] = part
            self._infos[t["name"]] = TensorInfo(t["name"], role, t.get("layer"), t.get("expert"), bool(t.get("mtp")),
                                                Storage(t["codec"]), Storage(t["codec"]), tuple(t["local_shape"]),
                                                entries)
        self._stamp = _stamp(manifest, self.path) if self.checksums is Checksums.ONCE else None
        self.verify = self.checksums is Checksums.ALWAYS or (self._stamp is not None and not self._stamp.exists())
        self._fd: int | None = None
        self._checked: set[str] = set()
        # read-ahead state: tensors in file order, bytes each in its buffers, requests in flight (a deque of
        # _Run, consecutive), the next tensor to request, the last one returned
        self._order = sorted(self._infos, key=lambda n: min((e.start for e in self._infos[n].parts.values()),
                                                            default=0))
        self._pos = {n: i for i, n in enumerate(self._order)}
        self._size = [sum(-(-e.nbytes // ALIGN) * ALIGN for e in self._infos[n].parts.values())
                      for n in self._order]
        self._runs: deque[_Run] = deque()
        self._next, self._last = 0, -1
        self._pool: ThreadPoolExecutor | None = None

    # -------------------------------------------------- Checkpoint-like queries
    @property
    def family(self):
        return self.arch.family

    def names(self) -> list[str]:
        return list(self._infos)

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ShardedLayoutError(f"{self.path}: rank {self.rank} holds no tensor {name!r}") from None

    def part(self, name: str) -> Part:
        return self._parts[name]

    def raw(self, name: str) -> dict[str, torch.Tensor]:
        """The stored parts of ``name`` in new tensors (owned memory, one allocation per part, no mapped pages
        counted in RSS); with ``direct`` read through O_DIRECT into 4 KiB-aligned buffers (no page-cache copy).

        Reading ``names()`` in order (file order) is served from the read-ahead of the reader thread: while the
        caller hashes or uses one tensor, the next ``AHEAD`` bytes are read in ``REQUEST``-sized requests."""
        info = self.tensor_info(name)
        if self._fd is None:
            self._open()
        i = self._pos[name]
        taken = self._take(i)
        if taken is None:                       # not read ahead: read it now (and raise its own errors)
            parts, digests = self._read_tensors([name])[name], None
        else:
            parts, digests = taken              # hashed by the reader thread right after its read
        sequential, self._last = i == self._last + 1, i
        if self.prefetch and sequential:
            self._top_up(i + 1)                 # the next requests run while this tensor is used
        out = {}
        for k, e in info.parts.items():
            tdtype, _ = ST_DTYPES[e.dtype]
            out[k] = parts[k][:e.nbytes].view(tdtype).reshape(e.shape)
        if self.verify and name not in self._checked:
            for comp, t in out.items():
                if (digests[comp] if digests else sha256_of(t)) != self._sha[(name, comp)]:
                    raise ShardedLayoutError(f"{self.path}: tensor {name}: {comp} fails its SHA-256 check "
                                             "(file corrupted?)")
            self._checked.add(name)
            if self._stamp is not None and len(self._checked) == len(self._infos):
                _write_stamp(self._stamp)       # the whole file matched its manifest
        return out

    # -------------------------------------------------- reading
    def _open(self) -> None:
        self._fd = None
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                if self.path.stat().st_size:    # some filesystems (overlayfs) refuse O_DIRECT only at read time
                    probe = _aligned_empty(ALIGN)
                    os.preadv(self._fd, [memoryview(probe.numpy())], 0)
            except OSError:                     # a filesystem without O_DIRECT (tmpfs): buffered reads
                if self._fd is not None:
                    os.close(self._fd)
                self._fd, self.direct = None, False
        self._aligned = self._fd is not None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):    # buffered: let the kernel read ahead in big steps
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _span(self, nbytes: int) -> int:
        """Bytes a part occupies in its buffer: rounded up to ALIGN under O_DIRECT (the file pads parts so)."""
        return -(-nbytes // ALIGN) * ALIGN if self._aligned else nbytes

    def _read_tensors(self, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The parts of ``names`` (consecutive in the file) as uint8 buffers of ``_span(bytes)`` each, read with
        as few ``preadv`` calls as the layout allows (one per REQUEST bytes of contiguous parts)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        segs = []                                               # (file offset, buffer, data bytes, what)
        for name in names:
            d = out[name] = {}
            for k, e in self._infos[name].parts.items():
                d[k] = (_aligned_empty if self._aligned else _plain_empty)(self._span(e.nbytes))
                if e.nbytes:
                    segs.append((e.start, d[k], e.nbytes, f"tensor {name}: part {k}"))
        segs.sort(key=lambda s: s[0])
        req: list[memoryview] = []
        start = pos = need_end = 0
        whats: list[tuple[int, str]] = []
        for off, buf, nb, what in segs:
            mv = memoryview(buf.numpy())
            whats.append((off, what))
            for a in range(0, len(mv), REQUEST):                # a part bigger than REQUEST: several requests
                chunk = mv[a:a + REQUEST]
                if req and (off + a != pos or pos - start + len(chunk) > REQUEST or len(req) >= _IOV_MAX):
                    self._preadv(start, req, need_end - start, whats)
                    req = []
                if not req:
                    start = pos = off + a
                req.append(chunk)
                pos += len(chunk)
                need_end = off + min(a + len(chunk), nb)        # the padding after the last part may be absent
        if req:
            self._preadv(start, req, need_end - start, whats)
        return out

    def _preadv(self, start: int, iovs: list[memoryview], need: int, whats: list[tuple[int, str]]) -> None:
        """Fill ``iovs`` from file offset ``start``; at least ``need`` bytes must come (the rest is padding)."""
        got, k = 0, 0
        while got < need:
            n = os.preadv(self._fd, iovs[k:], start + got)
            # O_DIRECT stops short of a block boundary only at the end of the file
            if n <= 0 or (self._aligned and got + n < need and n % ALIGN):
                at = start + got + max(n, 0)
                what = whats[max(bisect.bisect_right([w[0] for w in whats], at) - 1, 0)][1]
                raise ShardedLayoutError(f"{self.path}: {what}: the file ends inside it")
            got += n
            while k < len(iovs) and n >= len(iovs[k]):          # drop the buffers filled, trim a partial one
                n -= len(iovs[k])
                k += 1
            if n:
                iovs[k] = iovs[k][n:]

    # -------------------------------------------------- read-ahead
    def _read_run(self, names: list[str]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]]:
        """A read-ahead request (on a reader thread): the parts of ``names`` and, with ``verify``, their SHA-256
        (hashlib releases the GIL: the readers hash in parallel with each other and with the caller)."""
        got = self._read_tensors(names)
        out = {}
        for name, parts in got.items():
            digests = None
            if self.verify:
                digests = {k: sha256_of(parts[k][:e.nbytes]) for k, e in self._infos[name].parts.items()}
            out[name] = (parts, digests)
        return out

    def _take(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, str] | None] | None:
        """Tensor ``i`` (file order) from the read-ahead, or None where it is not there (or its run failed:
        the caller then reads it alone, so an error names the right tensor)."""
        runs = self._runs
        while runs and runs[0].last < i:        # the caller went past these: drop them
            runs.popleft().future.cancel()
        if not runs or runs[0].first > i:
            return None
        run = runs[0]
        try:
            got = run.future.result()
        except Exception:                       # noqa: BLE001 - re-raised by the caller's own read of tensor i
            self._drop()
            return None
        taken = got.pop(self._order[i], None)
        run.left -= self._size[i]
        if i == run.last:
            runs.popleft()
        return taken

    def _top_up(self, start: int) -> None:
        """Keep requests for the tensors after ``start - 1`` in flight, up to AHEAD bytes not yet taken."""
        runs = self._runs
        if runs and runs[0].first > start:      # a gap: restart from start
            self._drop()
        if not runs:
            self._next = start
        ahead = sum(r.left for r in runs)
        n = len(self._order)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="rankview-read")
        while ahead < AHEAD and self._next < n:
            first, nb = self._next, 0
            while self._next < n and (self._next == first or nb + self._size[self._next] <= REQUEST):
                nb += self._size[self._next]
                self._next += 1
            names = self._order[first:self._next]
            runs.append(_Run(first, self._next - 1, nb, self._pool.submit(self._read_run, names)))
            ahead += nb

    def _drop(self) -> None:
        while self._runs:
            self._runs.popleft().future.cancel()

    def dequantize(self, name: str) -> torch.Tensor:
        info = self.tensor_info(name)
        return decode(info, self.raw(name))       # raw() owns its memory: no copy needed

    def release(self, name: str) -> None:
        """Nothing to release (``raw`` returns owned tensors); kept for the ``Checkpoint`` interface."""

    def close(self) -> None:
        self._drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)      # a request in flight finishes before its fd closes
            self._pool = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
