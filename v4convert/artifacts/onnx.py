"""Run an ONNX artifact through onnxruntime (the consumer), CPU execution provider.

The runner keeps the ``present.N.key`` outputs of the last call and feeds them back as ``past_key_values.N.key``:
``forward(ids [1, T], start_pos)`` uses the first ``start_pos`` cached positions (``start_pos == 0`` starts a new
sequence; a smaller ``start_pos`` than cached rewinds), ``attention_mask = ones [1, start_pos + T]``,
``position_ids = start_pos .. start_pos + T - 1``. No hidden states (onnxruntime does not expose them here).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import ArtifactError, ArtifactKind


class OnnxArtifactError(ArtifactError):
    """An ONNX artifact this runner cannot open (no model file, no onnxruntime, unexpected inputs)."""


def require_onnxruntime():
    """The onnxruntime module, or :class:`OnnxArtifactError` saying to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxArtifactError(f"ONNX artifacts run through onnxruntime: pip install onnxruntime ({e})") from None
    return onnxruntime


def model_file(path: Path) -> Path:
    """``path`` itself for ``*.onnx``, else ``path/model.onnx``."""
    p = Path(path)
    f = p if p.suffix == ".onnx" else p / "model.onnx"
    if not f.is_file():
        raise OnnxArtifactError(f"{p}: no ONNX model file ({f.name})")
    return f


class OnnxRunner:
    """``forward(ids [1, T], start_pos) -> float32 logits [T, V]`` through ``onnxruntime.InferenceSession``."""

    require = staticmethod(require_onnxruntime)   # checked by artifacts.check_runnable before any work

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, max_seq_len: int = 0,
                 threads: int = 0) -> None:
        self.path, self.kind = Path(path), ArtifactKind.ONNX
        if torch.device(device).type != "cpu":
            raise OnnxArtifactError(f"{path}: the ONNX runner uses onnxruntime's CPU execution provider "
                                    f"(got --device {device})")
        if dtype != torch.float32:
            raise OnnxArtifactError(f"{path}: the ONNX graph computes in float32; --dtype must stay float32 "
                                    f"(got {str(dtype).replace('torch.', '')})")
        ort = require_onnxruntime()
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        f = model_file(self.path)
        try:
            self.sess = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        except Exception as e:      # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no narrower base
            raise OnnxArtifactError(f"{f}: onnxruntime cannot load this model ({str(e).splitlines()[0]})") from None
        ins = {i.name: i for i in self.sess.get_inputs()}
        for need in ("input_ids", "attention_mask", "position_ids"):
            if need not in ins:
                raise OnnxArtifactError(f"{self.path}: model has no {need!r} input")
        self.past_names = sorted((n for n in ins if n.startswith("past_key_values.")),
                                 key=lambda n: (int(n.split(".")[1]), n))
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        self.widths = {n: int(ins[n].shape[-1]) for n in self.past_names}
        self.vocab_size = int(self.sess.get_outputs()[0].shape[-1])
        self.cache: dict[str, np.ndarray] = {}
        self.cached = 0

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"OnnxRunner takes ids [1, T], got {tuple(ids.shape)}")
        if start_pos > self.cached:
            raise ValueError(f"start_pos {start_pos} is past the {self.cached} cached positions")
        T = ids.shape[1]
        feed: dict[str, np.ndarray] = {
            "input_ids": ids.cpu().numpy().astype(np.int64),
            "attention_mask": np.ones((1, start_pos + T), np.int64),
            "position_ids": np.arange(start_pos, start_pos + T, dtype=np.int64)[None],
        }
        for n in self.past_names:
            feed[n] = (self.cache[n][:, :, :start_pos] if start_pos
                       else np.zeros((1, 1, 0, self.widths[n]), np.float32))
        outs = self.sess.run(["logits"] + self.present_names, feed)
        self.cache = dict(zip(self.past_names, outs[1:]))
        self.cached = start_pos + T
        return torch.from_numpy(np.ascontiguousarray(outs[0][0], dtype=np.float32))

    def hidden_states(self) -> list[torch.Tensor] | None:
        return None

    def close(self) -> None:
        self.cache = {}
        self.sess = None


class OnnxLM:
    """The ``model(ids [1, T], start_pos) -> logits [1, T, V]`` interface ``runtime.generate`` drives, over onnxruntime."""

    def __init__(self, path: Path, max_seq_len: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.runner = OnnxRunner(path, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    def __call__(self, ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.runner.forward(ids, start_pos)[None]

    def parameters(self):
        """One CPU tensor, so callers can ask for the device (``next(model.parameters()).device``)."""
        return iter([torch.empty(0)])
