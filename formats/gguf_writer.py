"""Streaming GGUF v3 writer: metadata and every tensor info first, then tensor data one at a time.

gguf-py's ``GGUFWriter.add_tensor`` keeps every array in RAM until the end; here each tensor is a
``TensorSpec`` whose ``produce()`` is called only when its bytes are written, so peak memory is one
tensor (plus whatever its producer needs). Splits follow llama.cpp (``llama_split_path``):
``NAME-00001-of-00003.gguf``; every split carries ``split.no`` (u16), ``split.count`` (u16) and
``split.tensors.count`` (i32); only the first carries the model metadata. Files are written under a
temporary name (``.partial``) and renamed once complete.

Every file's header is known before any data (``layout_files``: KVs, tensor infos, offsets from
``TensorSpec.nbytes``), so a writer may also pre-size the file and fill tensors in any order with
``write_tensor`` (``os.pwrite`` at the planned offset): ``v4convert.export.gguf.engine`` does that with
workers, a journal and resume. ``write_gguf`` here is the plain in-order writer (small files: imatrix).

File layout (ggml ``docs/gguf.md``): magic ``GGUF``, version u32 = 3, tensor count u64, KV count u64,
KV pairs (string key, u32 value type, value), tensor infos (name, n_dims u32, ``ne`` u64 x n_dims with
``ne[0]`` the innermost axis, ggml type u32, data offset u64), padding to ``ALIGNMENT``, data (each
tensor padded to ``ALIGNMENT``).
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .direct_io import DirectStream, pwrite_full
from .sharding import group_in_order
from v4convert.errors import UserError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32          # general.alignment default


Buffer = torch.Tensor | np.ndarray | bytes


class GGUFWriteError(UserError):
    """A tensor or metadata entry that cannot be written as declared (message names the file and tensor)."""


# --------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class KV:
    """One metadata entry; ``elem`` is the element type of an ARRAY."""
    key: str
    vtype: GGUFValueType
    value: Any
    elem: GGUFValueType | None = None


class Metadata:
    """Ordered GGUF metadata with typed adders; duplicate keys raise."""

    def __init__(self) -> None:
        self._kv: dict[str, KV] = {}

    def _add(self, kv: KV) -> None:
        if kv.key in self._kv:
            raise GGUFWriteError(f"metadata key {kv.key!r} set twice")
        self._kv[kv.key] = kv

    def u16(self, key: str, v: int) -> None:
        self._add(KV(key, GGUFValueType.UINT16, int(v)))

    def u32(self, key: str, v: int) -> None:
        self._add(KV(key, GGUFValueType.UINT32, int(v)))

    def i32(self, key: str, v: int) -> None:
        self._add(KV(key, GGUFValueType.INT32, int(v)))

    def f32(self, key: str, v: float) -> None:
        self._add(KV(key, GGUFValueType.FLOAT32, float(v)))

    def bool(self, key: str, v: bool) -> None:
        self._add(KV(key, GGUFValueType.BOOL, bool(v)))

    def str(self, key: str, v: str) -> None:
        self._add(KV(key, GGUFValueType.STRING, str(v)))

    def arr(self, key: str, values: Sequence[Any], elem: GGUFValueType) -> None:
        self._add(KV(key, GGUFValueType.ARRAY, list(values), elem))

    def __contains__(self, key: str) -> bool:
        return key in self._kv

    def __getitem__(self, key: str) -> Any:
        return self._kv[key].value

    def entries(self) -> list[KV]:
        return list(self._kv.values())


_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP_DTYPE: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_kv(kv: KV) -> bytes:
    out = [_string(kv.key), struct.pack("<I", int(kv.vtype))]
    if kv.vtype == GGUFValueType.STRING:
        out.append(_string(kv.value))
    elif kv.vtype == GGUFValueType.ARRAY:
        if kv.elem is None or kv.elem == GGUFValueType.ARRAY:
            raise GGUFWriteError(f"metadata key {kv.key!r}: array needs a scalar or string element type")
        out.append(struct.pack("<IQ", int(kv.elem), len(kv.value)))
        if kv.elem == GGUFValueType.STRING:
            out.extend(_string(v) for v in kv.value)
        else:
            out.append(np.asarray(kv.value, dtype=_NP_DTYPE[kv.elem]).tobytes())
    else:
        out.append(struct.pack(_SCALAR_FMT[kv.vtype], kv.value))
    return b"".join(out)


# ---------------------------------------------------------------------------------------- tensors
def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of element ``shape`` (outermost first) stored as ``qtype``."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % bs != 0:
        raise GGUFWriteError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block ({bs})")
    return math.prod(shape) // bs * ts


@dataclass
class TensorSpec:
    """A tensor to write: element ``shape`` in torch order (outermost first; ggml ``ne`` is the reverse),
    its ggml type, and a producer of its bytes: one buffer (uint8-viewable tensor / numpy array / bytes)
    or an iterator of consecutive buffers (e.g. one expert of a stacked ``[E, out, in]`` tensor at a time).
    ``parts``: optionally the same bytes as independent producers of equal slices (``nbytes / len(parts)``
    each, in order: one per expert), so a parallel writer can encode them apart; ``produce`` must give
    their concatenation."""
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    produce: Callable[[], Buffer | Iterable[Buffer]]
    parts: Sequence[Callable[[], Buffer]] | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.name.encode()) >= 64:            # GGML_MAX_NAME
            raise GGUFWriteError(f"tensor {self.name}: name longer than 63 bytes")
        try:
            self.nbytes = tensor_nbytes(self.shape, self.qtype)
        except GGUFWriteError as e:
            raise GGUFWriteError(f"tensor {self.name}: {e}") from None
        if self.parts is not None and (not self.parts or self.nbytes % len(self.parts)):
            raise GGUFWriteError(f"tensor {self.name}: {self.nbytes} bytes do not split into {len(self.parts)} "
                                 f"equal parts")


def _pad(n: int) -> int:
    return (-n) % ALIGNMENT


def _as_bytes(data: Buffer) -> memoryview:
    if isinstance(data, torch.Tensor):
        data = data.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    return memoryview(data)


def split_names(path: Path, n: int) -> list[Path]:
    """``X.gguf`` -> ``[X.gguf]`` for one file, else ``X-00001-of-0000n.gguf`` ... (llama.cpp's pattern)."""
    if n == 1:
        return [path]
    stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
    return [path.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def plan_splits(tensors: Sequence[TensorSpec], max_bytes: int | None) -> list[list[TensorSpec]]:
    """In-order grouping into files of at most ``max_bytes`` tensor data (a tensor never splits)."""
    return group_in_order(tensors, [t.nbytes for t in tensors], max_bytes)


@dataclass
class FileLayout:
    """One GGUF file as planned: its final path, its header (KVs + tensor infos, zero-padded to
    ``ALIGNMENT``: the first data byte is at ``len(header)``), each tensor's absolute data offset, and the
    file's total size in bytes (every tensor padded to ``ALIGNMENT``)."""
    path: Path
    tensors: list[TensorSpec]
    header: bytes
    offsets: list[int]
    size: int


def file_header(kvs: Sequence[KV], tensors: Sequence[TensorSpec]) -> tuple[bytes, list[int], int]:
    """(padded header bytes, absolute data offset per tensor, file size) of one GGUF file."""
    head = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    head.extend(_encode_kv(kv) for kv in kvs)
    rel, offset = [], 0
    for t in tensors:
        ne = tuple(reversed(t.shape)) or (1,)
        head.append(_string(t.name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                    + struct.pack("<IQ", int(t.qtype), offset))
        rel.append(offset)
        offset += t.nbytes + _pad(t.nbytes)
    header = b"".join(head)
    header += b"\0" * _pad(len(header))
    return header, [len(header) + r for r in rel], len(header) + offset


def layout_files(path: str | os.PathLike, metadata: Metadata, tensors: Iterable[TensorSpec],
                 split_max_size: int | None = None, every_split: Sequence[KV] = ()) -> list[FileLayout]:
    """The files ``write_gguf`` writes for these arguments (one, or the splits), headers included."""
    path = Path(path)
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise GGUFWriteError(f"{path}: tensor {dup} declared twice")
    groups = plan_splits(tensors, split_max_size)
    out = []
    for i, (group, final) in enumerate(zip(groups, split_names(path, len(groups)))):
        kvs = metadata.entries() if i == 0 else list(every_split)
        if len(groups) > 1:
            kvs = kvs + [KV("split.no", GGUFValueType.UINT16, i), KV("split.count", GGUFValueType.UINT16, len(groups)),
                         KV("split.tensors.count", GGUFValueType.INT32, len(tensors))]
        header, offsets, size = file_header(kvs, group)
        out.append(FileLayout(final, group, header, offsets, size))
    return out


def _chunks(out: Buffer | Iterable[Buffer]) -> Iterable[Buffer]:
    return [out] if isinstance(out, (torch.Tensor, np.ndarray, bytes, bytearray, memoryview)) else out


def write_tensor(fd: int, path: Path, t: TensorSpec, offset: int, part: int | None = None,
                 progress: Callable[[int], None] | None = None, direct: bool = False) -> int:
    """Produce tensor ``t`` (or only its slice ``parts[part]``) and ``os.pwrite`` it at ``offset`` (the
    tensor's data offset; a part lands at ``offset + part * nbytes / len(parts)``). Checks the producer gave
    exactly the declared bytes (``path`` names the file in the error). Padding is not written: the caller's
    file is pre-sized with zeros. ``direct``: the whole 4 KiB pages of the range go O_DIRECT through an aligned
    window (``direct_io.DirectStream``; neighbours' shared pages buffered), same bytes. Returns the bytes
    written; ENOSPC raises ``OSError`` (the caller names it)."""
    want = t.nbytes
    if part is not None:
        assert t.parts is not None
        want = t.nbytes // len(t.parts)
        offset += part * want
        src: Iterable[Buffer] = _chunks(t.parts[part]())
    else:
        src = _chunks(t.produce())
    stream = DirectStream(path, fd, offset, offset + want) if direct else None
    written = 0
    try:
        for chunk in src:
            data = _as_bytes(chunk)
            data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
            if written + data.nbytes > want:
                written += data.nbytes
                break
            if stream is not None:
                stream.write(data)
            else:
                pwrite_full(fd, data, offset + written)
            written += data.nbytes
            if progress is not None:
                progress(data.nbytes)
            del data, chunk
        if stream is not None and written == want:
            stream.close()
    finally:
        if stream is not None:
            stream.abandon()
    if written != want:
        what = f"tensor {t.name}" + (f" part {part}" if part is not None else "")
        raise GGUFWriteError(f"{path}: {what}: producer gave {'over ' if written > want else ''}"
                             f"{written} bytes, declared {want} ({t.qtype.name} {list(t.shape)})")
    return written


def write_gguf(path: str | os.PathLike, metadata: Metadata, tensors: Iterable[TensorSpec],
               split_max_size: int | None = None, progress: Callable[[int], None] | None = None,
               every_split: Sequence[KV] = ()) -> list[Path]:
    """Write ``metadata`` and ``tensors`` to ``path`` (or its splits) in order; returns the final file paths.
    ``every_split``: KVs written into every split (the first gets them with ``metadata``).

    Tensor infos of a file are all written before its first data byte; each tensor's ``produce`` is
    called once, in order, and its result is dropped after writing. ``progress(n)`` gets byte counts.
    Each file is written as ``NAME.partial`` and renamed when all are complete; removed on any error.
    """
    files = layout_files(path, metadata, tensors, split_max_size, every_split)
    temps = [f.path.with_name(f.path.name + ".partial") for f in files]
    try:
        for f, tmp in zip(files, temps):
            _write_one(tmp, f, progress)
        for f, tmp in zip(files, temps):
            os.replace(tmp, f.path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return [f.path for f in files]


def _write_one(path: Path, layout: FileLayout, progress: Callable[[int], None] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, layout.header)                       # every tensor info before the first data byte
        for t, off in zip(layout.tensors, layout.offsets):
            write_tensor(fd, path, t, off, progress=progress)
            os.pwrite(fd, b"\0" * _pad(t.nbytes), off + t.nbytes)
    finally:
        os.close(fd)
