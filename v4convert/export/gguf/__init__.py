"""GGUF export for llama.cpp / Ollama: ``Options`` + ``export()`` (the exporter contract of ``v4convert.export``).

The work is done by ``exporter.export_gguf``; this module maps the typed options onto it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from v4convert.export import ExportResult

from .exporter import ExportError, GGUFType, LlamaQuant, TypeMix, export_gguf


def _types() -> list[str]:
    return [t.value for t in GGUFType]


def _main_types() -> list[str]:
    return _types() + [t.name for t in LlamaQuant]


@dataclass
class Options:
    main_type: str = field(default="Q8_0", metadata={
        "cli": "--type", "choices": _main_types,
        "help": "Type of attention, shared experts, dense MLP, embedding and head (norms/router stay F32; "
                "MLA attn_k_b/attn_v_b never below Q8_0). K-quants / IQ4_XS are written by llama.cpp's own "
                "quantizer (llama-cpp-python) from a temporary file where these tensors are BF16."})
    expert_type: str = field(default="MXFP4", metadata={
        "choices": _types,
        "help": "Type of the routed experts. MXFP4 sources (V4 experts, our MXFP4 artifacts) are re-packed "
                "losslessly."})
    keep_mtp: bool = field(default=True, metadata={
        "cli": "--mtp/--no-mtp",
        "help": "Keep the MTP (NextN) block where llama.cpp loads it from the model file (deepseek2/deepseek32)."})
    split_max_size: int | None = field(default=None, metadata={
        "size": True,
        "help": "Split into NAME-0000k-of-0000N.gguf files of at most this much tensor data (e.g. 50G)."})
    modelfile: bool = field(default=True, metadata={
        "cli": "--modelfile/--no-modelfile", "help": "Write an Ollama Modelfile beside the GGUF (default: yes)."})

    def mix(self) -> tuple[TypeMix, LlamaQuant | None]:
        """The type mix we write, and the llama.cpp quantizer's type for a K-quant / IQ ``main_type``."""
        mt, et = self.main_type.upper(), self.expert_type.upper()
        if mt not in _main_types():
            raise ExportError(f"--type {self.main_type}: not one of {', '.join(_main_types())}")
        if et not in _types():
            raise ExportError(f"--expert-type {self.expert_type}: not one of {', '.join(_types())}")
        llama_type = LlamaQuant[mt] if mt in LlamaQuant.__members__ else None
        return TypeMix(GGUFType.Q8_0 if llama_type else GGUFType(mt), GGUFType(et)), llama_type


def export(src: Path, out: Path, opts: Options, *, progress: bool = False) -> ExportResult:
    """Write checkpoint ``src`` as GGUF to ``out`` (``.gguf``; splits beside it)."""
    mix, llama_type = opts.mix()
    r = export_gguf(src, out, mix, keep_mtp=opts.keep_mtp, split_max_size=opts.split_max_size, progress=progress,
                    modelfile=opts.modelfile, llama_type=llama_type)
    notes = []
    if r.repacked:
        notes.append(f"{len(r.repacked)} MXFP4 tensors re-packed losslessly")
    if r.skipped:
        notes.append(f"{len(r.skipped)} checkpoint tensors not exported, e.g. {r.skipped[0]}")
    if r.modelfile:
        notes.append(f"Ollama: ollama create NAME -f {r.modelfile}")
    return ExportResult(r.paths, r.n_tensors, r.n_bytes, r.seconds, notes, label=f"{r.arch.value} GGUF")
