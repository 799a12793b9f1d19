"""Native (C) kernel FP8-block -> GGUF bytes (F32, F16, BF16, Q8_0, MXFP4), bit-identical to
``formats.gguf_quants.quantize`` of the checkpoint's float32 dequantization (``Checkpoint.dequantize``).

``fp8_gguf.c`` is built and loaded by the package's shared helper (:func:`load_library`, the same cache
as the NVFP4 kernel). Fused: each 128x128 block's 256 products ``e4m3(byte) * scale`` are tabled and
encoded row block by row block; no float32 copy of the tensor is made. MXFP4 takes two C passes: the
per-32-block maxima (``[N, K/32]`` float32), then the encode, with the E8M0 exponent of each block
computed in between by ``gguf_quants``' own numpy float32 expression (``floor(log2(amax))`` rounds as
numpy's ``log2`` does on this machine, so the bytes match the torch path by construction).

Non-finite dequantized values (NaN bytes 0x7F / 0xFF, NaN/Inf/E8M0-0xFF scales, products that overflow
float32) are counted exactly and raise :class:`NonFiniteValuesError` (``.count``), a ``NonFiniteInputError``;
callers that want NaN/Inf exported (``--allow-nonfinite``) use the torch path for that tensor.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from v4convert.formats.fp4 import BlockShapeError, CodecInputError, NonFiniteInputError
from v4convert.formats.gguf_quants import QK, QuantError, _mxfp4_exponents

from . import DEFAULT_THREADS, NativeUnavailableError, _check_scale, load_library

SOURCE = Path(__file__).with_name("fp8_gguf.c")
QTYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.MXFP4)   # what the C kernel writes (GGML ids in fp8_gguf.c)
BLOCK_QTYPES = (Q.Q8_0, Q.MXFP4)                    # need K % 32 == 0


class NonFiniteValuesError(NonFiniteInputError):
    """The dequantized tensor holds ``count`` NaN/Inf values."""

    def __init__(self, msg: str, count: int) -> None:
        super().__init__(msg)
        self.count = count


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The FP8 -> GGUF library, built and loaded once."""
    lib = load_library(SOURCE, "libv4c_fp8_gguf.so")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.v4c_fp8_amax32.argtypes = [p, i64, i64, p, i32, p, i32]
    lib.v4c_fp8_amax32.restype = i64
    lib.v4c_fp8_gguf.argtypes = [p, i64, i64, p, i32, i32, p, p, i32]
    lib.v4c_fp8_gguf.restype = i64
    lib.v4c_fp8_block_mags.argtypes = [p, i64, i32, p]
    lib.v4c_fp8_block_mags.restype = None
    lib.v4c_fp8_mxfp4.argtypes = [p, i64, i64, p, i32, p, p, i32]
    lib.v4c_fp8_mxfp4.restype = i64
    lib.v4c_mxfp4_repack.argtypes = [p, p, i64, i64, p, i32]
    lib.v4c_mxfp4_repack.restype = i64
    return lib


def gguf_native_status() -> tuple[bool, str]:
    """(usable, one-line reason): builds the library if needed; never raises for a missing compiler."""
    try:
        _library()
    except NativeUnavailableError as e:
        return False, str(e)
    return True, "native C kernel (fp8_gguf.c)"


def gguf_nbytes(n: int, k: int, qtype: Q) -> int:
    """Bytes of one ``[n, k]`` tensor in ``qtype``."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    return n * (k // bs) * ts


def _check(raw: torch.Tensor, scale: torch.Tensor, qtype: Q, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (contiguous uint8 raw [N, K], contiguous scale, 1 if E8M0 bytes else 0)."""
    if qtype not in QTYPES:
        raise CodecInputError(f"{name}: native GGUF kernel writes {', '.join(q.name for q in QTYPES)}, not {qtype.name}")
    if raw.dtype in (torch.float8_e4m3fn, torch.int8):
        raw = raw.view(torch.uint8)
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.device.type != "cpu":
        raise CodecInputError(f"{name}: native kernel needs 2-D CPU E4M3 bytes, got {raw.dtype} {tuple(raw.shape)} "
                              f"on {raw.device}")
    n, k = raw.shape
    if n == 0 or k == 0:
        raise BlockShapeError(f"{name}: empty tensor {(n, k)}")
    if qtype in BLOCK_QTYPES and k % QK:
        raise BlockShapeError(f"{name}: {qtype.name} needs K % {QK} == 0, got {(n, k)}")
    if scale.dtype in (torch.bfloat16, torch.float16, torch.float64) and scale.device.type == "cpu":
        scale = scale.to(torch.float32)      # as the torch path's s.to(float32) (exact for bf16/f16)
    sc, e8m0 = _check_scale(scale, int(n), int(k), name)
    return raw.contiguous(), sc, e8m0


def _refuse(bad: int, name: str, n: int, k: int) -> None:
    if bad == -1:
        raise MemoryError(f"{name}: native GGUF kernel could not allocate its tables")
    if bad < 0:
        raise CodecInputError(f"{name}: native GGUF kernel rejected the call (code {bad})")
    if bad:
        raise NonFiniteValuesError(f"{name}: {bad} NaN/Inf values in the dequantized tensor of shape {(n, k)}; "
                                   f"refusing to encode", bad)


def fp8_block_amax32_native(raw: torch.Tensor, scale: torch.Tensor, *, threads: int = DEFAULT_THREADS,
                            name: str = "tensor") -> torch.Tensor:
    """E4M3 bytes ``[N, K]`` (K % 32 == 0) + 128-block scale -> float32 ``[N, K/32]`` = max |dequantized|
    per 32-block (the MXFP4 / Q8_0 block maxima). Raises :class:`NonFiniteValuesError`."""
    raw, sc, e8m0 = _check(raw, scale, Q.MXFP4, name)
    n, k = raw.shape
    amax = torch.empty(n, k // QK, dtype=torch.float32)
    bad = _library().v4c_fp8_amax32(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, amax.data_ptr(), int(threads))
    _refuse(bad, name, n, k)
    return amax


def mxfp4_exponent_table(sc: torch.Tensor, e8m0: int) -> torch.Tensor:
    """E8M0 byte of an MXFP4 32-block per (128x128 block of the contiguous scale ``sc``, max magnitude byte m):
    uint8 ``[sc.numel(), 128]`` = ``_mxfp4_exponents(|e4m3(m) * s|)`` (gguf-py's numpy float32 expression on the
    float32 maxima the C kernel forms: a block's exponent is a function of its block scale and max byte)."""
    mags = torch.empty(sc.numel(), 128, dtype=torch.float32)
    _library().v4c_fp8_block_mags(sc.data_ptr(), sc.numel(), e8m0, mags.data_ptr())
    return torch.from_numpy(_mxfp4_exponents(mags.numpy()))


def fp8_block_to_mxfp4_two_pass(raw: torch.Tensor, scale: torch.Tensor, *, threads: int = DEFAULT_THREADS,
                                name: str = "tensor") -> torch.Tensor:
    """MXFP4 the first way (kept as the fused kernel's reference): block maxima ``[N, K/32]`` in C, their
    exponents in numpy, then the per-element encode in C."""
    raw, sc, e8m0 = _check(raw, scale, Q.MXFP4, name)
    n, k = raw.shape
    amax = fp8_block_amax32_native(raw, sc, threads=threads, name=name)
    exps = torch.from_numpy(_mxfp4_exponents(amax.numpy())).contiguous()
    out = torch.empty(n, gguf_nbytes(1, k, Q.MXFP4), dtype=torch.uint8)
    bad = _library().v4c_fp8_gguf(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, int(Q.MXFP4), exps.data_ptr(),
                                  out.data_ptr(), int(threads))
    _refuse(bad, name, n, k)
    return out


def fp8_block_to_gguf_native(raw: torch.Tensor, scale: torch.Tensor, qtype: Q, *, threads: int = DEFAULT_THREADS,
                             name: str = "tensor", out: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 bytes ``[N, K]`` + 128-block scale (float32 ``[ceil(N/128), ceil(K/128)]`` or E8M0 bytes) ->
    uint8 ``[N, row bytes]``: the GGUF ``qtype`` bytes of the dequantized tensor, equal to
    ``gguf_quants.quantize(dequantized, qtype)`` byte for byte. Raises :class:`NonFiniteValuesError` when a
    dequantized value is NaN/Inf, ``BlockShapeError`` for bad shapes. MXFP4 is one fused pass
    (``v4c_fp8_mxfp4``: exponents from :func:`mxfp4_exponent_table`, codes by byte thresholds).
    ``out``: a contiguous uint8 buffer of at least the output's bytes to write into (returned as its first
    ``[N, row bytes]``), e.g. a reused one; None: a new tensor."""
    raw, sc, e8m0 = _check(raw, scale, qtype, name)
    n, k = raw.shape
    lib = _library()
    nbytes = gguf_nbytes(n, k, qtype)
    if out is None:
        out = torch.empty(n, gguf_nbytes(1, k, qtype), dtype=torch.uint8)
    else:
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < nbytes or out.device.type != "cpu":
            raise CodecInputError(f"{name}: output buffer must be contiguous CPU uint8 of >= {nbytes} bytes")
        out = out.view(-1)[:nbytes].view(n, -1)
    if qtype == Q.MXFP4:
        etab = mxfp4_exponent_table(sc, e8m0)
        bad = lib.v4c_fp8_mxfp4(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, etab.data_ptr(), out.data_ptr(),
                                int(threads))
    else:
        bad = lib.v4c_fp8_gguf(raw.data_ptr(), n, k, sc.data_ptr(), e8m0, int(qtype), None, out.data_ptr(),
                               int(threads))
    _refuse(bad, name, n, k)
    return out


class NaNScalesError(QuantError):
    """MXFP4 scale bytes 0xFF (E8M0 NaN), ``count`` of them: not storable in GGUF."""

    def __init__(self, msg: str, count: int) -> None:
        super().__init__(msg)
        self.count = count


def repack_mxfp4_native(packed: torch.Tensor, scale: torch.Tensor, name: str = "?", *,
                        threads: int = DEFAULT_THREADS, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same bytes, shapes and errors as :func:`v4convert.formats.gguf_quants.repack_mxfp4` (OCP / DeepSeek
    MXFP4 ``packed [..., K/2]`` + E8M0 ``scale [..., K/32]`` -> GGUF MXFP4 uint8 ``[..., K/32*17]``), in C; the NaN
    scale bytes are counted in the same pass (:class:`NaNScalesError`, a ``QuantError``, with ``.count``).
    ``out``: a contiguous uint8 buffer of at least the output's bytes to write into (None: a new tensor)."""
    p = packed.contiguous().view(torch.uint8)
    s = scale.contiguous().view(torch.uint8)
    k = p.shape[-1] * 2
    if k % QK != 0 or tuple(s.shape) != (*p.shape[:-1], k // QK):
        raise QuantError(f"tensor {name}: MXFP4 scale shape {tuple(s.shape)} does not match packed "
                         f"shape {tuple(p.shape)} (expected {(*p.shape[:-1], k // QK)})")
    if p.device.type != "cpu" or s.device.type != "cpu":
        raise CodecInputError(f"{name}: native kernel needs CPU tensors")
    rows = p.numel() // max(1, p.shape[-1]) if p.shape[-1] else 0
    shape = (*p.shape[:-1], k // QK * 17)
    nbytes = rows * (k // QK) * 17
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8)
    else:
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < nbytes or out.device.type != "cpu":
            raise CodecInputError(f"{name}: output buffer must be contiguous CPU uint8 of >= {nbytes} bytes")
        out = out.view(-1)[:nbytes].view(shape)
    if out.numel():
        bad = _library().v4c_mxfp4_repack(p.data_ptr(), s.data_ptr(), rows, k // QK, out.data_ptr(), int(threads))
        if bad:
            raise NaNScalesError(f"tensor {name}: MXFP4 scale byte 255 (NaN) cannot be stored in GGUF", bad)
    return out
