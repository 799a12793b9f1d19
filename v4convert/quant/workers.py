"""What a worker does with one work unit: read source bytes, encode, write at planned offsets.

Each function reads its source tensors with ``os.preadv`` (a short read names the shard and tensor:
a shard truncated under us is an error, not a SIGBUS from a memory map) and writes its output with
``os.pwrite`` at the byte offsets the plan fixed, so units can finish in any order and a redone unit
rewrites exactly the same bytes. Large tensors are processed in row chunks (``CHUNK_ELEMS``
elements, a multiple of 128 rows) so a worker holds a few chunks, never a whole 132 MB FP8 matrix
in float32. NVFP4 global amax is computed first (cheap: from FP8 magnitude bytes and block scales),
shared by fused partners, then every chunk is encoded with it: bytes equal a whole-tensor encode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from v4convert.formats import fp8
from v4convert.formats.blocks import FP8_BLOCK
from v4convert.formats.containers import Container, Part
from v4convert.formats.direct_io import DirectReader
from v4convert.formats.fp4 import CodecInputError, NonFiniteInputError
from v4convert.formats.safetensors_io import ST_DTYPES

from ..families.roles import Storage
from .plan import Action, Options, QuantizeError, ScaleChoice, TensorPlan, Unit
from .unit_io import (_LOCAL, STAGE_MAX, Staged, StagedWriter, Writer, _nthreads, _pool, compute,
                      direct_io_enabled, read_rows)

CHUNK_ELEMS = 1 << 24          # elements per row chunk (64 MB as float32)
E4M3_TABLE = fp8.e4m3_to_float32(torch.arange(256, dtype=torch.int32).to(torch.uint8))  # byte -> float32 (read-only)
COPY_BYTES = 64 << 20          # verbatim copies stream in 64 MB pieces


@dataclass(frozen=True)
class UnitResult:
    index: int
    bytes_in: int
    repack_blocks: int = 0
    repack_inexact: int = 0
    kernel: str = ""           # FP8 -> NVFP4 RTN / MXFP4 re-pack kernel used ("native" / "torch"), "" if none ran
    staged: Staged | None = None   # the unit's output bytes still in RAM (staged O_DIRECT writes; threads only)


def choose_kernel(requested=None, device: str = "cpu"):  # (Kernel | None, str) -> (Kernel, str)
    """Hot-path kernel for FP8 -> NVFP4 RTN and a one-line reason (same bytes either way).

    ``requested`` None: the native C kernel when it compiles and ``device`` is CPU, else torch (the
    reason says why). ``Kernel.NATIVE`` that cannot build or runs on a non-CPU device raises."""
    from v4convert.kernels.native import Kernel, native_status
    if requested is Kernel.TORCH:
        return Kernel.TORCH, "torch kernel (requested)"
    if device != "cpu":
        if requested is Kernel.NATIVE:
            raise QuantizeError(f"--kernel native runs on the CPU; device {device!r} needs --kernel torch")
        return Kernel.TORCH, f"torch kernel (device {device})"
    ok, why = native_status()
    if requested is Kernel.NATIVE and not ok:
        raise QuantizeError(why)
    return (Kernel.NATIVE, why) if ok else (Kernel.TORCH, f"torch kernel ({why})")


# ------------------------------------------------------------------------------------ decoding
def _rows_per_chunk(k: int) -> int:
    return max(FP8_BLOCK, (CHUNK_ELEMS // max(k, 1)) // FP8_BLOCK * FP8_BLOCK)


def _chunks(n: int, k: int):
    step = _rows_per_chunk(k)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _scale_f32(t: TensorPlan, s: torch.Tensor) -> torch.Tensor:
    if t.src["scale"].dtype == "F8_E8M0":
        return fp8.e8m0_to_float32(s.view(torch.uint8))
    return s.to(torch.float32)


def _decode_chunk(t: TensorPlan, r0: int, r1: int, scale: torch.Tensor | None) -> torch.Tensor:
    """Exact float32 rows ``[r0, r1)`` of an FP8-block or plain-float tensor (owned: not a read buffer)."""
    with _pool().scope():
        w = read_rows(t.src["weight"], r0, r1)
        if scale is None:
            if not w.is_floating_point():
                raise QuantizeError(f"tensor {t.name}: cannot quantize a {t.src['weight'].dtype} tensor")
            return w.clone() if w.dtype == torch.float32 else w.to(torch.float32)
        b0, b1 = r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)
        s = scale[b0:b1].repeat_interleave(FP8_BLOCK, 0)[: r1 - r0].repeat_interleave(FP8_BLOCK, 1)[:, : w.shape[1]]
        return E4M3_TABLE[w.view(torch.uint8).long()] * s


def fp8_amax(t: TensorPlan, scale: torch.Tensor) -> torch.Tensor:
    """``max|fp8 * scale|`` (float32 0-dim, exact) from magnitude bytes: E4M3 magnitude is monotonic in
    ``byte & 0x7F`` and the scales are positive. NaN bytes (``0x7F``) raise naming the tensor."""
    n, k = t.shape
    best = torch.zeros((), dtype=torch.float32)
    bk = -(-k // FP8_BLOCK)
    for r0, r1 in _chunks(n, k):
        with _pool().scope():
            mag = read_rows(t.src["weight"], r0, r1).view(torch.uint8) & 0x7F     # a new tensor
        if bool((mag == 0x7F).any()):
            raise NonFiniteInputError(f"tensor {t.name}: {int((mag == 0x7F).sum())} NaN FP8 values "
                                      f"(rows {r0}..{r1}); refusing to quantize")
        r = r1 - r0
        mag = torch.nn.functional.pad(mag, (0, bk * FP8_BLOCK - k, 0, -(-r // FP8_BLOCK) * FP8_BLOCK - r))
        blk = mag.view(-1, FP8_BLOCK, bk, FP8_BLOCK).amax(dim=(1, 3))
        vals = E4M3_TABLE[blk.long()] * scale[r0 // FP8_BLOCK: r0 // FP8_BLOCK + blk.shape[0]]
        best = torch.maximum(best, vals.amax())
    if not bool(torch.isfinite(best)):
        raise NonFiniteInputError(f"tensor {t.name}: non-finite FP8 block scale; refusing to quantize")
    return best


def float_amax(t: TensorPlan) -> torch.Tensor:
    n, k = t.shape
    best = torch.zeros((), dtype=torch.float32)
    for r0, r1 in _chunks(n, k):
        a = _decode_chunk(t, r0, r1, None).abs().amax()
        if not bool(torch.isfinite(a)):
            raise NonFiniteInputError(f"tensor {t.name}: NaN/Inf values (rows {r0}..{r1}); refusing to quantize")
        best = torch.maximum(best, a)
    return best


# ------------------------------------------------------------------------------------ actions
def _out(unit: Unit, t: TensorPlan, part: Part) -> tuple[int, int]:
    """(offset, bytes per row) of ``t``'s output entry ``part``."""
    e = next(e for e in t.out if e.part is part)
    nb = ST_DTYPES[e.dtype][1] * math.prod(e.shape)
    rows = e.shape[0] if len(e.shape) >= 2 else 1
    return unit.offsets[e.name], nb // rows


_PART_SRC = {Part.WEIGHT: "weight", Part.SCALE: "scale"}


def nonfinite(data: torch.Tensor, st_dtype: str, e8m0: bool = False) -> int:
    """How many NaN/Inf values ``data`` (as stored, dtype string ``st_dtype``) holds. E4M3 has NaN at
    magnitude byte 0x7F and no Inf; E5M2 has Inf/NaN at exponent 0x1F; E8M0 (also stored as U8 for
    MXFP4 scales: ``e8m0``) has NaN at 0xFF; packed FP4 and integers have neither."""
    if data.numel() == 0:
        return 0
    if st_dtype == "F8_E4M3":
        return int(((data.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if st_dtype == "F8_E5M2":
        return int(((data.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if st_dtype == "F8_E8M0" or (e8m0 and st_dtype == "U8"):
        return int((data.view(torch.uint8) == 0xFF).sum())
    if st_dtype in ("F64", "F32", "F16", "BF16"):
        return int((~torch.isfinite(data)).sum())
    return 0


def _check_finite(t: TensorPlan, name: str, data: torch.Tensor, st_dtype: str, opts: Options | None,
                  e8m0: bool = False) -> None:
    if opts is not None and opts.allow_nonfinite:
        return
    bad = nonfinite(data, st_dtype, e8m0)
    if bad:
        raise NonFiniteInputError(f"{t.src['weight'].path}: tensor {name}: {bad} NaN/Inf values in a tensor "
                                  f"kept as stored; pass --allow-nonfinite to copy them anyway")


def _copy(unit: Unit, t: TensorPlan, w: Writer, opts: Options | None = None) -> None:
    """Stored bytes verbatim (only names and the dtype label may change, e.g. I8 -> U8, E8M0 -> U8).
    NaN/Inf in what we copy raise (``opts.allow_nonfinite`` copies them)."""
    for e in t.out:
        src = t.src[_PART_SRC[e.part]]
        e8m0 = e.part is Part.SCALE and t.src_storage is Storage.MXFP4
        off = unit.offsets[e.name]
        rows = src.shape[0] if src.shape else 1
        row_b = src.nbytes // rows if rows else 0
        step = max(1, COPY_BYTES // max(row_b, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            with _pool().scope():              # one piece's buffer at a time
                data = read_rows(src, r0, r1) if src.shape else read_rows(src)
                _check_finite(t, src.name, data, src.dtype, opts, e8m0)
                w.write(off + r0 * row_b, data.view(torch.uint8) if data.numel() else b"", e.name)


def _fp8_rewrap(unit: Unit, t: TensorPlan, w: Writer, opts: Options | None = None) -> None:
    # weight bytes verbatim; the block scale re-encoded as F32 (E8M0 / BF16 -> F32 is exact)
    wt = TensorPlan(t.name, t.role, t.action, t.codec, t.src_storage, t.src, t.shape,
                    tuple(e for e in t.out if e.part is Part.WEIGHT))
    _copy(unit, wt, w, opts)
    off, _ = _out(unit, t, Part.SCALE)
    scale = _scale_f32(t, read_rows(t.src["scale"])).contiguous()
    _check_finite(t, t.src["scale"].name, scale, "F32", opts)
    w.write(off, scale, t.name)


def _fp8_to_bf16(unit: Unit, t: TensorPlan, w: Writer, opts: Options | None = None) -> None:
    n, k = t.shape
    scale = _scale_f32(t, read_rows(t.src["scale"]))
    off, row_b = _out(unit, t, Part.WEIGHT)
    for r0, r1 in _chunks(n, k):
        vals = _decode_chunk(t, r0, r1, scale).to(torch.bfloat16)
        _check_finite(t, t.name, vals, "BF16", opts)
        w.write(off + r0 * row_b, vals, t.name)


def _conv(opts: Options):
    from v4convert.formats.nvfp4 import NVFP4Convention
    return NVFP4Convention.MODELOPT if opts.container is Container.MODELOPT else NVFP4Convention.COMPRESSED_TENSORS


@dataclass
class _FP8Prepared:
    """One FP8-block tensor read once: raw bytes, per-16 scale factors and per-16 block amax."""
    raw: torch.Tensor          # uint8 [N, K]
    s16: torch.Tensor | None          # float32 [N, K/16]: the 128-block scale of each 16-block (torch path)
    block_amax: torch.Tensor | None   # float32 [N, K/16] (torch path; the native kernel recomputes it)
    amax: torch.Tensor         # float32 0-dim
    scale: torch.Tensor | None = None  # native kernel: 128-block scale, F32 or E8M0 bytes [B(N), B(K)]


def _fp8_read_native(t: TensorPlan) -> _FP8Prepared:
    """Read ``t``'s E4M3 bytes and 128-block scale for the native kernel (amax filled in by ``_fp8_amax_native``)."""
    raw = read_rows(t.src["weight"]).view(torch.uint8)
    s = read_rows(t.src["scale"])
    s = s.view(torch.uint8) if t.src["scale"].dtype == "F8_E8M0" else s.to(torch.float32)
    return _FP8Prepared(raw, None, None, torch.zeros(()), s)


def _fp8_amax_native(t: TensorPlan, p: _FP8Prepared) -> None:
    """``_fp8_prepare``'s amax on the native kernel (bit for bit), from each 128x128 block's max magnitude byte:
    the per-16 block amax is recomputed by the fused encode, so no ``[N, K/16]`` float array is made."""
    from v4convert.kernels.native import fp8_amax_native
    p.amax = fp8_amax_native(p.raw, p.scale, threads=_nthreads(), name=f"tensor {t.name}").reshape(())


def _fp8_prepare(t: TensorPlan, device: torch.device) -> _FP8Prepared:
    """First half of ``fp8_block_to_nvfp4`` (the codec's own stage functions, same order): it lets fused
    partners share a global amax without reading and reducing each weight twice. Bytes are checked
    against ``nvfp4_quantize`` in tests/test_quantize.py."""
    from v4convert.formats.fp8_block import expand_block_scale
    from v4convert.formats.nvfp4 import fp8_block_amax_from_mag, fp8_block_mag_max
    n, k = t.shape
    raw = read_rows(t.src["weight"]).view(torch.uint8).to(device)
    s = _scale_f32(t, read_rows(t.src["scale"])).to(device)
    if not bool(torch.isfinite(s).all()):
        raise NonFiniteInputError(f"tensor {t.name}: non-finite FP8 block scale; refusing to quantize")
    mag = fp8_block_mag_max(raw)                               # uint8 [N, K/16]
    if bool((mag == 0x7F).any()):
        bad = int(((raw & 0x7F) == 0x7F).sum())
        raise NonFiniteInputError(f"tensor {t.name}: {bad} NaN FP8 values; refusing to quantize")
    s16 = expand_block_scale(s, n, k, 16).contiguous()         # float32 [N, K/16]
    block_amax, amax = fp8_block_amax_from_mag(mag, s16)
    if not bool(torch.isfinite(amax)):
        raise NonFiniteInputError(f"tensor {t.name}: non-finite block amax; refusing to quantize")
    return _FP8Prepared(raw, s16, block_amax, amax.reshape(()))


def _fp8_encode(t: TensorPlan, p: _FP8Prepared, shared: torch.Tensor, opts: Options, unit: Unit, w: Writer) -> None:
    """Second half of ``fp8_block_to_nvfp4`` with the shared global amax; rows encoded in chunks."""
    from v4convert.formats.nvfp4 import encode_fp8_blocks_to_packed, nvfp4_global_scale, nvfp4_rtn_scales_from_block_amax
    conv = _conv(opts)
    n, k = t.shape
    gscale = nvfp4_global_scale(shared, conv)
    woff, wrow = _out(unit, t, Part.WEIGHT)
    soff, _ = _out(unit, t, Part.SCALE)
    goff, _ = _out(unit, t, Part.GLOBAL_SCALE)
    if p.scale is not None:  # native kernel: whole tensor in one fused call (the raw bytes are already in memory)
        from v4convert.kernels.native import fp8_encode_fused_native
        # staged writer: the kernel writes straight into the unit's staging buffer (no output copy, no fresh pages)
        pk = w.region(woff, n * k // 2, t.name) if isinstance(w, StagedWriter) else None
        wsb = w.region(soff, n * k // 16, t.name) if isinstance(w, StagedWriter) else None
        with compute():
            packed, ws = fp8_encode_fused_native(p.raw, p.scale, gscale, conv, threads=_nthreads(),
                                                 name=f"tensor {t.name}", packed_out=pk, ws_out=wsb)
        if pk is None:
            w.write(woff, packed, t.name)
            w.write(soff, ws.view(torch.uint8), t.name)
        w.write(goff, gscale.to(torch.float32).reshape(1).cpu(), t.name)
        return
    ws, safe = nvfp4_rtn_scales_from_block_amax(p.block_amax, gscale, conv)
    for r0, r1 in _chunks(n, k):
        packed = encode_fp8_blocks_to_packed(p.raw[r0:r1], p.s16[r0:r1], safe[r0:r1])
        w.write(woff + r0 * wrow, packed.cpu(), t.name)
    w.write(soff, ws.view(torch.uint8).cpu(), t.name)
    w.write(goff, gscale.to(torch.float32).reshape(1).cpu(), t.name)


def _to_nvfp4(unit: Unit, ts: tuple[TensorPlan, ...], w: Writer, opts: Options, device: torch.device,
              kernel=None) -> str:
    """Returns the hot-path kernel's name ("" when the unit took the generic path)."""
    from v4convert.kernels.native import Kernel

    from .methods import get as get_method
    if opts.calib is not None:      # calibrated method (v4convert.calib.apply.CalibOptions.write_unit)
        opts.calib.write_unit(unit, ts, w, opts)
        return ""
    conv = _conv(opts)
    method = get_method(opts.scale_method)
    if method.fp8_hot_path and all("scale" in t.src for t in ts):
        # hot path (FP8 release -> NVFP4 RTN): each weight read once, fused partners share the amax
        k, _ = choose_kernel(kernel, device.type)
        if k is Kernel.NATIVE:
            prepared = [_fp8_read_native(t) for t in ts]        # reads outside the compute slot
            with compute():
                for t, p in zip(ts, prepared):
                    _fp8_amax_native(t, p)
        else:
            prepared = [_fp8_prepare(t, device) for t in ts]
        shared = torch.stack([p.amax for p in prepared]).amax()
        for t, p in zip(ts, prepared):
            _fp8_encode(t, p, shared, opts, unit, w)
        return k.value
    scales = {t.name: (_scale_f32(t, read_rows(t.src["scale"])) if "scale" in t.src else None) for t in ts}
    amaxes = [fp8_amax(t, scales[t.name]) if scales[t.name] is not None else float_amax(t) for t in ts]
    shared = torch.stack(amaxes).amax()      # fused partners share one global scale
    for t in ts:
        n, k = t.shape
        s = scales[t.name]
        woff, wrow = _out(unit, t, Part.WEIGHT)
        soff, srow = _out(unit, t, Part.SCALE)
        goff, _ = _out(unit, t, Part.GLOBAL_SCALE)
        gscale = None
        for r0, r1 in ([(0, n)] if method.whole_tensor else _chunks(n, k)):
            q = method.nvfp4(_decode_chunk(t, r0, r1, s), convention=conv, global_amax=shared, name=t.name)
            w.write(woff + r0 * wrow, q.packed, t.name)
            w.write(soff + r0 * srow, q.block_scale.view(torch.uint8), t.name)
            g = q.global_scale.to(torch.float32).reshape(1)
            if gscale is not None and not torch.equal(g, gscale):
                raise QuantizeError(f"tensor {t.name}: global scale differs between row chunks (codec bug)")
            gscale = g
        w.write(goff, gscale, t.name)
    return ""


def _mxfp4_to_nvfp4(unit: Unit, ts: tuple[TensorPlan, ...], w: Writer, opts: Options,
                    kernel=None) -> tuple[int, int, str]:
    """Re-pack native MXFP4 to NVFP4; fused partners share one power-of-two global scale. Native kernel: the
    partners' read buffers go to C as separate parts (no concatenation); torch: the codec on their row
    concatenation (same bytes). -> (blocks, inexact blocks, kernel name)."""
    from v4convert.formats.mxfp4 import mxfp4_to_nvfp4_parts
    from v4convert.kernels.native import Kernel
    conv = _conv(opts)
    ks = {t.shape[1] for t in ts}
    if len(ks) != 1:
        raise QuantizeError(f"tensors {[t.name for t in ts]}: fused partners with different in-features")
    name = " + ".join(t.name for t in ts)
    parts = [(read_rows(t.src["weight"]).view(torch.uint8), read_rows(t.src["scale"]).view(torch.uint8)) for t in ts]
    k, _ = choose_kernel(kernel, "cpu")     # both kernels run on the CPU, whatever --device the FP8 path uses
    if k is Kernel.NATIVE:
        from v4convert.kernels.native.repack import mxfp4_to_nvfp4_native
        with compute():
            outs, rep = mxfp4_to_nvfp4_native(parts, conv, threads=_nthreads(), name=name)
    else:
        outs, rep = mxfp4_to_nvfp4_parts(parts, conv, name)
    for t, q in zip(ts, outs):
        woff, _ = _out(unit, t, Part.WEIGHT)
        soff, _ = _out(unit, t, Part.SCALE)
        goff, _ = _out(unit, t, Part.GLOBAL_SCALE)
        w.write(woff, q.packed, t.name)
        w.write(soff, q.block_scale.view(torch.uint8), t.name)
        w.write(goff, q.global_scale.to(torch.float32).reshape(1), t.name)
    return rep.blocks, rep.inexact_blocks, k.value


def _to_mxfp4(unit: Unit, t: TensorPlan, w: Writer, opts: Options) -> None:
    from v4convert.formats.mxfp4 import mxfp4_quantize
    if opts.calib is not None:      # calibrated method (v4convert.calib.apply.CalibOptions.write_unit)
        opts.calib.write_unit(unit, (t,), w, opts)
        return
    rule = opts.mx_rule
    mse = opts.scale_method is ScaleChoice.MSE   # per-block exponent search (rows independent: chunks are fine)
    n, k = t.shape
    s = _scale_f32(t, read_rows(t.src["scale"])) if "scale" in t.src else None
    woff, wrow = _out(unit, t, Part.WEIGHT)
    soff, srow = _out(unit, t, Part.SCALE)
    for r0, r1 in _chunks(n, k):
        q = mxfp4_quantize(_decode_chunk(t, r0, r1, s), rule=rule, name=t.name, mse=mse)
        w.write(woff + r0 * wrow, q.packed, t.name)
        w.write(soff + r0 * srow, q.scale.view(torch.uint8), t.name)


def run_unit(unit: Unit, out_dir: Path, opts: Options, device: str = "cpu", kernel=None,
             stage: bool = False) -> UnitResult:
    """Execute one unit; codec errors come back as :class:`QuantizeError` naming the tensor.

    ``device``: where the FP8 -> NVFP4 RTN hot path computes ("cuda" when present); ``kernel``
    (``formats.native.Kernel`` or None = :func:`choose_kernel`'s default) which implementation runs it and
    the MXFP4 re-pack (always on the CPU).
    Output bytes depend on neither (exact-rounding IEEE float32 in the same operation order). ``stage``: the unit's
    writes go through :class:`StagedWriter` (O_DIRECT) and its bytes come back in ``UnitResult.staged`` (same process
    only: the caller releases them)."""
    with _pool().scope():                 # every read buffer of this unit returns to the pool at its end
        _LOCAL.reader = DirectReader(_pool(), direct=direct_io_enabled())
        try:
            return _run_unit(unit, out_dir, opts, device, kernel, stage)
        finally:
            _LOCAL.reader.close()
            _LOCAL.reader = None


def _run_unit(unit: Unit, out_dir: Path, opts: Options, device: str, kernel, stage: bool = False) -> UnitResult:
    start = min(unit.offsets.values())
    staged = stage and 0 < unit.bytes_out <= STAGE_MAX
    w = StagedWriter(out_dir / unit.shard, start, start + unit.bytes_out) if staged else Writer(out_dir / unit.shard)
    blocks = inexact = 0
    used = ""
    ok = False
    try:
        a = unit.tensors[0].action
        if a is Action.TO_NVFP4:
            used = _to_nvfp4(unit, unit.tensors, w, opts, torch.device(device), kernel)
        elif a is Action.MXFP4_TO_NVFP4:
            blocks, inexact, used = _mxfp4_to_nvfp4(unit, unit.tensors, w, opts, kernel)
        else:
            for t in unit.tensors:
                if t.action in (Action.COPY, Action.MXFP4_REWRAP):
                    _copy(unit, t, w, opts)
                elif t.action is Action.FP8_REWRAP:
                    _fp8_rewrap(unit, t, w, opts)
                elif t.action is Action.FP8_TO_BF16:
                    _fp8_to_bf16(unit, t, w, opts)
                elif t.action is Action.TO_MXFP4:
                    _to_mxfp4(unit, t, w, opts)
                else:
                    raise QuantizeError(f"tensor {t.name}: action {t.action.value} outside its unit kind")
        ok = True
    except CodecInputError as e:
        raise QuantizeError(str(e)) from None
    finally:
        if not staged:
            w.close()
        elif not ok:
            w.abandon()
    return UnitResult(unit.index, unit.bytes_in, blocks, inexact, used, w.commit(unit.shard) if staged else None)


def init_worker(threads: int) -> None:
    """Pool initializer: ``threads`` intra-op threads per worker process. Ctrl-C reaches the whole
    process group: workers ignore SIGINT so only the parent handles it (one message, clean shutdown)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, threads))
