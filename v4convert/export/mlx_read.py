"""Read an MLX export back (our decoder of MLX's layout): the values mlx-lm computes with.

:func:`mlx_as_checkpoint` writes a float32 checkpoint with the *source* checkpoint's names and config
holding the MLX model's values (``embed_q`` / ``unembed_out`` merged back into ``kv_b_proj``, stacked
experts split); tensors the export leaves out (the MTP block) keep the source's values. Our runtime on
that checkpoint is what mlx-lm must match on the MLX directory (``tests/test_mlx_export.py``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from v4convert.checkpoint import Checkpoint, TensorInfo
from v4convert.formats import mlx_quant as mq
from v4convert.formats.mlx_quant import MLXMode, MLXPacked, MLXQuant
from v4convert.formats.safetensors_io import (
    MappedFile,
    PlannedTensor,
    read_header,
    write_streaming,
)
from v4convert.families.roles import Role, Storage

from .mlx import EXPERT_PROJ, MLXExportError


class MLXModel:
    """The tensors of an MLX model directory, decoded to float32 by module name (``name`` without
    ``.weight``), using its ``config.json`` ``quantization`` block for mode/bits/group size."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        cfg = json.loads((self.root / "config.json").read_text())
        self.quant = cfg.get("quantization") or {}
        self.entries = {}
        for f in sorted(self.root.glob("model*.safetensors")):
            ents, _ = read_header(f)
            self.entries.update(ents)
        self._maps: dict[Path, MappedFile] = {}

    def _raw(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.path not in self._maps:
            self._maps[e.path] = MappedFile(e.path)
        return self._maps[e.path].tensor(e)

    def spec(self, module: str) -> MLXQuant:
        q = self.quant.get(module, self.quant)
        if not q:
            raise MLXExportError(f"{self.root}: module {module} has scales but no quantization entry")
        return MLXQuant(MLXMode(q.get("mode", "affine")), int(q["bits"]), int(q["group_size"]))

    def values(self, module: str, tensor: str | None = None) -> torch.Tensor:
        """float32 values of ``module`` (quantized or not); ``tensor``: a float tensor's full name."""
        if f"{module}.scales" not in self.entries:
            return self._raw(tensor or f"{module}.weight").to(torch.float32)
        q = self.spec(module)
        biases = self._raw(f"{module}.biases") if f"{module}.biases" in self.entries else None
        w = self._raw(f"{module}.weight").contiguous().view(torch.uint8)
        return mq.decode(MLXPacked(w, self._raw(f"{module}.scales"), biases), q)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()


def _value(mlx: MLXModel, ck: Checkpoint, info: TensorInfo, stacked: dict) -> torch.Tensor:
    if info.mtp:
        return ck.dequantize(info.name)
    base = info.name.removesuffix(".weight")
    if info.expert is not None:
        module = f"model.layers.{info.layer}.mlp.switch_mlp.{EXPERT_PROJ[info.role]}"
        if stacked.get("name") != module:           # experts come in order: decode each stack once
            stacked.update(name=module, vals=mlx.values(module))
        return stacked["vals"][info.expert].clone()
    if info.role is Role.ATTN_KV_B:
        a = ck.arch
        attn = info.name.removesuffix(".kv_b_proj.weight")
        k = mlx.values(f"{attn}.embed_q").transpose(1, 2)          # [H, nope, r]
        v = mlx.values(f"{attn}.unembed_out")                       # [H, v, r]
        return torch.cat([k, v], dim=1).reshape(a.n_heads * (a.nope + a.v_head), -1).contiguous()
    return mlx.values(base, info.name).reshape(info.shape)


def mlx_as_checkpoint(mlx_dir: str | Path, ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (new): a float32 checkpoint of ``ckpt``'s layout holding the MLX model's values."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    mlx = MLXModel(Path(mlx_dir))
    try:
        with Checkpoint.open(ckpt) as ck:
            stacked: dict = {}
            planned = [PlannedTensor(i.name, "I64" if i.storage is Storage.I64 else "F32", i.shape,
                                     lambda i=i: _value(mlx, ck, i, stacked)) for i in ck.infos()]
            write_streaming(out_dir / "model.safetensors", planned, {"format": "pt"})
            cfg = {k: v for k, v in ck.config.items() if k not in ("quantization_config", "expert_dtype")}
            (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
            for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                if (ck.root / f).is_file():
                    shutil.copy(ck.root / f, out_dir / f)
    finally:
        mlx.close()
    return out_dir
