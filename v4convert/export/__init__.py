"""Exporters to other runtimes' formats, and their registry.

An exporter is a module (or package) under ``v4convert/export/`` with

* ``Options``: a dataclass; every field has a default and ``field(metadata={"help": "..."})``. The CLI derives
  ``v4convert export --NAME`` and its options from it: a ``bool`` field ``x`` becomes ``--x/--no-x`` (or the
  ``"cli"`` declaration in its metadata, e.g. ``"--mtp/--no-mtp"``), any other field ``--x VALUE``;
  metadata ``"choices"`` (a list, or a zero-argument callable returning one) restricts the value
  (case-insensitively), ``"size": True`` parses ``50G`` / ``500M`` to bytes (binary units, ``cli/sizes.py``).
* ``export(src: Path, out: Path, opts: Options, *, progress: bool = False) -> ExportResult``.

Adding an exporter = its module + ONE line in ``EXPORTERS`` below + its tests. Two exporters may have options of
the same name; each validates its own values.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType


@dataclass
class ExportResult:
    """What an exporter wrote. ``label`` names the artifact in the CLI's summary line (default: the format)."""
    paths: list[Path]
    n_tensors: int
    n_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)   # one line each, printed under the summary
    label: str = ""


@dataclass(frozen=True)
class Exporter:
    name: str          # the CLI flag (--NAME) and the api's format name
    module: str        # the module holding Options and export()
    help: str          # one line for --help

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def options(self) -> type:
        return self.load().Options

    def fields(self) -> list[dataclasses.Field]:
        return list(dataclasses.fields(self.options()))


EXPORTERS: dict[str, Exporter] = {e.name: e for e in [
    Exporter("gguf", "v4convert.export.gguf", "GGUF for llama.cpp / Ollama."),
    Exporter("onnx", "v4convert.export.onnx", "ONNX for onnxruntime (--out DIR, or DIR/NAME.onnx)."),
    Exporter("sharded", "v4convert.export.sharded", "Our per-rank layout for torchrun (--tp/--ep; --out is a directory)."),
    Exporter("mlx", "v4convert.export.mlx", "An mlx-lm model directory (Apple silicon): V3/R1/V3.1, V3.2."),
]}


def get(name: str) -> Exporter:
    """The registry entry of format ``name`` (a ``KeyError`` names the known ones)."""
    try:
        return EXPORTERS[name]
    except KeyError:
        raise KeyError(f"unknown export format {name!r} (known: {', '.join(EXPORTERS)})") from None


def export(fmt: str, src: str | Path, out: str | Path, opts: object | None = None, *,
           progress: bool = False, log=None) -> ExportResult:
    """Export checkpoint ``src`` to ``out`` in format ``fmt`` with that exporter's ``Options`` (default: defaults).
    ``log`` (a ``str -> None``, optional): lines an exporter prints before writing (e.g. GGUF's type mix);
    passed only to exporters whose ``export`` takes it."""
    ex = get(fmt)
    mod = ex.load()
    kw = {"log": log} if log is not None and "log" in inspect.signature(mod.export).parameters else {}
    return mod.export(Path(src), Path(out), opts if opts is not None else mod.Options(), progress=progress, **kw)
