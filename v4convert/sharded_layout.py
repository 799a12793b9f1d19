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
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from v4convert.formats.safetensors_io import ST_DTYPES, TensorEntry

from .checkpoint import TensorInfo, decode
from .errors import UserError
from .families.layout import Arch, LayoutError
from .families.roles import Role, Storage
from .families.sharding import Part, World

FORMAT = "v4convert-sharded"
VERSION = 1
MANIFEST = "manifest.json"
ALIGN = 4096


class ShardedLayoutError(UserError):
    """A sharded layout that is not what its manifest claims (or not for this world)."""


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


@dataclass(frozen=True)
class Manifest:
    root: Path
    world: World
    config: dict
    files: dict[int, dict]
    tensors: list[dict]
    raw: dict

    @staticmethod
    def read(root: str | Path) -> Manifest:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ShardedLayoutError(f"{path}: no manifest (not a sharded layout directory)")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
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
        return Manifest(root, world, config, files, tensors, m)


class RankView:
    """One rank's tensors of a sharded layout, read like a ``Checkpoint`` (local shapes).

    ``verify``: check each part's SHA-256 on its first read (a mismatch raises ``ShardedLayoutError``).
    ``direct``: read with O_DIRECT (bypasses the page cache; falls back to buffered reads where unsupported).
    """

    def __init__(self, manifest: Manifest, rank: int, verify: bool = True, direct: bool = False) -> None:
        self.manifest, self.rank, self.verify, self.direct = manifest, rank, verify, direct
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
        self._fd: int | None = None
        self._checked: set[str] = set()

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
        """The stored parts of ``name``, read with ``pread`` into new tensors (owned memory, no mapped pages
        counted in RSS); with ``direct`` through O_DIRECT into 4 KiB-aligned buffers (no page-cache copy)."""
        info = self.tensor_info(name)
        if self._fd is None:
            self._open()
        out = {}
        for k, e in info.parts.items():
            tdtype, _ = ST_DTYPES[e.dtype]
            out[k] = self._read(e.start, e.nbytes, f"tensor {name}: part {k}").view(tdtype).reshape(e.shape)
        if self.verify and name not in self._checked:
            for comp, t in out.items():
                if sha256_of(t) != self._sha[(name, comp)]:
                    raise ShardedLayoutError(f"{self.path}: tensor {name}: {comp} fails its SHA-256 check "
                                             "(file corrupted?)")
            self._checked.add(name)
        return out

    def _open(self) -> None:
        self._fd = None
        if self.direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:             # a filesystem without O_DIRECT (tmpfs): buffered reads
                self._fd = None
        self._aligned = self._fd is not None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)

    def _read(self, offset: int, nbytes: int, what: str) -> torch.Tensor:
        """``nbytes`` at ``offset`` (a multiple of ALIGN) into a new uint8 tensor."""
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8)
        span = -(-nbytes // ALIGN) * ALIGN if self._aligned else nbytes
        if self._aligned:   # O_DIRECT: buffer address and length aligned to 4 KiB; reading into the padding is harmless
            alloc = torch.empty(span + ALIGN, dtype=torch.uint8)
            shift = (-alloc.data_ptr()) % ALIGN
            buf = alloc[shift:shift + span]
        else:
            buf = torch.empty(span, dtype=torch.uint8)
        mv = memoryview(buf.numpy())
        got = 0
        while got < nbytes:
            try:
                n = os.preadv(self._fd, [mv[got:]], offset + got)
            except OSError:
                if not self._aligned:
                    raise
                os.close(self._fd)          # O_DIRECT refused at read time (e.g. overlayfs): buffered from now on
                self._fd, self._aligned, self.direct = os.open(self.path, os.O_RDONLY), False, False
                return self._read(offset, nbytes, what)
            if n <= 0:
                raise ShardedLayoutError(f"{self.path}: {what}: the file ends inside it")
            got += n
            if self._aligned and got < nbytes and got % ALIGN:
                raise ShardedLayoutError(f"{self.path}: {what}: short O_DIRECT read")
        return buf[:nbytes]

    def dequantize(self, name: str) -> torch.Tensor:
        info = self.tensor_info(name)
        return decode(info, self.raw(name))       # raw() owns its memory: no copy needed

    def release(self, name: str) -> None:
        """Nothing to release (``raw`` returns owned tensors); kept for the ``Checkpoint`` interface."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
