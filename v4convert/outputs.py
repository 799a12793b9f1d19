"""Where a writer may put its output and how it replaces an old one: ONE rule for every writer.

Every command that writes (quantize, export, synth, calibrate, each exporter) calls ``claim`` before it
reads or writes anything and ``swap_in`` (directories) or an ``os.replace`` of a complete temporary file
(single files) at the end. The rule (issue #20):

1. OUT, and every scratch path beside it (``OUT.partial``, ``OUT.old``), must not be, contain, or lie
   inside a source; paths are compared after resolving symlinks. Refused even with ``--overwrite``.
2. OUT absent, or an empty directory: written.
3. OUT a previous output of ours (``is_ours``): replaced only with ``--overwrite``, and only after the new
   output is complete (write ``OUT.partial``, then swap); until then the old one stays intact.
4. Anything else that exists (a non-empty directory or a file we did not write): refused, even with
   ``--overwrite``; we never delete what we did not write.

"Ours" is recognised by a marker we write: a directory holding ``MARKER`` (JSON, ``"tool": "v4convert"``),
a GGUF whose metadata has ``GGUF_MARKER_KEY``, a Modelfile whose first line is ``MODELFILE_MARK``.
Scratch directories carry the marker from their first byte (``state: "writing"``), so a rerun knows
it may discard or resume them.

Fault injection: ``kill_point(name)`` SIGKILLs this process when ``$V4CONVERT_KILL_AT`` equals
``name`` (or ``name:N`` on its N-th call); tests use it to kill a writer at every step of a finish.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from . import __version__
from .errors import UserError

MARKER = ".v4convert-output.json"
GGUF_MARKER_KEY = "v4convert.version"
MODELFILE_MARK = "# written by v4convert"
KILL_ENV = "V4CONVERT_KILL_AT"
_MARKER_MAX_BYTES = 1 << 20


class OutputError(UserError):
    """An output path the rule refuses (it would touch a source or a file we did not write)."""


# ---------------------------------------------------------------------------------------- paths
def absolute(p: Path) -> Path:
    """``p`` made absolute with ``.`` and ``..`` folded (symlinks not followed): ``.`` gets a name."""
    return Path(os.path.abspath(p))


def partial_path(out: Path) -> Path:
    """Where a directory output is built before it is swapped in."""
    out = absolute(out)
    return out.with_name(out.name + ".partial")


def old_path(out: Path) -> Path:
    """Where the previous output waits during a swap (removed once the new one is in place)."""
    out = absolute(out)
    return out.with_name(out.name + ".old")


def _overlap(a: Path, b: Path) -> str | None:
    """How resolved ``a`` relates to resolved ``b``: 'is', 'is inside', 'contains' or None."""
    ra, rb = a.resolve(), b.resolve()
    if ra == rb:
        return "is"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "contains"
    return None


# ---------------------------------------------------------------------------------------- markers
def read_marker(d: Path) -> dict | None:
    """The marker of directory ``d`` (None when absent or not ours)."""
    p = d / MARKER
    try:
        if not p.is_file() or p.is_symlink() or p.stat().st_size > _MARKER_MAX_BYTES:
            return None
        m = json.loads(p.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == "v4convert" else None


def write_marker(d: Path, kind: str, state: str, **fields: object) -> None:
    """Write (atomically) the marker of directory ``d``. Content is deterministic (no timestamps)."""
    body = {"tool": "v4convert", "version": __version__, "kind": kind, "state": state, **fields}
    tmp = d / (MARKER + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, d / MARKER)


def is_ours(path: Path) -> bool:
    """Whether ``path`` is something v4convert wrote (see the module docstring for the marks)."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return read_marker(path) is not None
    if not path.is_file():
        return False
    name = path.name.removesuffix(".partial")        # our own scratch files carry the same marks
    if name.endswith(".v4convert-swap"):
        return swap_pending(path.with_name(name.removesuffix(".v4convert-swap")))
    if name == "Modelfile":
        with open(path, "rb") as f:
            return f.read(len(MODELFILE_MARK) + 1).decode("utf-8", "replace").rstrip("\r\n") == MODELFILE_MARK
    if name.endswith(".gguf"):
        from v4convert.formats.gguf_reader import GGUFFormatError, read_gguf_header
        try:
            return GGUF_MARKER_KEY in read_gguf_header(path, tensors=False).kvs
        except GGUFFormatError:
            return False
    return False


# ---------------------------------------------------------------------------------------- the rule
def claim(out: Path, *, sources: Iterable[Path] = (), overwrite: bool = False,
          scratch: Iterable[Path] | None = None, also: Iterable[Path] = ()) -> bool:
    """Check that the writer may produce ``out`` (rule 1-4 of the module docstring); touches nothing.

    ``scratch``: temporary paths the writer uses (default ``OUT.partial`` and ``OUT.old``): they must
    not overlap a source and, when they exist, must be ours. ``also``: further final paths written
    beside ``out`` (a Modelfile, GGUF splits), checked like ``out``. Returns True when an existing
    output of ours will be replaced.
    """
    out = absolute(out)
    if out.parent == out:
        raise OutputError(f"{out}: the filesystem root cannot be an output")
    scratch = [partial_path(out), old_path(out)] if scratch is None else [Path(p) for p in scratch]
    finals = [out, *(Path(p) for p in also)]
    for src in sources:
        src = Path(src)
        for p in finals + scratch:
            how = _overlap(p, src)
            if how:
                raise OutputError(f"{p}: output {how} the source {src}; choose an output outside it")
    replaced = False
    for p in finals:
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            continue
        if not is_ours(p):
            what = "a non-empty directory" if p.is_dir() else "a file"
            raise OutputError(f"{p}: exists and is {what} not written by v4convert; refusing to replace it "
                              f"(even with --overwrite): choose another output")
        if not overwrite:
            raise OutputError(f"{p}: a previous v4convert output exists; pass --overwrite to replace it")
        replaced = True
    for p in scratch:
        if (p.exists() or p.is_symlink()) and not is_ours(p):
            raise OutputError(f"{p}: exists and was not written by v4convert; move it away (it is this "
                              f"output's scratch path)")
    return replaced


def remove_ours(path: Path) -> None:
    """Delete ``path`` only if it is ours (the rule's last line of defence before any rmtree/unlink)."""
    if not (path.exists() or path.is_symlink()):
        return
    if not is_ours(path):
        raise OutputError(f"{path}: not written by v4convert; refusing to delete it")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---------------------------------------------------------------------------------------- finish
def recover(out: Path) -> None:
    """Repair what a kill during ``swap_in`` left: ``OUT.old`` beside a complete OUT is deleted; an
    ``OUT.old`` without OUT and without a ``OUT.partial`` to finish is moved back."""
    out = Path(out)
    old = old_path(out)
    if not old.exists() or not is_ours(old):
        return
    if out.exists():
        shutil.rmtree(old)
    elif not partial_path(out).exists():
        os.replace(old, out)


def swap_in(new: Path, out: Path) -> None:
    """Put the complete directory ``new`` at ``out``; a previous output of ours is moved to ``OUT.old``
    first and deleted last, so every kill leaves either the old or the new output under ``out``
    (``recover`` tidies up)."""
    new, out = Path(new), Path(out)
    old = old_path(out)
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            if not is_ours(out):     # checked by claim; re-checked here because this deletes
                raise OutputError(f"{out}: not written by v4convert; refusing to replace it")
            if old.exists():
                remove_ours(old)
            os.replace(out, old)
            kill_point("swap:old-moved")
    os.replace(new, out)
    kill_point("swap:new-in-place")
    if old.exists():
        shutil.rmtree(old)


def swap_journal(out: Path) -> Path:
    """A multi-file output (GGUF splits + Modelfile) being renamed into place: lists its files."""
    out = absolute(out)
    return out.with_name(out.name + ".v4convert-swap")


def begin_swap(out: Path, finals: list[Path]) -> None:
    """Record that ``finals`` are about to replace their old versions one by one; a rerun that finds
    this record knows the files under those names are its own unfinished output (no --overwrite needed)."""
    j = swap_journal(out)
    tmp = j.with_name(j.name + ".tmp")
    tmp.write_text(json.dumps({"tool": "v4convert", "files": [p.name for p in finals]}) + "\n")
    os.replace(tmp, j)


def end_swap(out: Path) -> None:
    swap_journal(out).unlink(missing_ok=True)


def swap_pending(out: Path) -> bool:
    """Whether a kill interrupted ``begin_swap`` .. ``end_swap`` for ``out`` (the record is ours)."""
    j = swap_journal(out)
    try:
        return j.is_file() and not j.is_symlink() and j.stat().st_size < _MARKER_MAX_BYTES \
            and json.loads(j.read_bytes()).get("tool") == "v4convert"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


_kill_calls: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """SIGKILL this process here when ``$V4CONVERT_KILL_AT`` is ``name`` or ``name:N`` (N-th call)."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    _kill_calls[name] += 1
    if want == name or want == f"{name}:{_kill_calls[name]}":
        os.kill(os.getpid(), signal.SIGKILL)
