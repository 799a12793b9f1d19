"""Packed weights (FP8-block, NVFP4, MXFP4) and the packed linear ``y = x @ W.T`` that runs on them.

A :class:`PackedWeight` keeps a linear weight as stored on disk (4 or 8 bits per value plus scales);
:func:`packed_linear` computes with it without ever materialising the whole float weight:

* CUDA tensors: the Triton GEMM of :mod:`v4convert.kernels.gemm` (dequantizes in registers);
* CPU tensors: :func:`packed_linear_reference`, a PyTorch dequantize-and-matmul tiled over N (one tile of
  ``tile_rows x K`` float32 at a time).

Internal conventions (one for every codec, DESIGN §4):

* ``data``  uint8 ``[*, N, K/2]`` (FP4: byte = code[2j] | code[2j+1] << 4) or ``[*, N, K]`` (FP8 E4M3 bytes);
* ``scale`` uint8 ``[*, N, K/16]`` E4M3 bytes (NVFP4), uint8 ``[*, N, K/32]`` E8M0 bytes (MXFP4), or float32
  ``[*, ceil(N/128), ceil(K/128)]`` multipliers (FP8 block; E8M0 scale tensors are decoded at load, exact);
* ``row_scale`` float32 ``[*, N]``: a per-output-row multiplier applied after the K sum. NVFP4's FP32 global
  scale in the ModelOpt (multiplier) form, broadcast over the rows of its matrix; all ones for the others.
  compressed-tensors stores the divisor ``weight_global_scale``: it is converted once to ``1/g`` (float64
  division rounded to float32), so a value here is ``(E2M1 * ws) * (1/g)`` where the reader computes
  ``(E2M1 * ws) / g``: equal, or one float32 rounding apart (<= 2**-23 relative).

The value of element ``[n, k]`` (float32, exact products except the NVFP4 global multiply):
FP4 ``E2M1[code] * blockscale[n, k // B] * row_scale[n]``; FP8 ``e4m3[n, k] * scale[n // 128, k // 128]``.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from v4convert.formats import fp4, fp8
from v4convert.formats.blocks import FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK
from v4convert.families.roles import Storage
from v4convert.errors import UserError


class PackedWeightError(UserError):
    """A packed weight or an input that does not fit it (shape, dtype, device, codec); names the tensor."""


class Codec(enum.Enum):
    """How a packed weight encodes its values. Value = (block along K, bytes of ``data`` per value)."""
    FP8_BLOCK = "fp8_block"   # E4M3 + float32 scale per 128x128 block
    NVFP4 = "nvfp4"           # E2M1 + E4M3 scale per 16 along K + per-row FP32 multiplier
    MXFP4 = "mxfp4"           # E2M1 + E8M0 scale per 32 along K

    @property
    def k_block(self) -> int:
        """Block of the scale along K (the K granularity of the codec)."""
        return _K_BLOCK[self]

    @property
    def is_fp4(self) -> bool:
        return self is not Codec.FP8_BLOCK


_K_BLOCK = {Codec.FP8_BLOCK: FP8_BLOCK, Codec.NVFP4: NVFP4_BLOCK, Codec.MXFP4: MXFP4_BLOCK}

# Checkpoint storage -> codec of the packed form. Storages absent here are plain floats (not packed).
STORAGE_CODEC: dict[Storage, Codec] = {
    Storage.FP8_BLOCK: Codec.FP8_BLOCK,
    Storage.NVFP4_CT: Codec.NVFP4,
    Storage.NVFP4_MODELOPT: Codec.NVFP4,
    Storage.MXFP4: Codec.MXFP4,
}

DEFAULT_TILE_BYTES = 8 << 20   # float32 bytes of one dequantized weight tile on the CPU path


@dataclass(frozen=True)
class PackedWeight:
    """A packed linear weight of logical shape ``shape = (*lead, N, K)`` (``lead`` = experts, or empty)."""
    codec: Codec
    data: torch.Tensor          # uint8, see module doc
    scale: torch.Tensor         # uint8 (FP4) or float32 (FP8 block), see module doc
    row_scale: torch.Tensor     # float32 [*lead, N]
    shape: tuple[int, ...]
    name: str = "weight"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ facts
    @property
    def n(self) -> int:
        return self.shape[-2]

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (data + scales + row scales)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.row_scale))

    def validate(self) -> None:
        """Raise :class:`PackedWeightError` unless dtypes, shapes and devices agree with ``codec``."""
        if len(self.shape) < 2:
            raise PackedWeightError(f"{self.name}: packed weight shape {self.shape} is not [*, N, K]")
        *lead, n, k = self.shape
        lead = tuple(lead)
        c = self.codec
        if k % (2 if c.is_fp4 else 1) or (c.is_fp4 and k % c.k_block):
            raise PackedWeightError(f"{self.name}: K={k} is not a multiple of the {c.value} block {c.k_block}")
        want_data = (*lead, n, k // 2) if c.is_fp4 else (*lead, n, k)
        want_scale = (*lead, n, k // c.k_block) if c.is_fp4 else (*lead, -(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        want_sdtype = torch.uint8 if c.is_fp4 else torch.float32
        checks = ((self.data, torch.uint8, want_data, "data"), (self.scale, want_sdtype, want_scale, "scale"),
                  (self.row_scale, torch.float32, (*lead, n), "row_scale"))
        for t, dt, shp, what in checks:
            if t.dtype != dt or tuple(t.shape) != shp:
                raise PackedWeightError(f"{self.name}: {c.value} {what} must be {dt} {list(shp)}, "
                                        f"got {t.dtype} {list(t.shape)}")
            if t.device != self.data.device:
                raise PackedWeightError(f"{self.name}: {what} on {t.device} but data on {self.data.device}")

    def to(self, device: torch.device | str) -> "PackedWeight":
        return PackedWeight(self.codec, self.data.to(device), self.scale.to(device), self.row_scale.to(device),
                            self.shape, self.name)

    def expert(self, e: int) -> "PackedWeight":
        """Matrix ``e`` of a stacked ``[E, N, K]`` weight (views, no copy)."""
        if len(self.shape) != 3:
            raise PackedWeightError(f"{self.name}: expert() needs a stacked [E, N, K] weight, shape {self.shape}")
        return PackedWeight(self.codec, self.data[e], self.scale[e], self.row_scale[e], self.shape[1:],
                            f"{self.name}[{e}]")

    # ------------------------------------------------------------------ decoding (reference)
    def dequantize_rows(self, n0: int, n1: int) -> torch.Tensor:
        """Exact float32 values of rows ``[n0, n1)`` of a single matrix, ``[n1 - n0, K]`` (PyTorch)."""
        if len(self.shape) != 2:
            raise PackedWeightError(f"{self.name}: dequantize_rows needs a [N, K] weight, shape {self.shape}")
        k, rows = self.k, n1 - n0
        byte_val = fp8.e4m3_to_float32(torch.arange(256, dtype=torch.uint8, device=self.device))   # [256]
        if self.codec is Codec.FP8_BLOCK:
            b0, b1 = n0 // FP8_BLOCK, -(-n1 // FP8_BLOCK)
            s = self.scale[b0:b1].repeat_interleave(FP8_BLOCK, 0)[n0 - b0 * FP8_BLOCK: n1 - b0 * FP8_BLOCK]
            w = byte_val.index_select(0, self.data[n0:n1].reshape(-1).int()).view(rows, k)
            return w.mul_(s.repeat_interleave(FP8_BLOCK, 1)[:, :k])
        # one gather per byte: table [256, 2] = (E2M1[low nibble], E2M1[high nibble])
        lut = fp4.e2m1_lut(device=self.device)
        b = torch.arange(256, device=self.device)
        pair = torch.stack((lut[b & 15], lut[b >> 4]), 1)
        w = pair.index_select(0, self.data[n0:n1].reshape(-1).int()).view(rows, -1, self.codec.k_block)
        sbyte = fp8.e8m0_to_float32(torch.arange(256, dtype=torch.uint8, device=self.device)) \
            if self.codec is Codec.MXFP4 else byte_val
        w.mul_(sbyte.index_select(0, self.scale[n0:n1].reshape(-1).int()).view(rows, -1, 1))
        w = w.view(rows, k)
        if self.codec is Codec.NVFP4:
            w.mul_(self.row_scale[n0:n1, None])
        return w

    def dequantize(self) -> torch.Tensor:
        """The whole float32 weight (tests and small tensors only; the compute paths never call it)."""
        if len(self.shape) == 3:
            return torch.stack([self.expert(e).dequantize() for e in range(self.shape[0])])
        return self.dequantize_rows(0, self.n)


# ---------------------------------------------------------------------- construction
def _nvfp4_row_scale(g: torch.Tensor, divisor: bool, n: int, name: str) -> torch.Tensor:
    """One FP32 global scale -> float32 ``[N]`` multiplier (``1/g`` in float64, rounded, for the divisor form)."""
    if g.numel() != 1:
        raise PackedWeightError(f"{name}: NVFP4 global scale must hold one value, shape {list(g.shape)}")
    gv = float(g.reshape(()).to(torch.float64))
    if not math.isfinite(gv) or gv <= 0:
        raise PackedWeightError(f"{name}: NVFP4 global scale {gv} is not a positive finite number")
    mult = torch.tensor(1.0 / gv if divisor else gv, dtype=torch.float64).to(torch.float32)
    return mult.expand(n).clone()


def pack_from_parts(storage: Storage, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                    name: str = "weight", scale_is_e8m0: bool | None = None) -> PackedWeight:
    """Build a :class:`PackedWeight` from stored tensors (``Checkpoint.raw`` components: ``weight``, ``scale``,
    ``global_scale``). Copies the bytes (the result owns its memory: never views of a mmapped shard).

    ``scale_is_e8m0`` (FP8 block only): the scale tensor holds E8M0 bytes; ``None`` = infer from its dtype
    (``float8_e8m0fnu`` or uint8 -> E8M0, float32/bfloat16 -> multipliers).
    """
    codec = STORAGE_CODEC.get(storage)
    if codec is None:
        raise PackedWeightError(f"{name}: storage {storage.value} is not a packed codec")
    for comp in ("weight", "scale") + (("global_scale",) if codec is Codec.NVFP4 else ()):
        if comp not in parts:
            raise PackedWeightError(f"{name}: {storage.value} weight lacks its {comp} tensor")
    n, k = shape
    w, s = parts["weight"], parts["scale"]
    data = w.view(torch.uint8).clone() if w.element_size() == 1 else None
    if data is None:
        raise PackedWeightError(f"{name}: {storage.value} weight must have 1-byte elements, got {w.dtype}")
    ones = torch.ones(n, dtype=torch.float32)
    if codec is Codec.FP8_BLOCK:
        e8m0 = scale_is_e8m0 if scale_is_e8m0 is not None else s.dtype in (torch.float8_e8m0fnu, torch.uint8)
        sc = fp8.e8m0_to_float32(s.view(torch.uint8)) if e8m0 else s.to(torch.float32).clone()
        return PackedWeight(codec, data, sc, ones, (n, k), name)
    if s.element_size() != 1:
        raise PackedWeightError(f"{name}: {storage.value} block scale must have 1-byte elements, got {s.dtype}")
    sc = s.view(torch.uint8).clone()
    if codec is Codec.MXFP4:
        return PackedWeight(codec, data, sc, ones, (n, k), name)
    row = _nvfp4_row_scale(parts["global_scale"], storage is Storage.NVFP4_CT, n, name)
    return PackedWeight(codec, data, sc, row, (n, k), name)


def from_checkpoint(ck, name: str) -> PackedWeight:
    """The packed form of weight ``name`` of ``ck`` (``v4convert.checkpoint.Checkpoint``), in CPU memory.

    Raises :class:`PackedWeightError` when the tensor is not stored in a packed codec (plain float weights
    are not packed: load them with ``ck.dequantize``)."""
    info = ck.tensor_info(name)
    if len(info.shape) != 2:
        raise PackedWeightError(f"{name}: not a matrix (logical shape {list(info.shape)})")
    e8m0 = info.parts["scale"].dtype == "F8_E8M0" if "scale" in info.parts else None
    return pack_from_parts(info.storage, ck.raw(name), tuple(info.shape), name, scale_is_e8m0=e8m0)


def stack_experts(weights: list[PackedWeight], name: str = "experts") -> PackedWeight:
    """Stack ``E`` packed matrices of one codec and shape into one ``[E, N, K]`` packed weight (a copy)."""
    if not weights:
        raise PackedWeightError(f"{name}: no expert weights to stack")
    c, shp = weights[0].codec, weights[0].shape
    for w in weights:
        if w.codec is not c or w.shape != shp:
            raise PackedWeightError(f"{name}: expert {w.name} is {w.codec.value} {w.shape}, expected {c.value} {shp}")
    return PackedWeight(c, torch.stack([w.data for w in weights]), torch.stack([w.scale for w in weights]),
                        torch.stack([w.row_scale for w in weights]), (len(weights), *shp), name)


# ---------------------------------------------------------------------- compute
def check_linear_input(x: torch.Tensor, pw: PackedWeight) -> None:
    """Shape/dtype/device checks shared by every path of ``x @ W.T``."""
    if len(pw.shape) != 2:
        raise PackedWeightError(f"{pw.name}: packed_linear needs a [N, K] weight, shape {pw.shape}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PackedWeightError(f"{pw.name}: activations must be float32/bfloat16/float16, got {x.dtype}")
    if x.shape[-1] != pw.k:
        raise PackedWeightError(f"{pw.name}: input last dim {x.shape[-1]} != weight K {pw.k}")
    if x.device != pw.device:
        raise PackedWeightError(f"{pw.name}: input on {x.device}, weight on {pw.device}")


def tile_rows(pw: PackedWeight, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Rows of one dequantized float32 tile on the CPU path (a multiple of 128 when N allows it)."""
    rows = max(1, tile_bytes // (4 * pw.k))
    if rows >= FP8_BLOCK:
        rows -= rows % FP8_BLOCK
    return min(rows, pw.n)


def packed_linear_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                            tile_bytes: int = DEFAULT_TILE_BYTES) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias) -> [..., N]`` in ``x.dtype``: float32 math on dequantized tiles of
    ``tile_rows(pw)`` rows (never the whole weight). The CPU path and the GEMM kernel's reference."""
    check_linear_input(x, pw)
    x2 = x.reshape(-1, pw.k).float()
    y = torch.empty(x2.shape[0], pw.n, dtype=torch.float32, device=x.device)
    step = tile_rows(pw, tile_bytes)
    for n0 in range(0, pw.n, step):
        n1 = min(pw.n, n0 + step)
        y[:, n0:n1] = x2 @ pw.dequantize_rows(n0, n1).T
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], pw.n)


def packed_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with ``W`` packed: Triton on CUDA, tiled PyTorch on CPU. Output ``x.dtype``."""
    check_linear_input(x, pw)
    if x.is_cuda:
        from .gemm import packed_gemm     # Triton is only imported where it can run
        y = packed_gemm(x.reshape(-1, pw.k), pw).reshape(*x.shape[:-1], pw.n)
        return y if bias is None else y + bias.to(y.dtype)
    return packed_linear_reference(x, pw, bias)
