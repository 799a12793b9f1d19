"""GGUF artifact runner: llama.cpp itself, through llama-cpp-python, on CPU (DESIGN §7).

``Llama(path, logits_all=True)`` keeps one logits row per evaluated position (``Llama.scores``
``[n_ctx, n_vocab]`` float32). A forward at ``start_pos`` sets ``n_tokens = start_pos`` and calls
``eval(ids)``, which first drops the KV cache from ``start_pos`` on (``kv_cache_seq_rm``), so a new
sequence (``start_pos == 0``) and decode steps use the same path. KV caches are F32 (llama.cpp's default
F16 cache rounds keys; with F32 an F32 GGUF matches our runtime to KLD ~1e-7, see ``tests/test_gguf_llama.py``).
llama.cpp exposes no per-layer hidden states: :meth:`GGUFRunner.hidden_states` returns None ("absent").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import ArtifactError, ArtifactKind

GGML_TYPE_F32 = 0        # ggml_type enum value (ggml.h) for type_k / type_v


def require_llama_cpp():
    """The llama_cpp module, or :class:`ArtifactError` saying to install llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ArtifactError(f"GGUF artifacts run through llama.cpp: install llama-cpp-python ({e})") from None
    from v4convert.export.gguf import llama_log
    llama_log.install()
    return llama_cpp


class GGUFRunner:
    """llama.cpp on ``path`` (a ``.gguf`` file, or the first split ``NAME-00001-of-0000N.gguf``).

    ``max_seq_len`` is the context (and batch) size in tokens; ``device`` must be ``cpu`` (llama.cpp runs
    with ``n_gpu_layers=0``); ``dtype`` must be float32: the GGUF's tensor types fix the precision.
    ``n_threads``: llama.cpp threads (default: torch's intra-op thread count, which ``--threads`` sets).
    """

    require = staticmethod(require_llama_cpp)     # checked by artifacts.check_runnable before any work

    def __init__(self, path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 512, n_threads: int | None = None) -> None:
        self.path, self.kind = Path(path), ArtifactKind.GGUF
        if torch.device(device).type != "cpu":
            raise ArtifactError(f"{path}: the GGUF runner runs llama.cpp on the CPU (got --device {device})")
        if dtype != torch.float32:
            raise ArtifactError(f"{path}: a GGUF's tensor types fix its precision; --dtype must stay float32 "
                                f"(got {str(dtype).replace('torch.', '')})")
        if not self.path.is_file():
            raise ArtifactError(f"{path}: no such GGUF file")
        from v4convert.formats.gguf_reader import GGUFFormatError, read_gguf_header
        try:       # llama.cpp trusts its input: a damaged file is refused here, not crashed on there
            read_gguf_header(self.path)
        except GGUFFormatError as e:
            raise ArtifactError(str(e)) from None
        llama_cpp = require_llama_cpp()
        self.n_ctx = int(max_seq_len)
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                       n_ubatch=self.n_ctx, logits_all=True, n_gpu_layers=0,
                                       n_threads=n_threads or torch.get_num_threads(),
                                       type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"{path}: llama.cpp cannot load this GGUF ({e})") from None
        self.vocab_size = int(self.llm.n_vocab())
        # our exporter pads the token list to the config's vocab_size and records it as {arch}.vocab_size
        arch = self.llm.metadata.get("general.architecture", "")
        declared = self.llm.metadata.get(f"{arch}.vocab_size")
        if declared is not None and int(declared) != self.vocab_size:
            n = self.vocab_size
            self.close()
            raise ArtifactError(f"{path}: llama.cpp reads {n} tokens but the GGUF declares {arch}.vocab_size "
                                f"{declared} (token list not padded to the model's vocabulary)")

    def forward(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``ids`` ``[1, T]`` at positions ``start_pos..start_pos+T-1`` -> llama.cpp's float32 logits ``[T, V]``."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ArtifactError(f"{self.path}: the GGUF runner takes one sequence [1, T], got {list(ids.shape)}")
        T = int(ids.shape[1])
        if start_pos < 0 or start_pos > self.llm.n_tokens or start_pos + T > self.n_ctx:
            raise ArtifactError(f"{self.path}: positions {start_pos}..{start_pos + T - 1} outside the cached "
                                f"{self.llm.n_tokens} tokens / context {self.n_ctx}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.numel():
            raise ArtifactError(f"{self.path}: token id {int(bad[0])} outside this GGUF's vocabulary of "
                                f"{self.vocab_size} (reference and artifact vocabularies differ?)")
        self.llm.n_tokens = start_pos
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[start_pos:start_pos + T], dtype=np.float32))

    def hidden_states(self) -> list[torch.Tensor] | None:
        return None          # llama.cpp does not expose per-layer outputs

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
