"""Safetensors read (mmap, validated) and streaming write, without loading whole files.

File layout (safetensors spec): 8-byte little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then
the data block; offsets are relative to the data block start.

We parse the header ourselves so that every defect (truncated file, header past the end,
offsets out of range, byte count that contradicts dtype x shape) is reported with the file and
tensor name, and so that we can write a file tensor by tensor (header first, data streamed).
"""
from __future__ import annotations

import itertools
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from v4convert.errors import UserError

# safetensors dtype string -> (torch dtype, bytes per element). F8_E8M0 is read as uint8
# (raw exponent bytes); torch's float8_e8m0fnu is used only where a caller asks for it.
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),     # MLX packed quantized weights (read as raw words)
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E8M0": (torch.uint8, 1),
}
TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_TO_ST[torch.float8_e8m0fnu] = "F8_E8M0"

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class FormatError(UserError):
    """A file that is not what it claims to be. The message names the file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: dtype string, shape, absolute byte range in ``path``."""
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# Header JSON nesting: {name: {"shape": [..]}} is 3 deep; anything deeper is not a safetensors header
# (and a 200,000-deep one would exhaust the JSON parser's recursion limit).
MAX_HEADER_DEPTH = 3
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')     # unrolled: linear, no per-char alternation


def json_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, without parsing it (strings skipped; linear time)."""
    stripped = _JSON_STRING.sub(b"", raw)
    a = np.frombuffer(stripped, dtype=np.uint8)
    step = np.isin(a, (0x5B, 0x7B)).astype(np.int32) - np.isin(a, (0x5D, 0x7D)).astype(np.int32)
    return int(np.cumsum(step).max()) if step.size else 0


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


class _DuplicateKey(Exception):
    pass


def load_json(raw: bytes, where: str, max_depth: int) -> object:
    """Parse JSON from a file we read: invalid UTF-8/JSON, duplicate keys and nesting deeper than
    ``max_depth`` raise :class:`FormatError` naming ``where`` (checked before the parser recurses)."""
    if json_depth(raw) > max_depth:
        raise FormatError(f"{where}: JSON nested deeper than {max_depth} levels (not a valid file of this kind)")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise FormatError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: invalid JSON ({e})") from None
    except _DuplicateKey as e:
        raise FormatError(f"{where}: key {e.args[0]!r} appears twice") from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (entries by name, metadata).

    The rules are the safetensors library's: an 8-byte length, a JSON object of at most MAX_HEADER
    bytes starting with ``{``; each entry has a known dtype string, a shape of non-negative ints and
    ``data_offsets`` of two ints with ``begin <= end``, ``end - begin = numel x dtype size``; sorted
    by offset the tensors tile the data block exactly (contiguous, no overlap, no hole, nothing after);
    ``__metadata__`` maps strings to strings. Every violation raises naming the file (and tensor).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{path}: shard file is missing") from None
    if size < 8:
        raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    if not raw.startswith(b"{"):
        raise FormatError(f"{path}: header does not start with '{{' (not a safetensors file)")
    header = load_json(raw, f"{path}: header", MAX_HEADER_DEPTH)
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    base = 8 + n
    data_len = size - base
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise FormatError(f"{path}: tensor {name}: header entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise FormatError(f"{path}: tensor {name}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise FormatError(f"{path}: tensor {name}: shape {shape!r} is not a list of integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise FormatError(f"{path}: tensor {name}: data_offsets {offs!r} is not a pair of integers")
        b, e = offs
        numel = 1
        for d in shape:
            if d < 0:
                raise FormatError(f"{path}: tensor {name}: negative dimension in shape {list(shape)}")
            numel *= d
        if not (0 <= b <= e):
            raise FormatError(f"{path}: tensor {name}: bad data_offsets [{b}, {e}]")
        if e - b != numel * ST_DTYPES[dtype][1]:
            raise FormatError(
                f"{path}: tensor {name}: {e - b} bytes stored but {dtype} {list(shape)} needs "
                f"{numel * ST_DTYPES[dtype][1]}")
        if e > data_len:
            raise FormatError(
                f"{path}: tensor {name}: data ends at byte {base + e} but the file has {size} bytes "
                f"(truncated shard?)")
        entries[name] = TensorEntry(name, path, dtype, tuple(shape), base + b, base + e)
    order = sorted(entries.values(), key=lambda t: (t.start, t.end))
    for prev, t in itertools.pairwise(order):          # overlap first: the most dangerous defect
        if t.start < prev.end:
            raise FormatError(f"{path}: tensor {t.name}: data_offsets {[t.start - base, t.end - base]} overlaps "
                              f"tensor {prev.name} {[prev.start - base, prev.end - base]}")
    pos, after = base, "the header"
    for t in order:                                # then the tiling: no gap, nothing after the last
        if t.start != pos:
            raise FormatError(f"{path}: tensor {t.name}: data_offsets {[t.start - base, t.end - base]} leave a "
                              f"gap of {t.start - pos} bytes after {after}")
        pos, after = t.end, f"tensor {t.name}"
    if pos != size:
        raise FormatError(f"{path}: {size - pos} bytes after the last tensor that no tensor covers")
    return entries, meta


class MappedFile:
    """A read-only memory map of one file; tensors are views into it (no copy, no full read)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        # ACCESS_COPY gives a writable (copy-on-write) buffer so torch.frombuffer does not warn;
        # pages are only read when touched and never written back.
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        tdtype, _ = ST_DTYPES[entry.dtype]
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=tdtype)
        t = torch.frombuffer(self._mm, dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
        return t.view(tdtype).reshape(entry.shape)

    def release(self, entry: TensorEntry) -> None:
        """Drop the resident pages of ``entry``'s byte range (they are re-read from disk if touched).

        Pages of a file mapping count toward the process RSS while mapped; a streaming pass calls
        this after each tensor so RSS stays at a few tensors instead of growing to the file size.
        Safe because we never write through the mapping.
        """
        if self._mm is None or entry.nbytes == 0:
            return
        start = (entry.start // mmap.PAGESIZE) * mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, entry.end - start)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the map closes when they are collected
                pass
        self._f.close()


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: its dtype string, shape and a callable producing its data."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = ST_DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def header_bytes(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length + JSON header for tensors written in the given order (padded to 8)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape in tensors:
        n = ST_DTYPES[dtype][1]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a contiguous CPU tensor (no copy when already contiguous)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def write_streaming(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None,
                    on_bytes: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file producing one tensor at a time.

    ``produce()`` returns the tensor, or an iterable of row chunks (concatenated along dim 0) so
    that even one huge tensor is never whole in memory. Writes ``path.tmp`` and renames it onto
    ``path`` only when complete; on any error the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header_bytes(((t.name, t.dtype, t.shape) for t in tensors), metadata))
            for t in tensors:
                out = t.produce()
                chunks = [out] if isinstance(out, torch.Tensor) else out
                written = 0
                for data in chunks:
                    if ST_DTYPES[t.dtype][1] != data.element_size() or tuple(data.shape[1:]) != tuple(t.shape[1:]):
                        raise FormatError(f"{path}: tensor {t.name}: produced {data.dtype} {list(data.shape)}, "
                                          f"planned {t.dtype} {list(t.shape)}")
                    buf = tensor_bytes(data)
                    f.write(buf)
                    written += buf.nbytes
                    if on_bytes:
                        on_bytes(buf.nbytes)
                    del data, buf
                if written != t.nbytes:
                    raise FormatError(f"{path}: tensor {t.name}: produced {written} bytes, planned {t.nbytes}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def iter_entries(entries: dict[str, TensorEntry]) -> Iterator[TensorEntry]:
    """Entries in file order (by start offset): the order that reads a file sequentially."""
    return iter(sorted(entries.values(), key=lambda e: e.start))
