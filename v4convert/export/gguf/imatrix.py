"""llama.cpp importance matrix files: read (GGUF and legacy ``.dat``), write (GGUF), and the per-tensor weights
llama.cpp's quantizer takes.

Source (facts only): llama.cpp 0c1e570 as vendored in llama-cpp-python 0.3.36 — ``tools/imatrix/imatrix.cpp``
(``save_imatrix``), ``common/imatrix-loader.cpp`` (``common_imatrix_load``), ``tools/quantize/quantize.cpp``
(``load_imatrix``, the ``quantize.imatrix.*`` keys) and ``src/llama-quant.cpp`` (the size check).

GGUF layout: KVs ``general.type = "imatrix"``, ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (u32; llama-quantize refuses a GGUF imatrix without all three). Per weight tensor NAME
(the model GGUF's tensor name, e.g. ``blk.3.ffn_down_exps.weight``): ``NAME.in_sum2`` F32 with ggml ne
``{K, n_mat}`` (numpy ``[n_mat, K]``): raw sums over tokens of x_j^2 per input column j, and ``NAME.counts`` F32
ne ``{1, n_mat}``: tokens seen per matrix (n_mat = experts for a stacked ``_exps`` tensor, else 1).

Legacy ``.dat``: i32 n_entries; per entry i32 len, name bytes, i32 ncall, i32 nval, f32 values[nval] (which are
mean x^2 times ncall); optionally i32 chunk count, i32 len, dataset name.

The quantizer (``load_imatrix``) takes per tensor ``sums / counts`` per matrix (a matrix with count 0 -> all 1:
uniform), legacy ``values / ncall``; ``llama-quant.cpp`` aborts when an entry's size differs from the tensor's
``ne0 * ne2``, ignores entries of tensors the model lacks and quantizes tensors without an entry as without
an imatrix. Q8_0 / F16 / MXFP4 ignore the imatrix; K-quants, Q4_0..Q5_1 (fallbacks) and IQ types use it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType

from v4convert.errors import UserError

KV_TYPE = "general.type"
KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM2, COUNTS = ".in_sum2", ".counts"
# keys llama-quantize writes into its output when it used an imatrix (quantize.cpp LLM_KV_QUANTIZE_IMATRIX_*)
OUT_FILE, OUT_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
OUT_ENTRIES, OUT_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"


class ImatrixError(UserError):
    """An importance matrix file that cannot be read or does not fit the model."""


@dataclass
class Imatrix:
    """``entries``: GGUF weight name -> (sums float32 ``[n_mat, K]``, counts float32 ``[n_mat]``)."""
    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    legacy: bool = False          # read from a ``.dat`` file: sums are mean x^2 * ncall, counts = [ncall]

    def weights(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer gets per tensor (``quantize.cpp load_imatrix``): float32 flat ``n_mat * K``,
        ``sums / count`` per matrix, uniform 1 for a matrix that saw no token (legacy: ``values / ncall``)."""
        out = {}
        for name, (s, c) in self.entries.items():
            s = s.astype(np.float32).reshape(len(c), -1)
            c = c.astype(np.float32).reshape(-1, 1)
            if self.legacy:
                w = s / c if c[0, 0] > 0 else s
            else:
                w = np.where(c > 0, s / np.where(c > 0, c, 1), np.float32(1))
            out[name] = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
        return out


def write_imatrix(path: Path, im: Imatrix, extra: dict[str, str] | None = None) -> Path:
    """Write ``im`` as a GGUF imatrix to ``path`` (``.partial`` then rename, formats.gguf_writer); ``extra``: more
    string KVs (our output marker). Tensors in name order, ``in_sum2`` before ``counts`` like llama-imatrix."""
    from v4convert.formats.gguf_writer import Metadata, TensorSpec, write_gguf

    md = Metadata()
    md.str(KV_TYPE, "imatrix")
    md.arr(KV_DATASETS, list(im.datasets), GGUFValueType.STRING)
    md.u32(KV_CHUNK_COUNT, int(im.chunk_count))
    md.u32(KV_CHUNK_SIZE, int(im.chunk_size))
    for k, v in (extra or {}).items():
        md.str(k, v)
    specs = []
    for name in sorted(im.entries):
        s, c = im.entries[name]
        s = np.ascontiguousarray(s, dtype=np.float32).reshape(len(c), -1)        # [n_mat, K]: ne {K, n_mat}
        c = np.ascontiguousarray(c, dtype=np.float32).reshape(-1, 1)             # [n_mat, 1]: ne {1, n_mat}
        specs.append(TensorSpec(name + SUM2, s.shape, Q.F32, lambda s=s: s))
        specs.append(TensorSpec(name + COUNTS, c.shape, Q.F32, lambda c=c: c))
    return write_gguf(path, md, specs)[0]


def _read_legacy(path: Path, data: bytes) -> Imatrix:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise ImatrixError(f"{path}: truncated legacy imatrix (byte {pos})")
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n,) = take("<i")
    if n < 1:
        raise ImatrixError(f"{path}: not an imatrix (neither GGUF nor a legacy .dat with entries)")
    entries = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln < 1 or ln > 4096:
            raise ImatrixError(f"{path}: not an imatrix (entry name length {ln})")
        name = take(f"<{ln}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name}: {nval} values")
        vals = np.frombuffer(data, np.float32, nval, pos).copy()
        if pos + 4 * nval > len(data):
            raise ImatrixError(f"{path}: truncated legacy imatrix (entry {name})")
        pos += 4 * nval
        entries[name] = (vals.reshape(1, -1), np.array([ncall], np.float32))
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if 0 < ln <= len(data) - pos:
                datasets.append(take(f"<{ln}s")[0].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunks, 0, legacy=True)


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix written by us or by llama.cpp's ``llama-imatrix`` (GGUF, or the legacy ``.dat``)."""
    from v4convert.formats.gguf_reader import GGUFFormatError, read_gguf_header

    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return _read_legacy(path, path.read_bytes())
    try:
        h = read_gguf_header(path)
    except GGUFFormatError as e:
        raise ImatrixError(str(e)) from None
    missing = [k for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE) if k not in h.kvs]
    if missing:
        raise ImatrixError(f"{path}: not a llama.cpp imatrix (no {', '.join(missing)}; llama-quantize refuses it)")
    by = {t.name: t for t in h.tensors}
    names = sorted({n[: -len(SUM2)] for n in by if n.endswith(SUM2)} | {n[: -len(COUNTS)] for n in by if n.endswith(COUNTS)})
    if not names:
        raise ImatrixError(f"{path}: imatrix has no entries")
    entries = {}
    with open(path, "rb") as f:
        def arr(t) -> np.ndarray:
            if t.qtype != Q.F32:
                raise ImatrixError(f"{path}: tensor {t.name}: {t.qtype.name}, llama.cpp needs F32")
            f.seek(t.start)
            return np.frombuffer(f.read(t.end - t.start), np.float32).copy()
        for n in names:
            s, c = by.get(n + SUM2), by.get(n + COUNTS)
            if s is None or c is None:
                raise ImatrixError(f"{path}: entry {n}: mismatched sums and counts (one of {SUM2}/{COUNTS} missing)")
            sv, cv = arr(s), arr(c)
            if len(cv) == 0 or len(sv) % len(cv):
                raise ImatrixError(f"{path}: entry {n}: {len(sv)} sums do not split into {len(cv)} matrices")
            if not (np.isfinite(sv).all() and np.isfinite(cv).all()):
                raise ImatrixError(f"{path}: entry {n}: non-finite values (llama.cpp refuses them)")
            entries[n] = (sv.reshape(len(cv), -1), np.round(cv))   # the loader rounds counts to integers
    ds = h.kvs[KV_DATASETS]
    return Imatrix(entries, [str(x) for x in (ds if isinstance(ds, list) else [ds])],
                   int(h.kvs[KV_CHUNK_COUNT]), int(h.kvs[KV_CHUNK_SIZE]))


def check_fits(im: Imatrix, path: Path, tensors: dict[str, tuple[int, ...]]) -> list[str]:
    """Entries of ``im`` that match a tensor of the model (``tensors``: GGUF name -> ggml ne) and have its size
    ``ne0 * ne2`` (llama-quant.cpp aborts otherwise, so we refuse first with the tensor's name)."""
    used = []
    for name, w in im.weights().items():
        ne = tensors.get(name)
        if ne is None:
            continue
        want = ne[0] * (ne[2] if len(ne) > 2 else 1)
        if w.size != want and not name.startswith("token_embd"):
            raise ImatrixError(f"{path}: entry {name}: {w.size} values, the model's tensor needs {want} "
                               f"(ne {list(ne)}): an imatrix of another model?")
        if w.size == want:
            used.append(name)
    return used
