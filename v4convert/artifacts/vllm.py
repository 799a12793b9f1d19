"""vLLM artifact runner: score a checkpoint directory as vLLM serves it (``verify REF ART --engine vllm``).

vLLM runs in its own python (it pins transformers / compressed-tensors versions of its own), found as
``$V4C_VLLM_PYTHON``, else the CI venv ``~/.cache/v4convert-ci/vllm-venv/bin/python`` (made by
``tests/consumers/vllm_env.sh``), else this python if it imports vllm. :class:`VLLMEngine` starts
``vllm_worker.py`` there and talks JSON lines to it (one engine load per artifact).

On a CPU, vLLM 0.32 lacks the NVFP4 / MXFP4 kernels (W4A16 and W4A4); the worker then installs the shims of
``vllm_cpu_shims.py`` (dequantize-at-load with vLLM's own dequantizers; W4A4 through vLLM's own NVFP4 emulation;
vLLM still reads every config key and tensor) and reports their names: :attr:`VLLMEngine.shims`. On any CPU
the worker asks for vLLM's reference ``CPU_MLA`` attention backend: on an AMX CPU vLLM would pick ``AMX_MLA``,
which serves bf16/fp16 only (see ``vllm_worker.py``).

:class:`VLLMRunner` is the verify runner: ``forward(ids, start_pos)`` re-runs the whole sequence so far
(vLLM keeps no cache across requests) and returns vLLM's raw log-probs ``[T, V]`` (a log-softmax is a
valid logit vector: verify only takes softmax-invariant statistics). No hidden states.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from v4convert.artifacts import ArtifactError, ArtifactKind

WORKER = Path(__file__).with_name("vllm_worker.py")
CI_VENV_PYTHON = Path.home() / ".cache" / "v4convert-ci" / "vllm-venv" / "bin" / "python"
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_python() -> str:
    """The python that runs vLLM (see module doc); :class:`ArtifactError` when there is none."""
    env = os.environ.get("V4C_VLLM_PYTHON")
    if env:
        if not Path(env).is_file():
            raise ArtifactError(f"V4C_VLLM_PYTHON={env}: no such file")
        return env
    if CI_VENV_PYTHON.is_file():
        return str(CI_VENV_PYTHON)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ArtifactError("--engine vllm: no python with vLLM found (set V4C_VLLM_PYTHON, or run "
                        "tests/consumers/vllm_env.sh to make ~/.cache/v4convert-ci/vllm-venv)")


class VLLMEngine:
    """vLLM serving ``path`` in a worker process (greedy generation, full log-probs, tokenization)."""

    def __init__(self, path: Path, dtype: str = "float32", max_model_len: int = 512, python: str | None = None,
                 shims: bool = True) -> None:
        self.path = Path(path)
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- open for the worker's life; closed in close()
            "w+", prefix="v4convert-vllm-", suffix=".log", delete=False)
        cmd = [python or vllm_python(), str(WORKER), str(self.path), "--dtype", dtype,
               "--max-model-len", str(max_model_len)] + ([] if shims else ["--no-shims"])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1)
        info = self._read()
        if "error" in info:
            self.close()
            raise ArtifactError(f"{self.path}: vLLM cannot load it: {info['error']}")
        self.version: str = info["vllm"]
        self.platform: str = info["platform"]
        self.shims: list[str] = list(info["shims"])
        self.vocab_size: int = int(info["vocab_size"])

    @property
    def alive(self) -> bool:
        return getattr(self, "proc", None) is not None and self.proc.poll() is None

    def load(self, path: Path) -> None:
        """Serve another checkpoint in the same worker (saves vLLM's import time)."""
        self.path = Path(path)
        info = self.request(op="load", model=str(self.path))
        self.vocab_size = int(info["vocab_size"])

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines vLLM wrote (its log goes to a temporary file)."""
        self._log.flush()
        return "".join(Path(self._log.name).read_text(errors="replace").splitlines(keepends=True)[-n:])

    def _read(self) -> dict:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"vLLM worker exited ({code}) without a reply; its log ends:\n{self.log_tail()}")
        return json.loads(line)

    def request(self, **req) -> dict:
        if self.proc.stdin is None or self.proc.poll() is not None:
            raise RuntimeError(f"vLLM worker for {self.path} is not running")
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        if "error" in r and r.get("kind") == "load":
            raise ArtifactError(f"{self.path}: vLLM cannot load it: {r['error']}")
        if "error" in r:
            raise RuntimeError(f"vLLM worker: {r['error']}; its log ends:\n{self.log_tail()}")
        return r

    def generate(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 0
                 ) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        """Greedy continuations and, per step, vLLM's top-``logprobs`` raw log-probs."""
        r = self.request(op="generate", prompts=prompts, max_tokens=max_tokens, logprobs=logprobs)
        lps = [[{int(t): v for t, v in step.items()} for step in seq] for seq in r["logprobs"]]
        return r["tokens"], lps

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """float32 ``[T, V]``: log-probs of the next token after each of ``ids``."""
        with tempfile.NamedTemporaryFile(suffix=".f32", delete=False) as f:
            out = f.name
        try:
            shape = self.request(op="logprobs", ids=list(ids), out=out)["shape"]
            return torch.from_numpy(np.fromfile(out, dtype=np.float32).reshape(shape))
        finally:
            os.unlink(out)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.request(op="tokenize", texts=texts)["ids"]

    def close(self) -> None:
        if getattr(self, "proc", None) is not None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


class VLLMRunner:
    """The verify :class:`~v4convert.artifacts.Runner` for ``--engine vllm`` (CPU or GPU, as vLLM picks)."""

    @staticmethod
    def require() -> None:
        vllm_python()

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 512) -> None:
        if dtype not in DTYPES:
            raise ArtifactError(f"{path}: vLLM runs float32, bfloat16 or float16 (got {dtype})")
        if not (Path(path) / "config.json").is_file():
            raise ArtifactError(f"{path}: vLLM serves a checkpoint directory with config.json")
        self.path, self.kind = Path(path), ArtifactKind.VLLM
        self.engine = VLLMEngine(self.path, DTYPES[dtype], max_model_len=max_seq_len)
        self.vocab_size = self.engine.vocab_size
        self.notes = [f"vLLM {self.engine.version} on {self.engine.platform}"
                      + (f", CPU kernel shims: {', '.join(self.engine.shims)}" if self.engine.shims else "")]
        self._seq: list[int] = []

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ArtifactError(f"{self.path}: the vLLM runner takes one sequence [1, T], got {list(ids.shape)}")
        if start_pos < 0 or start_pos > len(self._seq):
            raise ArtifactError(f"{self.path}: start_pos {start_pos} past the {len(self._seq)} tokens so far")
        self._seq = self._seq[:start_pos] + ids[0].tolist()
        return self.engine.logprobs(self._seq)[start_pos:]

    def hidden_states(self) -> list[torch.Tensor] | None:
        return None            # vLLM does not expose per-layer outputs

    def close(self) -> None:
        self.engine.close()
