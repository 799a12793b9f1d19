"""Calibration data: ``--calib [PATH]`` -> int64 token windows ``[W, L]``.

Sources: a ``.txt`` file, a ``.jsonl`` file (one JSON object per line with a string ``text`` field), or a
directory holding such files (sorted by name, non-recursive). Text is encoded with the checkpoint's own
``tokenizer.json`` (no special tokens; documents joined with the tokenizer's EOS when it has one).

Default (``--calib`` without a path): the bundled corpus's *training* split, i.e. the standard-library files
``data/corpus/MANIFEST.json`` lists with ``split: train`` (the tiny models were trained on them), re-read from
this interpreter's stdlib and checked against their sha256. The held-out text ``heldout.txt`` that verify
scores is never used for calibration.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from v4convert.errors import UserError

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
DEFAULT_TOKENS = 8192       # recommendation for real models: 8192-131072 tokens (llama.cpp imatrix: ~100 chunks x 512)
DEFAULT_SEQ_LEN = 512
EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>")
SUFFIXES = (".txt", ".jsonl")


class CalibDataError(UserError):
    """Calibration data that cannot be used (missing, empty, malformed, too short)."""


@dataclass(frozen=True)
class CalibData:
    windows: torch.Tensor      # int64 [W, L]
    source: str                # what was read (path or "bundled training split")
    sha256: str                # of the token ids used (fingerprints the statistics)

    @property
    def n_tokens(self) -> int:
        return self.windows.numel()


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibDataError(f"{path}: line {i}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibDataError(f"{path}: line {i}: expected an object with a string \"text\" field")
        texts.append(obj["text"])
    return texts


def read_texts(path: Path) -> list[str]:
    """Documents of a .txt / .jsonl file or a directory of them."""
    path = Path(path)
    if not path.exists():
        raise CalibDataError(f"{path}: calibration data not found")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise CalibDataError(f"{path}: directory holds no .txt or .jsonl files")
        return [t for f in files for t in read_texts(f)]
    if path.suffix == ".jsonl":
        texts = _read_jsonl(path)
    else:
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise CalibDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not any(t.strip() for t in texts):
        raise CalibDataError(f"{path}: calibration data is empty")
    return texts


def training_split_texts(corpus: Path = CORPUS_DIR) -> list[str]:
    """The bundled corpus's training files (never ``heldout.txt``), checked against the manifest."""
    man = json.loads((corpus / "MANIFEST.json").read_text())
    root = Path(man["stdlib"])
    texts = []
    for f in man["files"]:
        if f["split"] != "train":
            continue
        p = root / f["path"]
        try:
            data = p.read_bytes()
        except OSError:
            raise CalibDataError(f"{p}: the bundled training split lives in Python {man['python']}'s stdlib "
                                 f"({root}); it is not readable here, pass --calib PATH") from None
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise CalibDataError(f"{p}: sha256 differs from {corpus / 'MANIFEST.json'} (another Python than "
                                 f"{man['python']}?); pass --calib PATH")
        texts.append(data.decode("utf-8", errors="replace"))
    return texts


def calibration_windows(ckpt: Path, path: Path | None, n_tokens: int = DEFAULT_TOKENS,
                        seq_len: int = DEFAULT_SEQ_LEN) -> CalibData:
    """``ceil(n_tokens / seq_len)`` windows of ``seq_len`` tokens (fewer if the data runs out; at least one).

    ``path`` None: the bundled training split. Raises :class:`CalibDataError` on bad data or sizes."""
    from tokenizers import Tokenizer

    if n_tokens <= 0:
        raise CalibDataError(f"--calib-tokens must be > 0 (got {n_tokens})")
    if seq_len < 2:
        raise CalibDataError(f"--calib-seq-len must be >= 2 (got {seq_len})")
    tj = Path(ckpt) / "tokenizer.json"
    if not tj.is_file():
        raise CalibDataError(f"{tj}: the checkpoint has no tokenizer.json (needed to encode the calibration data)")
    texts = training_split_texts() if path is None else read_texts(Path(path))
    source = "bundled training split" if path is None else str(path)
    tok = Tokenizer.from_file(str(tj))
    eos = next((i for i in (tok.token_to_id(n) for n in EOS_NAMES) if i is not None), None)
    want = -(-n_tokens // seq_len) * seq_len
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_special_tokens=False).ids
        if eos is not None:
            ids.append(eos)
        if len(ids) >= want:
            break
    n = min(want, len(ids)) // seq_len
    if n == 0:
        raise CalibDataError(f"{source}: {len(ids)} tokens, fewer than one window of --calib-seq-len {seq_len}")
    w = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return CalibData(w, source, hashlib.sha256(w.numpy().tobytes()).hexdigest())
