"""Native (C) MXFP4 -> NVFP4 re-pack, byte-identical to :func:`v4convert.formats.mxfp4.mxfp4_to_nvfp4`.

``mxfp4_nvfp4.c`` does both passes in integer arithmetic (pass 1: the tensor-wide max of the 16-block
ROUND_UP exponents t; pass 2: E4M3 block scales ``2**rel`` and codes from a byte table). The rare 16-blocks
that ``2**rel`` cannot keep exact (``rel`` clamped at -9: a block 2**17 below the tensor's largest) keep those
codes, as the torch codec's RTN fallback never wins there (argument in the C file); the C code counts them
and takes their max error in float32. Inputs with values that decode to inf in float32 (E8M0 byte 254/253
with large codes) take the torch codec whole (its inf semantics).

Fused partners are passed as separate parts (no concatenation copy): one global exponent over all of them.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path
from typing import Sequence

import torch

from v4convert.formats.fp4 import BlockShapeError, CodecInputError
from v4convert.formats.mxfp4 import (
    E4M3_POW2_MAX_EXP,
    RepackReport,
    mxfp4_from_deepseek_native,
    mxfp4_to_nvfp4_parts,
)
from v4convert.formats.nvfp4 import NVFP4_BLOCK, NVFP4Convention, NVFP4Tensor

from . import DEFAULT_THREADS, load_library

SOURCE = Path(__file__).with_name("mxfp4_nvfp4.c")
_MAG = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = load_library(SOURCE, "libv4c_mxfp4_nvfp4.so")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.v4c_mxfp4_nvfp4_reduce.argtypes = [p, p, i64, i64, p, i32]
    lib.v4c_mxfp4_nvfp4_reduce.restype = None
    lib.v4c_mxfp4_nvfp4_encode.argtypes = [p, p, i64, i64, i32, p, p, ctypes.POINTER(ctypes.c_float), i32]
    lib.v4c_mxfp4_nvfp4_encode.restype = i64
    return lib


def _check_parts(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not parts:
        raise CodecInputError(f"{name}: no tensors to re-pack")
    out = []
    for w, s in parts:
        t = mxfp4_from_deepseek_native(w, s, name, check_nan=False)  # dtype / shape checks, same messages
        if t.packed.dim() != 2 or t.packed.device.type != "cpu" or t.packed.shape[0] == 0:
            raise CodecInputError(f"{name}: native re-pack needs non-empty 2-D CPU tensors, got "
                                  f"{tuple(t.packed.shape)} on {t.packed.device}")
        out.append((t.packed.contiguous(), t.scale.contiguous()))
    if len({p.shape[1] for p, _ in out}) != 1:
        raise BlockShapeError(f"{name}: fused MXFP4 partners with different in-features {[tuple(p.shape) for p, _ in out]}")
    return out


def mxfp4_to_nvfp4_native(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
    *,
    threads: int = DEFAULT_THREADS,
    name: str = "tensor",
) -> tuple[list[NVFP4Tensor], RepackReport]:
    """``parts``: (codes I8/U8 ``[n_i, K/2]``, E8M0/U8 scales ``[n_i, K/32]``) of fused partners. Returns one
    NVFP4Tensor per part and the report, equal (bytes, scales, report fields) to ``mxfp4_to_nvfp4`` of the
    row-concatenated tensor."""
    ps = _check_parts(parts, name)
    k = ps[0][0].shape[1] * 2
    lib = _library()
    any_nz, tmax, has_inf, best = False, 0, False, (0, 0)
    for p, s in ps:
        info = (ctypes.c_int32 * 6)()
        lib.v4c_mxfp4_nvfp4_reduce(p.data_ptr(), s.data_ptr(), p.shape[0], k, info, int(threads))
        has_inf |= bool(info[2])
        if info[3]:  # the torch codec's message (mxfp4_from_deepseek_native)
            raise CodecInputError(f"{name}: E8M0 scale byte 0xFF (NaN) present")
        if info[0]:
            if not any_nz or info[1] > tmax:
                tmax = info[1]
            if not any_nz or math.ldexp(_MAG[info[4]], info[5]) > math.ldexp(_MAG[best[0]], best[1]):
                best = (info[4], info[5])
            any_nz = True
    if has_inf:  # values >= 2**128 decode to inf: the torch codec's semantics, whole tensor
        return mxfp4_to_nvfp4_parts(ps, convention, name)
    g = tmax - E4M3_POW2_MAX_EXP if any_nz else 0
    g = max(-126, min(126, g))
    g_t = torch.ldexp(torch.ones((), dtype=torch.float32), torch.tensor(float(g)))   # as mxfp4_to_nvfp4
    gscale = g_t if convention is NVFP4Convention.MODELOPT else torch.reciprocal(g_t)
    amax = torch.tensor(math.ldexp(_MAG[best[0]], best[1]) if any_nz else 0.0, dtype=torch.float32)
    outs, inexact, max_err, blocks = [], 0, 0.0, 0
    for p, s in ps:
        n = p.shape[0]
        out = torch.empty(n, k // 2, dtype=torch.uint8)
        ws = torch.empty(n, k // NVFP4_BLOCK, dtype=torch.uint8)
        err = ctypes.c_float(0.0)
        inexact += lib.v4c_mxfp4_nvfp4_encode(p.data_ptr(), s.data_ptr(), n, k, g, out.data_ptr(), ws.data_ptr(),
                                              ctypes.byref(err), int(threads))
        max_err = max(max_err, err.value)   # float32 -> double, as float(diff.max())
        blocks += n * (k // NVFP4_BLOCK)
        outs.append(NVFP4Tensor(packed=out, block_scale=ws.view(torch.float8_e4m3fn), global_scale=gscale,
                                convention=convention, amax=amax))
    return outs, RepackReport(blocks=blocks, inexact_blocks=inexact, max_abs_error=max_err, global_exponent=g)

