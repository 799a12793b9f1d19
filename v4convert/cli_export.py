"""``v4convert export CKPT --gguf|--mlx|--onnx|--sharded --out PATH``: artifacts other than FP4 checkpoints.

``--gguf`` and ``--mlx`` are implemented; the other formats are accepted by the parser and refused with
a clear error, so scripts get a stable interface.
"""
from __future__ import annotations

import enum
import re
import sys
from pathlib import Path

import click


class ExportFormat(enum.Enum):
    GGUF = "gguf"
    ONNX = "onnx"
    SHARDED = "sharded"
    MLX = "mlx"


class NotImplementedFormat(ValueError):
    """An export format the tool names but does not write yet."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_SIZE_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | None) -> int | None:
    """``"50G"`` / ``"500M"`` / ``"1048576"`` -> bytes (binary units, like llama.cpp's gguf-split)."""
    if text is None:
        return None
    m = _SIZE_RE.match(text)
    if m is None:
        raise click.BadParameter(f"cannot parse size {text!r} (use e.g. 50G, 500M, 1048576)")
    n = int(float(m.group(1)) * _SIZE_UNIT[m.group(2).upper()])
    if n <= 0:
        raise click.BadParameter("size must be positive")
    return n


def _types() -> list[str]:
    from .export_gguf import GGUFType
    return [t.value for t in GGUFType]


def _main_types() -> list[str]:
    from .export_gguf import LlamaQuant
    return _types() + [t.name for t in LlamaQuant]


@click.command("export")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gguf", "fmt", flag_value=ExportFormat.GGUF.value, help="GGUF for llama.cpp / Ollama.")
@click.option("--onnx", "fmt", flag_value=ExportFormat.ONNX.value, help="ONNX for onnxruntime (not yet).")
@click.option("--sharded", "fmt", flag_value=ExportFormat.SHARDED.value, help="Our sharded layout (not yet).")
@click.option("--mlx", "fmt", flag_value=ExportFormat.MLX.value, help="An mlx-lm model directory (Apple silicon).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output file (GGUF: NAME.gguf).")
@click.option("--type", "main_type", default="Q8_0", show_default=True,
              type=click.Choice(_main_types(), case_sensitive=False),
              help="Type of attention, shared experts, dense MLP, embedding and head (norms/router stay F32; "
                   "MLA attn_k_b/attn_v_b never below Q8_0). K-quants / IQ4_XS are written by llama.cpp's own "
                   "quantizer (llama-cpp-python) from a temporary file where these tensors are BF16.")
@click.option("--expert-type", default="MXFP4", show_default=True, type=click.Choice(_types(), case_sensitive=False),
              help="Type of the routed experts. MXFP4 sources (V4 experts, our MXFP4 artifacts) are re-packed "
                   "losslessly.")
@click.option("--mtp/--no-mtp", "keep_mtp", default=True, show_default=True,
              help="Keep the MTP (NextN) block where llama.cpp loads it from the model file (deepseek2/deepseek32).")
@click.option("--split-max-size", default=None, help="Split into NAME-0000k-of-0000N.gguf files of at most this "
              "much tensor data (e.g. 50G).")
@click.option("--no-modelfile", is_flag=True, help="Do not write an Ollama Modelfile beside the GGUF.")
@click.option("--mlx-quant", default="affine8", show_default=True,
              help="MLX: quantization of embedding, head, dense MLP, shared experts (affine4, affine8[-g32|-g64|-g128], "
                   "mxfp4, nvfp4, none).")
@click.option("--mlx-attention", default=None, help="MLX: quantization of attention projections (default: --mlx-quant).")
@click.option("--mlx-experts", default="mxfp4", show_default=True,
              help="MLX: quantization of routed experts (MXFP4 sources are re-packed losslessly).")
@click.option("--mlx-dtype", default="bfloat16", show_default=True, type=click.Choice(["bfloat16", "float16", "float32"]),
              help="MLX: dtype of unquantized tensors and affine scales.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def export_command(ckpt: Path, fmt: str | None, out: Path, main_type: str, expert_type: str, keep_mtp: bool,
                   split_max_size: str | None, no_modelfile: bool, mlx_quant: str, mlx_attention: str | None,
                   mlx_experts: str, mlx_dtype: str, progress: bool | None) -> None:
    """Export checkpoint CKPT (as published, or our FP4 artifact) to another runtime's format.

    GGUF: arch deepseek2 (V3/R1/V3.1), deepseek32 (V3.2) or deepseek4 (V4) with llama.cpp's metadata,
    tokenizer and tensor names, streamed tensor by tensor; default mix: experts MXFP4, attention and
    shared experts Q8_0, norms/router F32.

    MLX: an mlx-lm model directory (V3/R1/V3.1, V3.2): experts mxfp4, the rest affine 8-bit (see --mlx-*).
    """
    if fmt is None:
        raise click.UsageError("choose an output format: --gguf, --mlx (or --onnx / --sharded, not yet implemented)")
    f = ExportFormat(fmt)
    if f is ExportFormat.MLX:
        from .export.mlx import Options, export_mlx
        r = export_mlx(ckpt, out, Options(mlx_quant, mlx_attention, mlx_experts, mlx_dtype),
                       progress=sys.stderr.isatty() if progress is None else progress)
        click.echo(f"wrote mlx-lm model: {r.n_tensors} tensors, {r.n_bytes:,} bytes in {len(r.paths)} file(s) in "
                   f"{r.seconds:.1f} s ({r.n_bytes / max(r.seconds, 1e-9) / 1e9:.2f} GB/s): {out}")
        for note in r.notes:
            click.echo(f"  {note}")
        return
    if f is not ExportFormat.GGUF:
        raise NotImplementedFormat(f"export --{f.value} is not implemented yet (only --gguf and --mlx are)")
    from .export_gguf import GGUFType, LlamaQuant, TypeMix, export_gguf
    mt = main_type.upper()
    llama_type = LlamaQuant[mt] if mt in LlamaQuant.__members__ else None
    mix = TypeMix(GGUFType.Q8_0 if llama_type else GGUFType(mt), GGUFType(expert_type.upper()))
    r = export_gguf(ckpt, out, mix, keep_mtp=keep_mtp, split_max_size=parse_size(split_max_size),
                    progress=sys.stderr.isatty() if progress is None else progress, modelfile=not no_modelfile,
                    llama_type=llama_type)
    gbps = r.n_bytes / max(r.seconds, 1e-9) / 1e9
    click.echo(f"wrote {r.arch.value} GGUF: {r.n_tensors} tensors, {r.n_bytes:,} bytes in {len(r.paths)} file(s) "
               f"in {r.seconds:.1f} s ({gbps:.2f} GB/s): {', '.join(str(p) for p in r.paths)}")
    if r.repacked:
        click.echo(f"  {len(r.repacked)} MXFP4 tensors re-packed losslessly")
    if r.skipped:
        click.echo(f"  {len(r.skipped)} checkpoint tensors not exported, e.g. {r.skipped[0]}")
    if r.modelfile:
        click.echo(f"  Ollama: ollama create NAME -f {r.modelfile}")
