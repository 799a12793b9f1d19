"""Streaming reader for DeepSeek checkpoints as published (and as transformers or we write them).

``Checkpoint.open(dir)`` reads ``config.json`` and the safetensors headers (never a whole shard),
pairs every weight with its scale tensors wherever they sit, maps every name to a typed role
(unknown names raise) and decodes tensors one at a time from memory-mapped shards:

    ck = Checkpoint.open(path)
    ck.family, ck.config, ck.names()
    info = ck.tensor_info("model.layers.3.mlp.experts.7.up_proj.weight")  # role, layer, expert, storage
    w = ck.dequantize(info.name)   # exact float32, logical shape
    parts = ck.raw(info.name)      # {"weight": ..., "scale": ..., ...} as stored
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from v4convert.formats import fp4, fp8
from v4convert.formats.safetensors_io import FormatError, MappedFile, TensorEntry, read_header

from .families.layout import FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK, Arch, LayoutError, Slot, inventory, parse_name
from .families.roles import Family, Role, Storage
from .paths import CheckpointError, checkpoint_file, read_json

MAX_CONFIG_BYTES = 16 << 20      # a published config.json is a few KB


class MissingTensorsError(CheckpointError):
    """Tensors the config implies are absent (``--allow-missing`` overrides)."""


# Stored-name suffix -> (component). Order matters: longest suffix first. The logical name is the
# stored name with the suffix replaced by ".weight".
_COMPONENT_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".weight_scale_inv", "scale"),       # DeepSeek V3 FP8 block scale (a multiplier despite its name)
    (".weight_global_scale", "global_scale"),   # compressed-tensors NVFP4 (divisor)
    (".input_global_scale", "input_scale"),
    (".weight_scale_2", "global_scale"),  # ModelOpt NVFP4 (multiplier)
    (".weight_packed", "weight"),         # compressed-tensors packed FP4
    (".weight_scale", "scale"),           # compressed-tensors / ModelOpt block scale
    (".input_scale", "input_scale"),
    (".scale", "scale"),                  # DeepSeek V4 FP8 / FP4 scale
)


@dataclass(frozen=True)
class TensorInfo:
    """One logical tensor: its slot in the family layout plus how it is actually stored."""
    name: str
    role: Role
    layer: int | None
    expert: int | None
    mtp: bool
    storage: Storage                      # actual storage in this checkpoint
    published: Storage                    # storage in the family's published release
    shape: tuple[int, ...]                # logical shape (what dequantize returns)
    parts: dict[str, TensorEntry]         # component -> stored tensor ("weight", "scale", ...)

    @property
    def stored_dtype(self) -> str:
        return self.parts["weight"].dtype

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.parts["weight"].shape

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.parts.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A DeepSeek checkpoint directory opened lazily (headers parsed, data memory-mapped on demand)."""

    def __init__(self, root: Path, config: dict, arch: Arch, infos: dict[str, TensorInfo]):
        self.root = root
        self.config = config
        self.arch = arch
        self._infos = infos
        self._maps: dict[Path, MappedFile] = {}

    # ------------------------------------------------------------------ opening
    @staticmethod
    def open(path: str | os.PathLike) -> "Checkpoint":
        root = Path(path)
        if not (root / "config.json").is_file():
            raise CheckpointError(f"{root}: no config.json (not a checkpoint directory)")
        cfg_path = checkpoint_file(root, "config.json")
        config = read_json(cfg_path, "config.json", MAX_CONFIG_BYTES)
        if not isinstance(config, dict):
            raise CheckpointError(f"{root / 'config.json'}: not a JSON object")
        try:
            arch = Arch.from_config(config, str(cfg_path))
        except LayoutError as e:
            raise CheckpointError(str(e)) from None
        entries = _read_entries(root)
        return Checkpoint(root, config, arch, _assemble(arch, config, entries))

    # ------------------------------------------------------------------ queries
    @property
    def family(self) -> Family:
        return self.arch.family

    def names(self) -> list[str]:
        """Logical tensor names (scale tensors are parts of their weight, not listed)."""
        return list(self._infos)

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor {name!r} in this checkpoint") from None

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    def missing(self) -> list[Slot]:
        """Tensors the config implies but the checkpoint lacks (e.g. MTP dropped by transformers)."""
        return [s for s in inventory(self.arch) if s.name not in self._infos]

    def check_complete(self, allow_missing: bool = False) -> dict:
        """Refuse a checkpoint that lacks tensors its config implies (one line: the first few names and
        the count) unless ``allow_missing``. A wholly absent MTP block is accepted: transformers drops it
        when saving. Returns what to record in an output's metadata (empty when nothing is absent)."""
        missing = [s.name for s in self.missing()]
        if not missing:
            return {}
        if all(s.mtp for s in self.missing()) and not any(i.mtp for i in self.infos()):
            return {"mtp_absent": True}
        if not allow_missing:
            first = ", ".join(missing[:3])
            raise MissingTensorsError(
                f"{self.root}: {len(missing)} tensors the config implies are missing (e.g. {first}); "
                f"incomplete download? pass --allow-missing to write an incomplete artifact anyway")
        return {"allowed_missing": {"count": len(missing), "first": missing[:10]}}

    def shards(self) -> list[Path]:
        return sorted({e.path for i in self._infos.values() for e in i.parts.values()})

    # ------------------------------------------------------------------ data
    def _map(self, path: Path) -> MappedFile:
        m = self._maps.get(path)
        if m is None:
            m = self._maps[path] = MappedFile(path)
        return m

    def raw(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of ``name`` by component, as zero-copy views of the mmapped shards."""
        info = self.tensor_info(name)
        return {k: self._map(e.path).tensor(e) for k, e in info.parts.items()}

    def dequantize(self, name: str) -> torch.Tensor:
        """Exact float32 values of ``name`` in its logical shape (a new tensor, not a view).

        The shard pages it read are released afterwards, so a pass over every tensor keeps RSS
        bounded by the largest tensor rather than growing with the checkpoint.
        """
        info = self.tensor_info(name)
        parts = self.raw(name)
        out = decode(info, parts)
        if out.numel() and out.data_ptr() == parts["weight"].data_ptr():   # decode returned the stored view
            out = out.clone()
        del parts
        self.release(name)
        return out

    def release(self, name: str) -> None:
        """Drop the resident shard pages of ``name`` (call after using ``raw(name)`` views in a stream)."""
        for e in self.tensor_info(name).parts.values():
            self._map(e.path).release(e)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- decoding
def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], br: int, bc: int) -> torch.Tensor:
    """Broadcast a per-block scale ``[ceil(N/br), ceil(K/bc)]`` to ``[N, K]`` (edge blocks partial)."""
    n, k = shape
    return scale.repeat_interleave(br, 0)[:n].repeat_interleave(bc, 1)[:, :k]


def _decode_fp8_block(w: torch.Tensor, s32: torch.Tensor, shape: tuple[int, int],
                      rows_per_chunk: int = 8 * FP8_BLOCK) -> torch.Tensor:
    """E4M3 ``[N, K]`` x block scale ``[B(N), B(K)]`` -> float32, in row chunks so that temporaries
    stay at a few MB even for a 7168 x 16384 weight (peak = the output + one chunk)."""
    n, k = shape
    out = torch.empty((n, k), dtype=torch.float32)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        sc = s32[r0 // FP8_BLOCK: -(-r1 // FP8_BLOCK)]
        torch.mul(fp8.e4m3_to_float32(w[r0:r1]), _expand_blocks(sc, (r1 - r0, k), FP8_BLOCK, FP8_BLOCK),
                  out=out[r0:r1])
    return out


def decode(info: TensorInfo, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decode stored parts to float32 (exact: every product below is exact in float32)."""
    st = info.storage
    w = parts["weight"]
    if st in (Storage.BF16, Storage.F16, Storage.F32):
        return w.to(torch.float32)
    if st is Storage.I64:
        return w.clone()
    if st is Storage.FP8_BLOCK:
        s = parts["scale"]
        s32 = fp8.e8m0_to_float32(s.view(torch.uint8)) if info.parts["scale"].dtype == "F8_E8M0" \
            else s.to(torch.float32)
        return _decode_fp8_block(w.view(torch.uint8), s32, info.shape)
    if st is Storage.MXFP4:
        s32 = fp8.e8m0_to_float32(parts["scale"].view(torch.uint8))
        return fp4.decode_fp4(w) * s32.repeat_interleave(MXFP4_BLOCK, 1)
    if st in (Storage.NVFP4_CT, Storage.NVFP4_MODELOPT):
        bs = fp8.e4m3_to_float32(parts["scale"].view(torch.uint8))
        g = parts["global_scale"].to(torch.float32).reshape(())
        # compressed-tensors stores the reciprocal global scale (divide); ModelOpt the multiplier.
        # Order as both producers dequantize: code * (block_scale op global) — last-bit relevant.
        eff = bs / g if st is Storage.NVFP4_CT else bs * g
        return fp4.decode_fp4(w) * eff.repeat_interleave(NVFP4_BLOCK, 1)
    raise CheckpointError(f"tensor {info.name}: cannot decode storage {st.value}")


# ---------------------------------------------------------------------- assembly
def _shown(name: str) -> str:
    """A tensor name as an error line shows it: as is, or escaped (repr) if it holds control characters, so
    a hostile index cannot break the one-line ``error: ...`` rule."""
    return name if name.isprintable() else repr(name)


def _read_entries(root: Path) -> dict[str, TensorEntry]:
    """All stored tensors of the checkpoint, validated, from the index or the single file."""
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    entries: dict[str, TensorEntry] = {}
    if index.is_file():
        body = read_json(checkpoint_file(root, index.name), "safetensors index")
        wm = body.get("weight_map") if isinstance(body, dict) else None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: not a safetensors index (needs an object 'weight_map': "
                                  f"tensor name -> shard file name)")
        by_file: dict[Path, list[str]] = {}
        shard_of: dict[str, Path] = {}
        for name, shard in wm.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index}: tensor {_shown(name)}: shard name is not a string")
            p = shard_of[name] = checkpoint_file(root, shard, index, "shard name")
            by_file.setdefault(p, []).append(name)
        for path, names in sorted(by_file.items()):
            try:
                found, _ = read_header(path)
            except FormatError as e:
                raise CheckpointError(str(e)) from None
            for n in names:
                if n not in found:
                    raise CheckpointError(f"{path}: tensor {_shown(n)} is listed in {index.name} but not in the shard")
            for n, e in found.items():
                if shard_of.get(n) != path:
                    raise CheckpointError(f"{path}: tensor {_shown(n)} is in the shard but the index maps it elsewhere")
                entries[n] = e
    elif single.is_file():
        try:
            entries, _ = read_header(checkpoint_file(root, single.name))
        except FormatError as e:
            raise CheckpointError(str(e)) from None
    else:
        raise CheckpointError(f"{root}: neither model.safetensors.index.json nor model.safetensors found")
    return entries


def _split_component(name: str, arch: Arch) -> tuple[str, str]:
    """Stored name -> (logical name, component). Plain tensors are their own 'weight'."""
    try:
        parse_name(arch, name)
        return name, "weight"
    except LayoutError:
        pass
    for suffix, comp in _COMPONENT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight", comp
    return name, "weight"


def _assemble(arch: Arch, config: dict, entries: dict[str, TensorEntry]) -> dict[str, TensorInfo]:
    groups: dict[str, dict[str, TensorEntry]] = {}
    for stored_name, e in entries.items():
        logical, comp = _split_component(stored_name, arch)
        g = groups.setdefault(logical, {})
        if comp in g:
            raise CheckpointError(f"{e.path}: tensor {stored_name}: duplicate {comp} for {logical} "
                                  f"(also {g[comp].name} in {g[comp].path.name})")
        g[comp] = e
    qc = config.get("quantization_config") or {}
    infos: dict[str, TensorInfo] = {}
    for logical, parts in groups.items():
        anyp = next(iter(parts.values()))
        if "weight" not in parts:
            raise CheckpointError(f"{anyp.path}: tensor {anyp.name}: scale without its weight {logical}")
        try:
            slot = parse_name(arch, logical)
        except LayoutError as err:
            raise CheckpointError(f"{parts['weight'].path}: {err}") from None
        storage = _detect_storage(slot, parts, qc, arch)
        name = slot.name
        if name in infos:
            raise CheckpointError(f"{parts['weight'].path}: tensor {logical} duplicates {name}")
        infos[name] = TensorInfo(name, slot.role, slot.layer, slot.expert, slot.mtp, storage, slot.storage,
                                 slot.shape, parts)
    return infos


def _where(e: TensorEntry) -> str:
    return f"{e.path}: tensor {e.name}"


def _detect_storage(slot: Slot, parts: dict[str, TensorEntry], qc: dict, arch: Arch) -> Storage:
    """Infer the storage from dtypes/shapes and check it against the layout and the config."""
    w = parts["weight"]
    shape = slot.shape
    comps = set(parts)
    plain = {"BF16": Storage.BF16, "F16": Storage.F16, "F32": Storage.F32, "I64": Storage.I64}
    if w.dtype in plain and comps != {"weight"}:
        raise CheckpointError(f"{_where(w)}: {w.dtype} weight with unexpected parts {sorted(comps - {'weight'})}")
    if w.dtype in plain:
        if w.shape != shape:
            raise CheckpointError(f"{_where(w)}: shape {list(w.shape)} but the config implies {list(shape)}")
        st = plain[w.dtype]
        if slot.storage is Storage.I64 and st is not Storage.I64:
            raise CheckpointError(f"{_where(w)}: dtype {w.dtype} but {slot.role.name} is stored as I64")
        if slot.storage is not Storage.I64 and st is Storage.I64:
            raise CheckpointError(f"{_where(w)}: dtype I64 for a float tensor ({slot.role.name})")
        if slot.storage.is_quantized and qc.get("quant_method") == "fp8":
            raise CheckpointError(
                f"{_where(w)}: dtype {w.dtype} contradicts config.json quantization_config (fp8): "
                f"{slot.role.name} must be {slot.storage.value}")
        if slot.storage is Storage.MXFP4 and arch.expert_storage is Storage.MXFP4:
            raise CheckpointError(f"{_where(w)}: dtype {w.dtype} contradicts config.json expert_dtype 'fp4'")
        return st
    if len(shape) != 2:
        raise CheckpointError(f"{_where(w)}: {slot.role.name} is not a matrix but is stored quantized ({w.dtype})")
    n, k = shape
    if w.dtype == "F8_E4M3":
        if "scale" not in parts:
            raise CheckpointError(f"{_where(w)}: FP8 weight without its scale tensor")
        s = parts["scale"]
        if w.shape != shape:
            raise CheckpointError(f"{_where(w)}: shape {list(w.shape)} but the config implies {list(shape)}")
        want = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        if s.shape != want:
            raise CheckpointError(f"{_where(s)}: scale shape {list(s.shape)}, expected {list(want)} for a "
                                  f"{list(shape)} weight in 128x128 blocks")
        if s.dtype not in ("F32", "BF16", "F8_E8M0"):
            raise CheckpointError(f"{_where(s)}: scale dtype {s.dtype}, expected F32 or F8_E8M0")
        if slot.storage is Storage.MXFP4 and arch.expert_storage is Storage.MXFP4:
            raise CheckpointError(f"{_where(w)}: FP8 expert contradicts config.json expert_dtype 'fp4'")
        extra = comps - {"weight", "scale", "input_scale"}
        if extra:
            raise CheckpointError(f"{_where(w)}: unexpected parts {sorted(extra)} for an FP8 block weight")
        return Storage.FP8_BLOCK
    if w.dtype in ("I8", "U8"):
        if w.shape != (n, k // 2) or k % 2:
            raise CheckpointError(f"{_where(w)}: packed FP4 shape {list(w.shape)}, expected {[n, k // 2]} "
                                  f"for logical {list(shape)}")
        if "scale" not in parts:
            raise CheckpointError(f"{_where(w)}: packed FP4 weight without its scale tensor")
        s = parts["scale"]
        if "global_scale" in parts:   # NVFP4
            if s.shape != (n, k // NVFP4_BLOCK) or s.dtype not in ("F8_E4M3", "U8"):
                raise CheckpointError(f"{_where(s)}: NVFP4 block scale {s.dtype} {list(s.shape)}, expected "
                                      f"F8_E4M3 {[n, k // NVFP4_BLOCK]}")
            g = parts["global_scale"]
            if g.numel != 1 or g.dtype != "F32":
                raise CheckpointError(f"{_where(g)}: NVFP4 global scale must be one F32, got {g.dtype} {list(g.shape)}")
            return Storage.NVFP4_CT if w.name.endswith(".weight_packed") else Storage.NVFP4_MODELOPT
        if s.shape != (n, k // MXFP4_BLOCK) or s.dtype not in ("F8_E8M0", "U8"):
            raise CheckpointError(f"{_where(s)}: MXFP4 scale {s.dtype} {list(s.shape)}, expected F8_E8M0 "
                                  f"{[n, k // MXFP4_BLOCK]}")
        return Storage.MXFP4
    raise CheckpointError(f"{_where(w)}: unsupported dtype {w.dtype} for {slot.role.name}")
