"""Text generation with the static KV cache: tokenizer loading, sampling, streaming, timing.

Works with any model built by ``v4convert.runtime.load``: ``model(ids [1,T], start_pos) -> logits [1,T,V]``
and ``model.max_seq_len``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from v4convert.errors import UserError


class GenerationError(UserError):
    """Bad generation input: no tokenizer, prompt too long, bad sampling parameters."""


@dataclass(frozen=True)
class Tokenizer:
    """``tokenizer.json`` (``tokenizers`` library) plus BOS/EOS facts from the checkpoint's configs."""
    tok: object                 # tokenizers.Tokenizer
    bos_id: int | None          # prepended when tokenizer_config says add_bos_token (DeepSeek: yes)
    eos_ids: frozenset[int]

    @staticmethod
    def open(ckpt: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        root = Path(ckpt)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise GenerationError(f"{path}: no tokenizer.json in the checkpoint (needed to encode the prompt)")
        from v4convert.paths import CheckpointPathError, checkpoint_file
        try:
            checkpoint_file(root, path.name)
        except CheckpointPathError as e:
            raise GenerationError(str(e)) from None
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:   # the tokenizers library raises plain Exception subclasses
            raise GenerationError(f"{path}: cannot read tokenizer ({e})") from None
        tcfg = _read_json(root / "tokenizer_config.json")
        cfg = _read_json(root / "config.json")
        gcfg = _read_json(root / "generation_config.json")
        bos = cfg.get("bos_token_id", gcfg.get("bos_token_id"))
        if isinstance(tcfg.get("bos_token"), str) and tok.token_to_id(tcfg["bos_token"]) is not None:
            bos = tok.token_to_id(tcfg["bos_token"])
        add_bos = bool(tcfg.get("add_bos_token", True))
        eos: set[int] = set()
        for src in (gcfg.get("eos_token_id"), cfg.get("eos_token_id")):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list):
                eos.update(int(i) for i in src)
        return Tokenizer(tok, bos if add_bos else None, frozenset(eos))

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    from v4convert.paths import CheckpointPathError, read_checkpoint_json
    if not path.is_file():
        return {}
    try:
        return read_checkpoint_json(path.parent, path.name)
    except CheckpointPathError as e:
        raise GenerationError(str(e)) from None


@dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_s: float
    decode_s: float
    stop_reason: str           # "eos", "max_new_tokens", "max_seq_len"

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (each step consumes one token and yields the next)."""
        steps = max(len(self.new_ids) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    """Greedy (``temperature == 0``) or softmax sampling from ``logits [V]``."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             eos_ids: frozenset[int] = frozenset(), seed: int = 0,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Prefill ``prompt_ids`` in one call, then decode one token per call through the KV cache.

    Stops at EOS, after ``max_new_tokens``, or when the cache (``model.max_seq_len``) is full.
    """
    if not prompt_ids:
        raise GenerationError("empty prompt")
    if len(prompt_ids) > model.max_seq_len:
        raise GenerationError(f"prompt has {len(prompt_ids)} tokens, more than max_seq_len {model.max_seq_len}")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    logits = model(ids, 0)
    nxt = sample(logits[0, -1].cpu(), temperature, gen)
    t1 = time.perf_counter()
    out = [nxt]
    if on_token:
        on_token(nxt)
    pos, reason = len(prompt_ids), "max_new_tokens"
    while True:
        if nxt in eos_ids:
            reason = "eos"
            break
        if len(out) >= max_new_tokens:
            break
        if pos >= model.max_seq_len:
            reason = "max_seq_len"
            break
        logits = model(torch.tensor([[nxt]], dtype=torch.long, device=device), pos)
        nxt = sample(logits[0, -1].cpu(), temperature, gen)
        pos += 1
        out.append(nxt)
        if on_token:
            on_token(nxt)
    t2 = time.perf_counter()
    return GenerationResult(list(prompt_ids), out, t1 - t0, t2 - t1, reason)


class TextStreamer:
    """Turns a token stream into printable text increments (holds back incomplete UTF-8 sequences)."""

    def __init__(self, tok: Tokenizer, write: Callable[[str], None]) -> None:
        self.tok, self.write = tok, write
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)

    def flush(self) -> None:
        """Write what was held back (a trailing incomplete UTF-8 sequence decodes to U+FFFD)."""
        text = self.tok.decode(self.ids)
        if len(text) > self.printed:
            self.write(text[self.printed:])
            self.printed = len(text)
