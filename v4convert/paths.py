"""The one rule for files we open inside a checkpoint directory, and bounded JSON reading.

Rule: a file of checkpoint ROOT is named by a plain file name (no separator, no ``..``, not absolute)
and, after resolving symlinks, lies inside ROOT -- or, when ROOT is a Hugging Face cache snapshot
(``.../models--ORG--NAME/snapshots/REV/``, whose files are symlinks into ``../../blobs``), inside that
repository's cache directory ``models--ORG--NAME``. A link leading anywhere else is refused: a
checkpoint cannot make us read (or copy into an output) a file outside it.

JSON files (config.json, the index, tokenizer configs) are read with a size bound and a nesting
bound before parsing, so a damaged or hostile file gives one line naming it.
"""
from __future__ import annotations

import os
from pathlib import Path

from v4convert.formats.safetensors_io import FormatError, load_json

from .errors import UserError

MAX_JSON_BYTES = 256 << 20        # a real index is a few MB; config.json a few KB
MAX_JSON_DEPTH = 32               # compressed-tensors' quantization_config nests ~6 deep


def user_cache(sub: str) -> Path:
    """``$XDG_CACHE_HOME/v4convert/SUB`` (default ``~/.cache/v4convert/SUB``): this machine's caches
    (compiled native kernels, verified-file stamps). Not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "v4convert" / sub


class CheckpointError(UserError):
    """A checkpoint that cannot be read as claimed; the message names the file and tensor."""


class CheckpointPathError(CheckpointError):
    """A checkpoint file name or symlink that leads outside the checkpoint, or an unreadable JSON file."""


def allowed_base(root: Path) -> Path:
    """Where ROOT's files may resolve to: ROOT itself, or the HF repo cache dir for a snapshot."""
    r = Path(root).resolve()
    if r.parent.name == "snapshots" and (r.parent.parent / "blobs").is_dir():
        return r.parent.parent
    return r


def checkpoint_file(root: Path, name: str, where: str | Path | None = None, kind: str = "file name") -> Path:
    """``root / name`` (as named, for messages) after checking the rule on where it resolves.
    ``where``: the file that named it (an index), for the message."""
    root = Path(root)
    src = where or root
    if not isinstance(name, str) or not name or os.path.isabs(name) or "/" in name or "\\" in name \
            or name in (".", "..") or "\0" in name:
        raise CheckpointPathError(f"{src}: {kind} {name!r} escapes the checkpoint directory")
    p = root / name
    resolved = p.resolve()
    base = allowed_base(root)
    if resolved != base and base not in resolved.parents:
        raise CheckpointPathError(f"{p}: is a link to {resolved}, outside the checkpoint directory "
                                  f"(links are followed only inside it or a Hugging Face cache repo)")
    return p


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> object:
    """Parse a JSON file with bounded size and nesting; every defect is one line naming ``path``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointPathError(f"{path}: {size:,} bytes, more than any {what} ({max_bytes:,})")
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointPathError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return load_json(raw, str(path), MAX_JSON_DEPTH)
    except FormatError as e:
        raise CheckpointPathError(str(e)) from None


def read_checkpoint_json(root: Path, name: str, what: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """``root/name`` through the path rule, parsed as a bounded JSON object."""
    p = checkpoint_file(root, name)
    body = read_json(p, what or name, max_bytes)
    if not isinstance(body, dict):
        raise CheckpointPathError(f"{p}: not a JSON object")
    return body
