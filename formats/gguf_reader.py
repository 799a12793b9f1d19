"""A validating GGUF header reader: everything a file declares is checked before it is trusted.

GGUF layout (ggml docs/gguf.md): ``"GGUF"``, u32 version (2 or 3), u64 tensor count, u64 KV count; KV
pairs (string key, u32 value type, value); tensor infos (string name, u32 n_dims <= 4, u64 dims, u32
ggml type, u64 offset relative to the data section); padding to ``general.alignment`` (default 32);
the data section. Strings are u64 length + UTF-8 bytes; arrays are u32 element type + u64 count.

Every count is bounded by the bytes left in the file before anything is allocated, nesting is bounded,
keys and tensor names must be unique, and each tensor's byte range must lie inside the file, be aligned
and not overlap another. We run this before handing a file to llama.cpp (which trusts its input) or to
gguf-py's reader, so a damaged file gives ``GGUFFormatError: FILE: ...`` instead of a crash or a hang.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from v4convert.errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4                     # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2              # arrays of arrays are legal; deeper nesting no writer produces
DEFAULT_ALIGNMENT = 32

# value type -> (struct format, size); 8 = string, 9 = array
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9
_MIN_SIZE = {**{t: s for t, (_, s) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}


class GGUFFormatError(UserError):
    """A GGUF file that breaks the format; the message names the file (and key or tensor)."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]          # ggml order (ne0 first: the contiguous dimension)
    qtype: GGMLQuantizationType
    start: int                      # absolute byte range in the file
    end: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    kvs: dict[str, object]
    tensors: list[GGUFTensorInfo]
    data_start: int


class _Cursor:
    """Reads little-endian values from a file, never past its end."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path}: {what} runs past the end of the file "
                                  f"(needs {n} bytes at offset {self.pos}, file has {self.size})")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFFormatError(f"{self.path}: short read at offset {self.pos} ({what})")
        self.pos += n
        return b

    def scalar(self, fmt: str, size: int, what: str):
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", 8, what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self.path}: {what} is not valid UTF-8") from None

    def left(self) -> int:
        return self.size - self.pos


def _value(c: _Cursor, vtype: int, what: str, depth: int = 0):
    if vtype in _SCALARS:
        return c.scalar(*_SCALARS[vtype], what)
    if vtype == _STRING:
        return c.string(what)
    if vtype == _ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFFormatError(f"{c.path}: {what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = c.scalar("<I", 4, what)
        count = c.scalar("<Q", 8, what)
        if etype not in _MIN_SIZE:
            raise GGUFFormatError(f"{c.path}: {what}: unknown array element type {etype}")
        if count * _MIN_SIZE[etype] > c.left():     # bound before allocating
            raise GGUFFormatError(f"{c.path}: {what}: array of {count} elements cannot fit in the "
                                  f"{c.left()} bytes left")
        if etype in _SCALARS and etype != 7:
            fmt, size = _SCALARS[etype]
            raw = c.take(count * size, what)
            return list(struct.unpack(f"<{count}{fmt[1]}", raw))
        return [_value(c, etype, what, depth + 1) for _ in range(count)]
    raise GGUFFormatError(f"{c.path}: {what}: unknown value type {vtype}")


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a ggml tensor: rows of ``ne0`` elements in blocks of ``block`` elements."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape[1:]:
        n *= d
    return n * (shape[0] // block) * type_size


def read_gguf_header(path: str | os.PathLike, *, tensors: bool = True) -> GGUFHeader:
    """Parse and validate the header of one GGUF file (``tensors=False``: stop after the KVs)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GGUFFormatError(f"{path}: cannot open ({e.strerror})") from None
    with open(path, "rb") as f:
        c = _Cursor(f, size, path)
        if c.take(min(4, size), "magic") != MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file (no GGUF magic)")
        if size < 24:
            raise GGUFFormatError(f"{path}: truncated GGUF file ({size} bytes; the fixed header has 24)")
        version = c.scalar("<I", 4, "version")
        if version not in VERSIONS:
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version} (reads {VERSIONS})")
        n_tensors = c.scalar("<Q", 8, "tensor count")
        n_kv = c.scalar("<Q", 8, "KV count")
        if n_kv * 12 > c.left() or n_tensors * 24 > c.left():
            raise GGUFFormatError(f"{path}: declares {n_kv} KV pairs and {n_tensors} tensors, more than "
                                  f"its {size} bytes can hold")
        kvs: dict[str, object] = {}
        for i in range(n_kv):
            key = c.string(f"key of KV {i}")
            if key in kvs:
                raise GGUFFormatError(f"{path}: KV {key!r} appears twice")
            vtype = c.scalar("<I", 4, f"type of KV {key!r}")
            kvs[key] = _value(c, vtype, f"KV {key!r}")
        if not tensors:
            return GGUFHeader(path, version, kvs, [], 0)
        align = kvs.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"{path}: general.alignment {align!r} is not a positive power of two")
        raw: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}")
            if name in names:
                raise GGUFFormatError(f"{path}: tensor {name}: declared twice")
            names.add(name)
            nd = c.scalar("<I", 4, f"tensor {name}")
            if not 1 <= nd <= MAX_DIMS:
                raise GGUFFormatError(f"{path}: tensor {name}: {nd} dimensions (ggml allows 1..{MAX_DIMS})")
            shape = struct.unpack(f"<{nd}Q", c.take(8 * nd, f"tensor {name}"))
            t = c.scalar("<I", 4, f"tensor {name}")
            try:
                qtype = GGMLQuantizationType(t)
                GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{path}: tensor {name}: unknown ggml type {t}") from None
            if shape[0] % GGML_QUANT_SIZES[qtype][0]:
                raise GGUFFormatError(f"{path}: tensor {name}: row of {shape[0]} is not a whole number of "
                                      f"{qtype.name} blocks ({GGML_QUANT_SIZES[qtype][0]})")
            off = c.scalar("<Q", 8, f"tensor {name}")
            raw.append((name, tuple(shape), qtype, off))
        data_start = -(-c.pos // align) * align
        infos: list[GGUFTensorInfo] = []
        for name, shape, qtype, off in raw:
            if off % align:
                raise GGUFFormatError(f"{path}: tensor {name}: data offset {off} is not aligned to {align}")
            start = data_start + off
            end = start + tensor_nbytes(shape, qtype)
            if end > size:
                raise GGUFFormatError(f"{path}: tensor {name}: data ends at byte {end} but the file has "
                                      f"{size} bytes (truncated?)")
            infos.append(GGUFTensorInfo(name, shape, qtype, start, end))
        prev = None
        for t in sorted(infos, key=lambda t: (t.start, t.end)):
            if prev is not None and t.start < prev.end and t.end > t.start:
                raise GGUFFormatError(f"{path}: tensor {t.name}: data overlaps tensor {prev.name}")
            if prev is None or t.end > prev.end:
                prev = t
    return GGUFHeader(path, version, kvs, infos, data_start)
