"""Artifact runners: one interface for every thing ``verify`` can run (DESIGN §7).

A runner owns a model with a KV cache and answers ``forward(ids [1, T], start_pos) -> float32 logits [T, V]``
(``start_pos == 0`` starts a new sequence; decode steps pass one token at ``start_pos = length so far``).
Runners that can see inside the model also return the per-layer hidden states of the last forward.

Kinds (:class:`ArtifactKind`), chosen from the path by :func:`detect_kind` or explicitly:

* ``RUNTIME``: any directory ``v4convert.runtime.load`` reads (published FP8/FP4 layouts, our FP4 containers).
  Hidden states are taken with forward hooks on the decoder blocks (V3: ``model.model.layers[i]`` output
  ``[B, T, D]``; V4: ``model.layers[i]`` output, the hyper-connection streams ``[B, T, hc, D]``).
* ``GGUF``: through llama.cpp itself (``v4convert.artifact_gguf``: llama-cpp-python ``Llama(path, logits_all=True)``,
  ``n_tokens = start_pos`` then ``eval(ids)``, logits from ``scores``, CPU, F32 KV cache); no hidden states.
* ``MLX``: an mlx-lm model directory (``config.json`` with ``quantization`` or our ``v4convert_artifact: mlx``
  marker), through mlx-lm itself (``v4convert.artifacts.mlx``, a worker process); no hidden states.
* ``ONNX`` (planned): through onnxruntime with the graph's ``past_key_values`` inputs; no hidden states.

Planned kinds (:data:`PLANNED`) raise :class:`ArtifactError` before any work; adding one means writing a
class with this interface and moving its row to :data:`RUNNERS`.
"""
from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch


class ArtifactError(ValueError):
    """An artifact verify cannot open or run (unknown kind, runner not available)."""


class ArtifactKind(enum.Enum):
    RUNTIME = "runtime"
    GGUF = "gguf"
    ONNX = "onnx"
    MLX = "mlx"


class Runner(Protocol):
    """What ``verify`` needs from a model."""
    path: Path
    kind: ArtifactKind
    vocab_size: int

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``ids`` LongTensor ``[1, T]`` at cache positions ``start_pos..start_pos+T-1`` -> float32 ``[T, V]``."""

    def hidden_states(self) -> list[torch.Tensor] | None:
        """Per-layer outputs ``[T, ...]`` of the last ``forward`` (float32), or None if this runner cannot see them."""

    def close(self) -> None:
        ...


def detect_kind(path: Path) -> ArtifactKind:
    """``*.gguf`` -> GGUF; ``*.onnx`` or a directory with ``model.onnx`` -> ONNX; a directory with
    ``config.json`` -> RUNTIME."""
    p = Path(path)
    if p.suffix == ".gguf":
        return ArtifactKind.GGUF
    if p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file()):
        return ArtifactKind.ONNX
    if p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        return ArtifactKind.MLX if "quantization" in cfg or cfg.get("v4convert_artifact") == "mlx" \
            else ArtifactKind.RUNTIME
    if not p.exists():
        raise ArtifactError(f"{p}: no such file or directory")
    raise ArtifactError(f"{p}: not an artifact verify can run (expected a checkpoint directory with config.json, "
                        f"a .gguf file or an ONNX model)")


class RuntimeRunner:
    """Our runtime (``v4convert.runtime.load``) on CPU/GPU in ``dtype``."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 512) -> None:
        from v4convert.runtime import load

        self.path, self.kind = Path(path), ArtifactKind.RUNTIME
        self.model = load(path, device=device, dtype=dtype, max_seq_len=max_seq_len)
        self.device = torch.device(device)
        cfg = json.loads((self.path / "config.json").read_text())
        self.vocab_size = int(cfg["vocab_size"])
        self._captured: list[torch.Tensor | None] = []
        self._hooks = []
        self.capture = False
        blocks = self._blocks()
        self._captured = [None] * len(blocks)
        for i, b in enumerate(blocks):
            self._hooks.append(b.register_forward_hook(self._hook(i)))

    def _blocks(self) -> list[torch.nn.Module]:
        """Main-model decoder blocks in order (MTP blocks excluded: the forward never runs them)."""
        m = self.model
        layers = m.model.layers if hasattr(m, "model") and hasattr(m.model, "layers") else getattr(m, "layers", None)
        if layers is None:
            return []
        n = int(m.args.arch.n_layers) if hasattr(m, "args") and hasattr(m.args, "arch") else len(layers)
        return list(layers)[:n]

    def _hook(self, i: int) -> Callable:
        def fn(mod, inp, out) -> None:
            if self.capture:
                t = out[0] if isinstance(out, tuple) else out
                self._captured[i] = t[0].detach().float().cpu()     # batch row 0: [T, ...]
        return fn

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        self._captured = [None] * len(self._captured)
        out = self.model(ids.to(self.device), start_pos)
        return out[0].float().cpu()

    def hidden_states(self) -> list[torch.Tensor] | None:
        if not self._captured or any(h is None for h in self._captured):
            return None
        return list(self._captured)        # type: ignore[arg-type]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _gguf_runner(path: Path, **kw) -> Runner:
    from .artifact_gguf import (
        GGUFRunner,  # imported on use: llama-cpp-python is optional
    )
    return GGUFRunner(path, **kw)


def _mlx_runner(path: Path, **kw) -> Runner:
    from .artifacts.mlx import MLXRunner  # runs mlx-lm in a worker process
    return MLXRunner(path, **kw)


# kind -> factory(path, device=, dtype=, max_seq_len=) -> Runner
RUNNERS: dict[ArtifactKind, Callable[..., Runner]] = {
    ArtifactKind.RUNTIME: RuntimeRunner,
    ArtifactKind.GGUF: _gguf_runner,
    ArtifactKind.MLX: _mlx_runner,
}
# kinds whose runner is still to be written -> how it will run
PLANNED: dict[ArtifactKind, str] = {
    ArtifactKind.ONNX: "onnxruntime InferenceSession",
}


def check_runnable(path: str | os.PathLike, kind: ArtifactKind | None = None) -> ArtifactKind:
    """The kind of ``path``; raises :class:`ArtifactError` before any work if verify cannot run it
    (including a GGUF without llama-cpp-python installed)."""
    k = kind or detect_kind(Path(path))
    if k not in RUNNERS:
        raise ArtifactError(f"{path}: {k.value} artifacts are not runnable by verify yet (planned: {PLANNED[k]})")
    if k is ArtifactKind.GGUF:
        from .artifact_gguf import require_llama_cpp
        require_llama_cpp()
    if k is ArtifactKind.MLX:
        from .artifacts.mlx import find_mlx_python
        find_mlx_python()
    return k


def open_runner(path: str | os.PathLike, kind: ArtifactKind | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, max_seq_len: int = 512) -> Runner:
    """Open ``path`` with the runner of its kind (detected from the path unless given)."""
    k = check_runnable(path, kind)
    return RUNNERS[k](Path(path), device=device, dtype=dtype, max_seq_len=max_seq_len)
