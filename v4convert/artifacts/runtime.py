"""Runtime artifact runner: our own runtime (``v4convert.runtime.load``) on any checkpoint directory it reads.

Hidden states are taken with forward hooks on the decoder blocks (V3: ``model.model.layers[i]`` output
``[B, T, D]``; V4: ``model.layers[i]`` output, the hyper-connection streams ``[B, T, hc, D]``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from v4convert.errors import read_json

from . import ArtifactKind


class RuntimeRunner:
    """Our runtime (``v4convert.runtime.load``) on CPU/GPU in ``dtype``."""

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 512, dynamic_routing=None, act_quant: bool = True) -> None:
        from v4convert.runtime import load

        self.path, self.kind = Path(path), ArtifactKind.RUNTIME
        self.model = load(path, device=device, dtype=dtype, max_seq_len=max_seq_len, dynamic_routing=dynamic_routing,
                          act_quant=act_quant)
        self.device = torch.device(device)
        cfg = read_json(self.path / "config.json")
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
