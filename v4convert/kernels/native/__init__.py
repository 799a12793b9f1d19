"""Native (C) kernel for the FP8-block -> NVFP4 RTN hot path, bit-identical to the torch codec.

``fp8_nvfp4.c`` (plain C99 + pthreads) is compiled at first use with the system C compiler into
``~/.cache/v4convert/native/<hash of source and flags>/`` (written under a temporary name, then
renamed, so concurrent workers never load a half-written library) and called through ctypes on
contiguous CPU buffers; the C code splits rows over ``threads`` pthreads (ctypes releases the GIL).

Stages let the engine share a global amax between fused partners. Hot path (fused, issue 16):
:func:`fp8_amax_native` (the tensor amax alone, from each 128x128 block's max magnitude byte) then
:func:`fp8_encode_fused_native` (E4M3 block scales + packed codes for one global scale, each 16-block's amax
recomputed from its bytes, optionally into caller buffers). Two-stage reference mirroring
:mod:`v4convert.formats.nvfp4`'s public stages: :func:`fp8_block_amax_native` (block amax array + tensor amax)
then :func:`fp8_encode_native`. Both give the same bytes (tests/test_native_codec.py).
:func:`fp8_block_to_nvfp4_native` is the one-call equivalent of ``fp8_block_to_nvfp4`` (fused path).

:func:`load_library` is the build-and-load step every C kernel here shares (``gguf.py``: FP8-block ->
GGUF bytes and the MXFP4 re-pack, from ``fp8_gguf.c``; ``repack.py``: MXFP4 -> NVFP4 re-pack, from ``mxfp4_nvfp4.c``).

There is no silent fallback: without a compiler the first call raises :class:`NativeUnavailableError`;
callers choose :class:`Kernel` explicitly.
"""
from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from v4convert.formats.blocks import FP8_BLOCK
from v4convert.formats.fp4 import BlockShapeError, CodecInputError, NonFiniteInputError
from v4convert.formats.fp8_block import FP8BlockTensor, FP8ScaleFormat
from v4convert.formats.nvfp4 import NVFP4_BLOCK, NVFP4Convention, NVFP4Tensor, nvfp4_global_scale
from v4convert.paths import user_cache

SOURCE = Path(__file__).with_name("fp8_nvfp4.c")
CFLAGS = ("-O3", "-march=x86-64-v2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=c99")
LIBS = ("-lpthread", "-lm")
DEFAULT_THREADS = 2


class Kernel(enum.Enum):
    """Which implementation runs the FP8-block -> NVFP4 RTN hot path and the MXFP4 -> NVFP4 re-pack (same bytes
    either way)."""

    NATIVE = "native"  # this package's C kernel
    TORCH = "torch"    # formats.nvfp4's compiled torch stages


class NativeUnavailableError(RuntimeError):
    """The C kernel cannot be built or loaded (no compiler, compile error, unloadable library)."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/v4convert/native`` (default ``~/.cache/v4convert/native``)."""
    return user_cache("native")


def _compiler() -> str:
    cc = shutil.which("cc")
    if cc is None:
        raise NativeUnavailableError("native kernel: no C compiler ('cc') on PATH; install one or use --kernel torch")
    return cc


def load_library(source: Path, soname: str) -> ctypes.CDLL:
    """Build ``source`` (once per hash of its text and the flags) into ``cache_dir()/<hash>/soname`` and
    load it. Shared by every C kernel of this package; callers cache the result and declare argtypes.
    Raises :class:`NativeUnavailableError` (no compiler, compile error, unloadable library)."""
    src = source.read_bytes()
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))   # rows.h: included by the .c files
    key = hashlib.sha256(src + headers + "\0".join(CFLAGS + LIBS).encode()).hexdigest()[:16]
    out_dir = cache_dir() / key
    so = out_dir / soname
    if not so.exists():
        cc = _compiler()
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(source), *LIBS], capture_output=True, text=True)
            if r.returncode != 0:
                raise NativeUnavailableError(f"native kernel: '{cc}' failed on {source}: {r.stderr.strip()[:500]}")
            os.replace(tmp, so)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(so))
    except OSError as e:
        raise NativeUnavailableError(f"native kernel: cannot load {so}: {e}") from None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The FP8 -> NVFP4 library, built and loaded once."""
    lib = load_library(SOURCE, "libv4c_fp8_nvfp4.so")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.v4c_fp8_block_amax.argtypes = [p, i64, i64, p, i32, p, p, i32]
    lib.v4c_fp8_block_amax.restype = i64
    lib.v4c_fp8_encode.argtypes = [p, i64, i64, p, i32, p, f32, i32, p, p, i32]
    lib.v4c_fp8_encode.restype = None
    lib.v4c_fp8_amax.argtypes = [p, i64, i64, p, i32, p, i32]
    lib.v4c_fp8_amax.restype = i64
    lib.v4c_fp8_encode_fused.argtypes = [p, i64, i64, p, i32, f32, i32, p, p, i32]
    lib.v4c_fp8_encode_fused.restype = None
    return lib


def native_status() -> tuple[bool, str]:
    """(usable, one-line reason): builds the library if needed; never raises for a missing compiler."""
    try:
        _library()
    except NativeUnavailableError as e:
        return False, str(e)
    return True, f"native C kernel ({cache_dir()})"


def _check_raw(raw: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    if raw.dtype == torch.float8_e4m3fn or raw.dtype == torch.int8:
        raw = raw.view(torch.uint8)
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.device.type != "cpu":
        raise CodecInputError(f"{name}: native kernel needs 2-D CPU E4M3 bytes, got {raw.dtype} {tuple(raw.shape)} "
                              f"on {raw.device}")
    n, k = raw.shape
    if n == 0 or k == 0 or k % NVFP4_BLOCK:
        raise BlockShapeError(f"{name}: NVFP4 needs K % {NVFP4_BLOCK} == 0 and a non-empty tensor, got {(n, k)}")
    return raw.contiguous(), int(n), int(k)


def _check_scale(scale: torch.Tensor, n: int, k: int, name: str) -> tuple[torch.Tensor, int]:
    """-> (contiguous CPU scale, 1 if E8M0 bytes else 0)."""
    expect = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
    if tuple(scale.shape) != expect:
        raise BlockShapeError(f"{name}: scale shape {tuple(scale.shape)} does not match weight {(n, k)} "
                              f"(expected {expect})")
    if scale.device.type != "cpu":
        raise CodecInputError(f"{name}: native kernel needs CPU scales, got {scale.device}")
    if scale.dtype == torch.float32:
        return scale.contiguous(), 0
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return scale.view(torch.uint8).contiguous(), 1
    raise CodecInputError(f"{name}: unsupported FP8 block scale dtype {scale.dtype} (F32 or E8M0)")


def _check_amax_result(bad: int, amax: torch.Tensor, n: int, k: int, name: str) -> None:
    """Refuse what an amax kernel reported: ``bad`` < 0 a bad block scale, > 0 that many NaN bytes; a non-finite
    ``amax`` an overflowing product."""
    if bad < 0:
        raise NonFiniteInputError(f"{name}: non-finite or negative FP8 block scale (NaN/Inf/negative F32 or E8M0 byte 0xFF)")
    if bad > 0:
        raise NonFiniteInputError(f"{name}: {bad} NaN E4M3 values in tensor of shape {(n, k)}; refusing to quantize")
    if not bool(torch.isfinite(amax)):
        raise NonFiniteInputError(f"{name}: non-finite block amax (scale too large); refusing to quantize")


def fp8_block_amax_native(
    raw: torch.Tensor, scale: torch.Tensor, *, threads: int = DEFAULT_THREADS, name: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 bytes ``[N, K]`` + 128-block scale (F32 or E8M0 ``[B(N), B(K)]``) -> (float32 block amax
    ``[N, K/16]`` = ``e4m3(max magnitude byte) * scale``, float32 0-dim amax). Raises on NaN input."""
    raw, n, k = _check_raw(raw, name)
    sc, e8m0 = _check_scale(scale, n, k, name)
    block_amax = torch.empty(n, k // NVFP4_BLOCK, dtype=torch.float32)
    amax = torch.zeros((), dtype=torch.float32)
    bad = _library().v4c_fp8_block_amax(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, block_amax.data_ptr(),
                                        amax.data_ptr(), int(threads))
    _check_amax_result(bad, amax, n, k, name)
    return block_amax, amax


def fp8_encode_native(
    raw: torch.Tensor,
    scale: torch.Tensor,
    block_amax: torch.Tensor,
    gscale: torch.Tensor,
    convention: NVFP4Convention,
    *,
    threads: int = DEFAULT_THREADS,
    name: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 ``[N, K/2]``, E4M3 block scales ``[N, K/16]``) for the float32 global scale
    ``gscale`` (from :func:`nvfp4_global_scale`), as ``nvfp4_quantize`` RTN computes them."""
    raw, n, k = _check_raw(raw, name)
    sc, e8m0 = _check_scale(scale, n, k, name)
    if block_amax.dtype != torch.float32 or tuple(block_amax.shape) != (n, k // NVFP4_BLOCK):
        raise BlockShapeError(f"{name}: block amax must be float32 {(n, k // NVFP4_BLOCK)}, "
                              f"got {block_amax.dtype} {tuple(block_amax.shape)}")
    ba = block_amax.contiguous().cpu()
    g = float(gscale.detach().to(torch.float32).cpu().reshape(()))  # exact: float32 -> double -> float32
    if not (0.0 < g < float("inf")):
        # the torch codec hits NaN (0/0, inf*0) here and refuses too
        raise NonFiniteInputError(f"{name}: NVFP4 global scale {g} is not finite and positive (amax too small "
                                  f"or too large for float32); refusing to quantize")
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    ws = torch.empty(n, k // NVFP4_BLOCK, dtype=torch.uint8)
    _library().v4c_fp8_encode(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, ba.data_ptr(), g,
                              int(convention is NVFP4Convention.MODELOPT), packed.data_ptr(), ws.data_ptr(),
                              int(threads))
    return packed, ws.view(torch.float8_e4m3fn)


def fp8_amax_native(raw: torch.Tensor, scale: torch.Tensor, *, threads: int = DEFAULT_THREADS,
                    name: str = "tensor") -> torch.Tensor:
    """Float32 0-dim ``max |e4m3 * scale|`` of E4M3 bytes ``[N, K]`` with 128-block scale (F32 or E8M0
    ``[B(N), B(K)]``): bit-equal to :func:`fp8_block_amax_native`'s amax, without the block amax array. Raises as it."""
    raw, n, k = _check_raw(raw, name)
    sc, e8m0 = _check_scale(scale, n, k, name)
    amax = torch.zeros((), dtype=torch.float32)
    bad = _library().v4c_fp8_amax(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, amax.data_ptr(), int(threads))
    if bad == -2:
        raise MemoryError(f"{name}: native kernel could not allocate its {k}-byte row accumulator")
    _check_amax_result(bad, amax, n, k, name)
    return amax


def _out_buf(buf: torch.Tensor | None, nbytes: int, shape: tuple[int, int], what: str) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=torch.uint8)
    if buf.dtype != torch.uint8 or buf.numel() != nbytes or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError(f"{what}: need a contiguous CPU uint8 buffer of {nbytes} bytes, got {buf.dtype} "
                         f"{tuple(buf.shape)}")
    return buf.view(shape)


def fp8_encode_fused_native(
    raw: torch.Tensor,
    scale: torch.Tensor,
    gscale: torch.Tensor,
    convention: NVFP4Convention,
    *,
    threads: int = DEFAULT_THREADS,
    name: str = "tensor",
    packed_out: torch.Tensor | None = None,
    ws_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_encode_native` without the block amax array (recomputed per 16-block from the bytes: same
    bytes). ``packed_out`` / ``ws_out``: contiguous uint8 buffers of ``N*K/2`` / ``N*K/16`` bytes to write into
    (e.g. a staged writer's range); -> (packed uint8 ``[N, K/2]``, E4M3 block scales ``[N, K/16]``)."""
    raw, n, k = _check_raw(raw, name)
    sc, e8m0 = _check_scale(scale, n, k, name)
    g = float(gscale.detach().to(torch.float32).cpu().reshape(()))  # exact: float32 -> double -> float32
    if not (0.0 < g < float("inf")):
        raise NonFiniteInputError(f"{name}: NVFP4 global scale {g} is not finite and positive (amax too small "
                                  f"or too large for float32); refusing to quantize")
    packed = _out_buf(packed_out, n * k // 2, (n, k // 2), f"{name} packed")
    ws = _out_buf(ws_out, n * k // NVFP4_BLOCK, (n, k // NVFP4_BLOCK), f"{name} block scales")
    _library().v4c_fp8_encode_fused(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, g,
                                    int(convention is NVFP4Convention.MODELOPT), packed.data_ptr(), ws.data_ptr(),
                                    int(threads))
    return packed, ws.view(torch.float8_e4m3fn)


def fp8_block_to_nvfp4_native(
    t: FP8BlockTensor,
    *,
    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
    global_amax: torch.Tensor | float | None = None,
    threads: int = DEFAULT_THREADS,
    name: str = "tensor",
) -> NVFP4Tensor:
    """Same result as :func:`v4convert.formats.fp8_block.fp8_block_to_nvfp4` (byte for byte), in C."""
    scale = t.scale if t.fmt is not FP8ScaleFormat.F32_POW2 else t.scale.to(torch.float32)
    amax = fp8_amax_native(t.weight, scale, threads=threads, name=name)
    if global_amax is not None:
        g_amax = torch.as_tensor(global_amax, dtype=torch.float32).reshape(())
        if not bool(torch.isfinite(g_amax)) or bool(g_amax < amax):
            raise CodecInputError(
                f"{name}: supplied global amax {float(g_amax)} is below the tensor's amax {float(amax)} (or not finite)"
            )
        amax = g_amax
    gscale = nvfp4_global_scale(amax, convention)
    packed, ws = fp8_encode_fused_native(t.weight, scale, gscale, convention, threads=threads, name=name)
    return NVFP4Tensor(packed=packed, block_scale=ws, global_scale=gscale, convention=convention, amax=amax.reshape(()))
