"""MLX artifact runner: the model directory run by mlx-lm itself (the consumer), like GGUF by llama.cpp.

mlx and mlx-lm need not live in our environment: :class:`MLXWorker` starts ``mlx_worker.py`` (imports
only mlx, mlx-lm, numpy) under a Python that has them and talks JSON lines over its stdin/stdout, with
arrays in ``.npy`` files. Which Python (first that exists):

1. ``$V4CONVERT_MLX_PYTHON``;
2. this interpreter, if ``import mlx_lm`` works here;
3. ``~/.cache/v4convert-ci/mlx-venv/bin/python`` (what ``.ci/mlx_venv.sh`` creates).

mlx-lm returns logits of every position, keeps its own KV cache (``make_prompt_cache``) and exposes no
per-layer hidden states (:meth:`MLXRunner.hidden_states` returns None). It computes in the dtype of the
stored weights: a float32 export gives float32 logits.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ArtifactError, ArtifactKind

WORKER = Path(__file__).with_name("mlx_worker.py")
DEFAULT_VENV_PYTHON = Path.home() / ".cache" / "v4convert-ci" / "mlx-venv" / "bin" / "python"


class MLXUnavailable(ArtifactError):
    """No Python with mlx + mlx-lm was found."""


def find_mlx_python() -> str:
    """The interpreter that runs mlx-lm (see the module docstring), or :class:`MLXUnavailable`."""
    env = os.environ.get("V4CONVERT_MLX_PYTHON")
    if env:
        if not Path(env).exists():
            raise MLXUnavailable(f"V4CONVERT_MLX_PYTHON={env}: no such interpreter")
        return env
    if importlib.util.find_spec("mlx_lm") is not None:
        return sys.executable
    if DEFAULT_VENV_PYTHON.exists():
        return str(DEFAULT_VENV_PYTHON)
    raise MLXUnavailable("MLX artifacts run through mlx-lm: pip install 'mlx[cpu]' mlx-lm (or 'mlx' on macOS), "
                         "or point V4CONVERT_MLX_PYTHON at a Python that has them")


class MLXWorker:
    """One mlx-lm worker process; :meth:`call` sends a request and returns its reply (raises on failure)."""

    def __init__(self, python: str | None = None) -> None:
        self.python = python or find_mlx_python()
        self.tmp = tempfile.TemporaryDirectory(prefix="v4convert-mlx-")
        # run by runpy from an empty directory: running the file by path would put this package's folder
        # (with mlx.py, which shadows the mlx package) first on sys.path
        boot = f"import runpy; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
        self.proc = subprocess.Popen([self.python, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, cwd=self.tmp.name)

    def file(self, name: str) -> str:
        return str(Path(self.tmp.name) / name)

    def call(self, op: str, **kw: Any) -> dict:
        if self.proc.poll() is not None:
            raise ArtifactError(f"the mlx-lm worker ({self.python}) exited with status {self.proc.returncode}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise ArtifactError(f"the mlx-lm worker ({self.python}) died during {op!r} "
                                f"(status {self.proc.wait()})")
        res = json.loads(line)
        if not res.pop("ok"):
            raise MLXWorkerError(op, res["error"], res.get("traceback", ""))
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()          # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


class MLXWorkerError(ArtifactError):
    """mlx / mlx-lm raised inside the worker; the message carries its exception and traceback tail."""

    def __init__(self, op: str, error: str, tb: str) -> None:
        self.error, self.traceback = error, tb
        super().__init__(f"mlx-lm failed in {op}: {error}")


class MLXRunner:
    """mlx-lm on the MLX model directory ``path`` (CPU here; Metal on a Mac). ``dtype`` must be float32 (the
    stored weights fix mlx-lm's precision); ``device`` must be cpu; ``max_seq_len`` bounds positions."""

    @staticmethod
    def require() -> None:
        """:class:`MLXUnavailable` before any work when no Python with mlx + mlx-lm is found."""
        find_mlx_python()

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 512, python: str | None = None) -> None:
        self.path, self.kind = Path(path), ArtifactKind.MLX
        if torch.device(device).type != "cpu":
            raise ArtifactError(f"{path}: the MLX runner runs mlx-lm in its own process (got --device {device})")
        if dtype != torch.float32:
            raise ArtifactError(f"{path}: an MLX model's stored dtype fixes its precision; --dtype must stay "
                                f"float32 (got {str(dtype).replace('torch.', '')})")
        self.max_seq_len = int(max_seq_len)
        self.worker = MLXWorker(python)
        try:
            info = self.worker.call("load", path=str(self.path.resolve()))
        except ArtifactError as e:
            self.worker.close()
            raise ArtifactError(f"{path}: mlx-lm cannot load this model ({e})") from None
        self.vocab_size = int(info["vocab_size"])
        self.versions = {"mlx": info["mlx"], "mlx_lm": info["mlx_lm"]}
        self._n = 0

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``ids`` ``[1, T]`` at positions ``start_pos..start_pos+T-1`` -> mlx-lm's float32 logits ``[T, V]``."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ArtifactError(f"{self.path}: the MLX runner takes one sequence [1, T], got {list(ids.shape)}")
        T = int(ids.shape[1])
        if start_pos < 0 or start_pos + T > self.max_seq_len:
            raise ArtifactError(f"{self.path}: positions {start_pos}..{start_pos + T - 1} outside 0..{self.max_seq_len - 1}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.numel():
            raise ArtifactError(f"{self.path}: token id {int(bad[0])} outside this model's vocabulary of "
                                f"{self.vocab_size} (reference and artifact vocabularies differ?)")
        out = self.worker.file(f"logits{self._n % 2}.npy")
        self._n += 1
        self.worker.call("forward", ids=[int(i) for i in ids[0]], start_pos=int(start_pos), out=out)
        return torch.from_numpy(np.load(out))

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens from mlx-lm's own generation loop (``generate_step``, temperature 0)."""
        return self.worker.call("generate", prompt_ids=[int(i) for i in prompt], max_tokens=int(max_tokens))["ids"]

    def generate_text(self, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
        """``mlx_lm.generate`` (greedy) on ``prompt``: (generated text, the prompt's token ids)."""
        r = self.worker.call("generate_text", prompt=prompt, max_tokens=int(max_tokens))
        return r["text"], r["prompt_ids"]

    def hidden_states(self) -> list[torch.Tensor] | None:
        return None          # mlx-lm's forward does not expose per-layer outputs

    def close(self) -> None:
        if getattr(self, "worker", None) is not None:
            self.worker.close()
            self.worker = None
