"""Artifact runners: one interface for every thing ``verify`` can run (DESIGN §7).

A runner owns a model with a KV cache and answers ``forward(ids [1, T], start_pos) -> float32 logits [T, V]``
(``start_pos == 0`` starts a new sequence; decode steps pass one token at ``start_pos = length so far``).
Runners that can see inside the model also return the per-layer hidden states of the last forward.

Kinds (:class:`ArtifactKind`), chosen from the path by :func:`detect_kind` or explicitly:

* ``RUNTIME``: any directory ``v4convert.runtime.load`` reads (published FP8/FP4 layouts, our FP4 containers),
  ``artifacts/runtime.py``; hidden states from forward hooks on the decoder blocks.
* ``GGUF``: through llama.cpp itself (``artifacts/gguf.py``: llama-cpp-python ``Llama(path, logits_all=True)``,
  ``n_tokens = start_pos`` then ``eval(ids)``, logits from ``scores``, CPU, F32 KV cache); no hidden states.
* ``ONNX``: through onnxruntime (``artifacts/onnx.py``: CPU execution provider, the graph's
  ``past_key_values.N.key`` inputs fed from the previous call's ``present.N.key`` outputs); no hidden states.
* ``VLLM``: vLLM serving the directory, in vLLM's own python (``artifacts/vllm.py``); only when asked
  (``--engine vllm``), never detected from the path; log-probs from vLLM itself, no hidden states.
* ``MLX``: an mlx-lm model directory (``artifacts/mlx.py``), run by mlx-lm itself in a worker process (mlx
  need not be installed here); no hidden states.

Registry: :data:`KINDS`, one row per kind (path detection + ``"module:Class"`` of its runner). Planned kinds
(runner None) raise :class:`ArtifactError` before any work. A new runner = its module ``artifacts/NAME.py`` with
a class of the :class:`Runner` interface + its row (a new kind also names itself in :class:`ArtifactKind`).
"""
from __future__ import annotations

import enum
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from v4convert.errors import UserError


class ArtifactError(UserError):
    """An artifact verify cannot open or run (unknown kind, runner not available)."""


class ArtifactKind(enum.Enum):
    RUNTIME = "runtime"
    GGUF = "gguf"
    ONNX = "onnx"
    VLLM = "vllm"          # a checkpoint directory served by vLLM (only when asked: --engine vllm / --kind vllm)
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


@dataclass(frozen=True)
class KindRow:
    """One artifact kind: how a path is recognised and which class runs it (``"module:Class"``, None while
    planned). A runner class takes ``(path, device=, dtype=, max_seq_len=)``; an optional static ``require()``
    raises ``ArtifactError`` when what it needs (a package) is missing, before any work."""
    kind: ArtifactKind
    detect: Callable[[Path], bool]
    runner: str | None
    planned: str = ""                   # how a planned kind will run (for the error message)

    def runner_class(self) -> type:
        module, _, cls = self.runner.partition(":")
        return getattr(importlib.import_module(module), cls)


def _is_mlx(p: Path) -> bool:
    """An mlx-lm model directory: ``config.json`` with mlx-lm's ``quantization`` block or our export's marker."""
    if not (p.is_dir() and (p / "config.json").is_file()):
        return False
    from v4convert.errors import read_json
    cfg = read_json(p / "config.json")
    return isinstance(cfg, dict) and ("quantization" in cfg or cfg.get("v4convert_artifact") == "mlx")


def _is_onnx(p: Path) -> bool:
    return p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file())


# detection order: the first row whose detect() is true wins; one row per kind
KINDS: list[KindRow] = [
    KindRow(ArtifactKind.GGUF, lambda p: p.suffix == ".gguf", "v4convert.artifacts.gguf:GGUFRunner"),
    KindRow(ArtifactKind.ONNX, _is_onnx, "v4convert.artifacts.onnx:OnnxRunner"),
    KindRow(ArtifactKind.MLX, _is_mlx, "v4convert.artifacts.mlx:MLXRunner"),
    KindRow(ArtifactKind.RUNTIME, lambda p: p.is_dir() and (p / "config.json").is_file(),
            "v4convert.artifacts.runtime:RuntimeRunner"),
    KindRow(ArtifactKind.VLLM, lambda p: False, "v4convert.artifacts.vllm:VLLMRunner"),   # explicit only
]
ROWS: dict[ArtifactKind, KindRow] = {r.kind: r for r in KINDS}


def detect_kind(path: Path) -> ArtifactKind:
    """The kind of the first row of :data:`KINDS` that recognises ``path`` (``*.gguf`` -> GGUF; ``*.onnx`` or a
    directory with ``model.onnx`` -> ONNX; a directory with ``config.json`` -> RUNTIME)."""
    p = Path(path)
    for row in KINDS:
        if row.detect(p):
            return row.kind
    if not p.exists():
        raise ArtifactError(f"{p}: no such file or directory")
    raise ArtifactError(f"{p}: not an artifact verify can run (expected a checkpoint directory with config.json, "
                        f"a .gguf file or an ONNX model)")


def check_runnable(path: str | os.PathLike, kind: ArtifactKind | None = None) -> ArtifactKind:
    """The kind of ``path``; raises :class:`ArtifactError` before any work if verify cannot run it
    (including a GGUF without llama-cpp-python installed)."""
    k = kind or detect_kind(Path(path))
    row = ROWS.get(k)
    if row is None or row.runner is None:
        how = row.planned if row is not None else "no runner"
        raise ArtifactError(f"{path}: {k.value} artifacts are not runnable by verify yet (planned: {how})")
    require = getattr(row.runner_class(), "require", None)
    if require is not None:
        require()
    return k


def open_runner(path: str | os.PathLike, kind: ArtifactKind | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32, max_seq_len: int = 512, dynamic_routing=None,
                act_quant: bool = True) -> Runner:
    """Open ``path`` with the runner of its kind (detected from the path unless given).
    ``dynamic_routing`` (``runtime.DynamicRouting``): our runtime only. ``act_quant=False``: our runtime ignores
    the 4-bit input-activation quantization a config declares (weights-only score); our runtime only."""
    k = check_runnable(path, kind)
    if not act_quant:
        if k is not ArtifactKind.RUNTIME:
            raise ArtifactError(f"{path}: --no-act-quant runs in our runtime only (artifact kind {k.value})")
        return ROWS[k].runner_class()(Path(path), device=device, dtype=dtype, max_seq_len=max_seq_len,
                                      dynamic_routing=dynamic_routing, act_quant=False)
    if dynamic_routing is not None:
        if k is not ArtifactKind.RUNTIME:
            raise ArtifactError(f"{path}: --dynamic-top-p runs in our runtime only (artifact kind {k.value})")
        return ROWS[k].runner_class()(Path(path), device=device, dtype=dtype, max_seq_len=max_seq_len,
                                      dynamic_routing=dynamic_routing)
    return ROWS[k].runner_class()(Path(path), device=device, dtype=dtype, max_seq_len=max_seq_len)
