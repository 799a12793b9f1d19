"""Encoders of the GGUF export: one checkpoint tensor -> its GGUF bytes (``exporter.plan_tensors``' producers).

FP8-block sources and the MXFP4 re-pack run in C (``v4convert/kernels/native/gguf.py``, same bytes as the torch /
numpy path) unless ``$V4CONVERT_GGUF_KERNEL=torch``; sources are read with ``source_io.stored`` (O_DIRECT into this
thread's pooled buffers), kernel outputs land in ``source_io.out_buffer`` inside an engine unit, and the encodes hold
a ``source_io.compute`` slot (at most ``workers`` at once).
"""
from __future__ import annotations

import math
import os

import torch
from gguf import GGMLQuantizationType as Q

from v4convert.checkpoint import Checkpoint, TensorInfo
from v4convert.families.roles import Storage
from v4convert.formats import gguf_quants

from . import source_io
from .types import ExportError


def _nonfinite_error(info: TensorInfo, bad: int) -> ExportError:
    return ExportError(f"{info.parts['weight'].path}: tensor {info.name}: {bad} NaN/Inf values; "
                       f"pass --allow-nonfinite to export them anyway")


def _float(ck: Checkpoint, info: TensorInfo, allow_nonfinite: bool = False) -> torch.Tensor:
    if info.storage is Storage.FP8_BLOCK and len(info.shape) == 2:      # k_b / v_b: F32 from the native kernel
        from v4convert.kernels.native import Kernel
        from v4convert.kernels.native import gguf as native_gguf
        kernel, threads = _gguf_kernel(os.environ.get(KERNEL_ENV, "").strip().lower())
        if kernel is Kernel.NATIVE:
            try:
                with source_io.stored(info) as parts, source_io.compute():
                    return native_gguf.fp8_block_to_gguf_native(parts["weight"], parts["scale"], Q.F32,
                                                                threads=source_io.kernel_threads(threads),
                                                                name=info.name).view(torch.float32)
            except native_gguf.NonFiniteValuesError as e:      # NaN/Inf kept: dequantize below
                if not allow_nonfinite:
                    raise _nonfinite_error(info, e.count) from None
    w = ck.dequantize(info.name)
    with source_io.compute():
        bad = int((~torch.isfinite(w)).sum()) if not allow_nonfinite and w.is_floating_point() else 0
    if bad:
        raise _nonfinite_error(info, bad)
    return w


def _nbytes(shape: tuple[int, ...], q: Q) -> int:
    """GGUF bytes of a tensor of ``shape`` (rows of ``shape[-1]``) in ``q``."""
    from v4convert.kernels.native.gguf import gguf_nbytes
    return math.prod(shape[:-1]) * gguf_nbytes(1, shape[-1], q)


def _quantize(x: torch.Tensor, q: Q, name: str) -> torch.Tensor:
    """``gguf_quants.quantize`` in a compute slot (``source_io.compute``; ``x`` is computed before)."""
    with source_io.compute():
        return gguf_quants.quantize(x, q, name)


KERNEL_ENV = "V4CONVERT_GGUF_KERNEL"     # "native" / "torch" / unset: native where it builds (same bytes)
_KERNELS: dict = {}                      # $V4CONVERT_GGUF_KERNEL value -> (Kernel, threads), once per process


def _gguf_kernel(requested: str) -> tuple:
    """(Kernel for FP8-block sources, its threads) for ``$V4CONVERT_GGUF_KERNEL``; torch with the reason
    logged when the C kernel does not build, unless native was asked for."""
    if requested in _KERNELS:
        return _KERNELS[requested]
    import logging

    from v4convert.kernels.native import Kernel
    from v4convert.kernels.native.gguf import gguf_native_status
    from v4convert.threads import usable_cores
    if requested not in ("", "native", "torch"):
        raise ExportError(f"${KERNEL_ENV}={requested!r}: expected 'native' or 'torch'")
    ok, why = (True, "") if requested == "torch" else gguf_native_status()
    if not ok and requested == "native":
        raise ExportError(why)
    if not ok:
        logging.getLogger(__name__).warning("GGUF export: torch kernel for FP8 tensors (%s)", why)
    _KERNELS[requested] = (Kernel.NATIVE, usable_cores()) if ok and requested != "torch" else (Kernel.TORCH, 0)
    return _KERNELS[requested]


def _encode(ck: Checkpoint, info: TensorInfo, q: Q, allow_nonfinite: bool = False) -> torch.Tensor:
    """Bytes of one checkpoint tensor in GGML type ``q``; MXFP4 sources go to MXFP4 by re-packing; FP8-block
    sources and the re-pack run in C (``v4convert/kernels/native/gguf.py``, same bytes) when the native kernel is chosen."""
    from v4convert.kernels.native import Kernel
    from v4convert.kernels.native import gguf as native_gguf
    kernel, threads = _gguf_kernel(os.environ.get(KERNEL_ENV, "").strip().lower())
    threads = source_io.kernel_threads(threads)
    if q == Q.MXFP4 and info.storage is Storage.MXFP4:
        # read into this thread's pooled buffers (source_io: O_DIRECT, no mapped pages); the output is a new buffer
        with source_io.stored(info) as raw, source_io.compute():
            if kernel is Kernel.NATIVE:      # counts the E8M0 NaN scale bytes in the same pass (no torch op)
                out = source_io.out_buffer(_nbytes(info.shape, Q.MXFP4))
                try:
                    return native_gguf.repack_mxfp4_native(raw["weight"], raw["scale"], info.name, threads=threads,
                                                           out=out)
                except native_gguf.NaNScalesError as e:
                    if not allow_nonfinite:
                        raise _nonfinite_error(info, e.count) from None
                    raise
            bad = int((raw["scale"].view(torch.uint8) == 0xFF).sum())     # E8M0 NaN; FP4 codes have none
            if bad and not allow_nonfinite:
                raise _nonfinite_error(info, bad)
            return gguf_quants.repack_mxfp4(raw["weight"], raw["scale"], info.name)
    if (kernel is Kernel.NATIVE and info.storage is Storage.FP8_BLOCK and len(info.shape) == 2
            and q in native_gguf.QTYPES and not (q in native_gguf.BLOCK_QTYPES and info.shape[1] % gguf_quants.QK)):
        try:
            out = source_io.out_buffer(_nbytes(info.shape, q))     # pooled inside an engine unit
            with source_io.stored(info) as parts, source_io.compute():
                return native_gguf.fp8_block_to_gguf_native(parts["weight"], parts["scale"], q, threads=threads,
                                                            name=info.name, out=out)
        except native_gguf.NonFiniteValuesError as e:   # same refusal as _float; NaN/Inf kept: the torch path writes them
            if not allow_nonfinite:
                raise _nonfinite_error(info, e.count) from None
    return _quantize(_float(ck, info, allow_nonfinite), q, info.name)
