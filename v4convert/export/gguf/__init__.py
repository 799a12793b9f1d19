"""GGUF export for llama.cpp / Ollama: ``Options`` + ``export()`` (the exporter contract of ``v4convert.export``).

The work is done by ``exporter.export_gguf``; this module maps the typed options onto it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from v4convert.export import ExportResult

from .exporter import ExportError, GGUFType, LlamaQuant, TypeMix, export_gguf


def _types() -> list[str]:
    return [t.value for t in GGUFType]


MXFP4_MOE = "MXFP4_MOE"     # named mix (llama.cpp's MOSTLY_MXFP4_MOE): routed experts MXFP4, the rest Q8_0


def _main_types() -> list[str]:
    return [MXFP4_MOE] + _types() + [t.name for t in LlamaQuant]


@dataclass
class Options:
    main_type: str = field(default=MXFP4_MOE, metadata={
        "cli": "--type", "choices": _main_types,
        "help": "Type of the whole file, as llama.cpp's --outtype (norms/router/hyper-connections stay F32; MLA "
                "attn_k_b/attn_v_b never below Q8_0). MXFP4_MOE: routed experts MXFP4, everything else Q8_0. "
                "K-quants / IQ4_XS are written by llama.cpp's own quantizer (llama-cpp-python) from a temporary "
                "file where those tensors are BF16. The resolved mix is printed before writing."})
    expert_type: str | None = field(default=None, metadata={
        "choices": _types,
        "help": "Another type for the routed experts (default: as --type). MXFP4 sources (V4 experts, our "
                "MXFP4 artifacts) are re-packed losslessly."})
    keep_mtp: bool = field(default=True, metadata={
        "cli": "--mtp/--no-mtp",
        "help": "Keep the MTP (NextN) block where llama.cpp loads it from the model file (deepseek2/deepseek32)."})
    split_max_size: int | None = field(default=None, metadata={
        "size": True,
        "help": "Split into NAME-0000k-of-0000N.gguf files of at most this much tensor data (e.g. 50G)."})
    modelfile: bool = field(default=True, metadata={
        "cli": "--modelfile/--no-modelfile", "help": "Write an Ollama Modelfile beside the GGUF (default: yes)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a previous v4convert export (GGUF files, Modelfile) once the new one is complete; files "
                "v4convert did not write are never replaced (v4convert.outputs)."})
    allow_missing: bool = field(default=False, metadata={
        "help": "Export although the checkpoint lacks tensors its config implies (recorded in the GGUF metadata)."})
    allow_nonfinite: bool = field(default=False, metadata={"help": "Export NaN/Inf values instead of refusing."})
    workers: int = field(default=0, metadata={
        "help": "Encoder threads (0: min(2, CPUs)); at most 2x that many tensors (or experts) in flight. A killed "
                "export resumes when the same command is run again (journal OUT.gguf.journal/)."})
    imatrix: str | None = field(default=None, metadata={
        "help": "Importance matrix for llama.cpp's quantizer (K-quants, IQ4_XS): a GGUF imatrix from "
                "`v4convert calibrate --imatrix` or llama.cpp's llama-imatrix (legacy .dat too)."})

    def mix(self) -> tuple[TypeMix, LlamaQuant | None, bool]:
        """(the type mix we write, the llama.cpp quantizer's type for a K-quant / IQ ``main_type``, whether the
        routed experts go to that quantizer too).

        Like llama.cpp's ``--outtype`` / ``llama-quantize TYPE``, ``--type T`` alone means the whole file;
        ``--expert-type`` gives the routed experts another type; ``MXFP4_MOE`` = experts MXFP4 + the rest Q8_0."""
        mt = self.main_type.upper()
        et = self.expert_type.upper() if self.expert_type else None
        if mt not in _main_types():
            raise ExportError(f"--type {self.main_type}: not one of {', '.join(_main_types())}")
        if et is not None and et not in _types():
            raise ExportError(f"--expert-type {self.expert_type}: not one of {', '.join(_types())}")
        expert = GGUFType(et) if et else None
        if mt == MXFP4_MOE:
            return TypeMix(GGUFType.Q8_0, expert or GGUFType.MXFP4), None, False
        if mt in LlamaQuant.__members__:
            return TypeMix(GGUFType.Q8_0, expert or GGUFType.BF16), LlamaQuant[mt], expert is None
        return TypeMix(GGUFType(mt), expert or GGUFType(mt)), None, False

    def default_name(self, src: Path) -> str:
        """``CKPTNAME-TYPE.gguf`` (llama.cpp's converter names its output NAME-TYPE.gguf too)."""
        et = f"-{self.expert_type.upper()}-EXPERTS" if self.expert_type else ""
        return f"{Path(src).resolve().name}-{self.main_type.upper()}{et}.gguf"


def export(src: Path, out: Path, opts: Options, *, progress: bool = False,
           log: Callable[[str], None] | None = None) -> ExportResult:
    """Write checkpoint ``src`` as GGUF to ``out`` (``.gguf``; splits beside it). ``log`` gets the resolved
    type mix before any tensor is written."""
    mix, llama_type, llama_experts = opts.mix()
    r = export_gguf(src, out, mix, keep_mtp=opts.keep_mtp, split_max_size=opts.split_max_size, progress=progress,
                    modelfile=opts.modelfile, llama_type=llama_type, overwrite=opts.overwrite,
                    allow_missing=opts.allow_missing, allow_nonfinite=opts.allow_nonfinite,
                    llama_experts=llama_experts, log=log, imatrix=Path(opts.imatrix) if opts.imatrix else None,
                    workers=opts.workers or None)
    notes = []
    if r.repacked:
        notes.append(f"{len(r.repacked)} MXFP4 tensors re-packed losslessly")
    if r.requantized:
        eg = next((x for x in r.requantized if "_exps." in x), r.requantized[0])
        notes.append(f"{len(r.requantized)} FP4 tensors re-quantized (lossy; the source's FP4 values are not kept), "
                     f"e.g. {eg}; only MXFP4 sources go into MXFP4 losslessly")
    if r.skipped:
        notes.append(f"{len(r.skipped)} checkpoint tensors not exported, e.g. {r.skipped[0]}")
    if r.modelfile:
        notes.append(f"Ollama: ollama create NAME -f {r.modelfile}")
    return ExportResult(r.paths, r.n_tensors, r.n_bytes, r.seconds, notes, label=f"{r.arch.value} GGUF")
