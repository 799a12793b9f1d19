"""The ``v4convert`` command line. Each command's logic lives in its module; this file only wires.

Errors from bad input (``UserError``) are printed as one line (``error: FILE: tensor NAME: ...``) with exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import UserError
from .calibrate import calibrate_command
from .export import export_command
from .run import run_command
from .verify import verify_command
from .quantize import quantize_command
from .sizes import SIZE

RESUMABLE = {"quantize"}           # commands whose rerun resumes from a journal (quant/engine.py)


class Group(click.Group):
    """Turns user errors (``UserError``) into one clean line and exit code 2. Anything else is a bug of ours:
    it keeps its traceback (exit 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:          # Ctrl-C: one line, the shell's 128 + SIGINT, no traceback
            resumable = ctx.invoked_subcommand in RESUMABLE
            click.echo("\ninterrupted" + (" — rerun the same command to resume" if resumable else ""), err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="v4convert")
def main() -> None:
    """Convert and quantize DeepSeek V3/R1/V3.1/V3.2/V4 checkpoints, and verify the results.

    Start with `v4convert inspect CKPT` on a downloaded checkpoint, or `v4convert demo`.
    """


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--memory", default=None, metavar="SIZE",
              help="Does each output fit in one memory pool of SIZE (e.g. 64GB, a Mac's unified memory)? "
                   "Binary units: 64GB = 64 GiB.")
@click.option("--device", "devices", default=None, metavar="NxSIZE",
              help="Does each output fit on N devices of SIZE (e.g. 2x32GB), whole layers per device?")
@click.option("--kv-tokens", default=32768, show_default=True, type=click.IntRange(min=1),
              help="Tokens of KV cache counted with the weights for --memory / --device.")
@click.option("--reserve", default="1GB", show_default=True, metavar="SIZE",
              help="Memory reserved per device for the runtime (context, activations) in the fit report.")
def inspect_cmd(path: Path, as_json: bool, memory: str | None, devices: str | None, kv_tokens: int,
                reserve: str) -> None:
    """Show what a checkpoint holds and what each output would weigh.

    PATH is a checkpoint directory (config.json + safetensors, read from headers only) or a bare
    config.json, for which the full published inventory is computed without any weights.
    Reports family, layers, experts, parameters (main model and MTP), bytes by role and dtype,
    shards, and projected sizes of the NVFP4 / MXFP4 / GGUF outputs.
    """
    from .. import api
    from ..inspect import format_report
    report = api.inspect(api.InspectArgs(path, memory=memory, devices=devices, kv_tokens=kv_tokens, reserve=reserve))
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command("synth")
@click.option("--preset", required=True, help="v3-tiny, v32-tiny, v4-flash-tiny, v4-flash-base-tiny, v3-vllm-tiny (tests; v3-vllm-tiny fits "
              "vLLM's kernel constraints) or v3-671b, v32-671b, v4-flash, v4-pro (full size; needs --layers).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output directory (absent, empty, or a previous synth output with --overwrite).")
@click.option("--seed", default=0, show_default=True, help="Random seed; output is deterministic per seed.")
@click.option("--layers", default=None, help="Blocks to write, e.g. '3', '0-1,mtp' or 'all' (default all).")
@click.option("--shard-size", type=SIZE, default=None,
              help="Max bytes per shard, e.g. 5G or 2000000 (binary units; default 2 MiB tiny, 5 GiB full).")
@click.option("--with-embed/--no-embed", default=None,
              help="Also write embed/head/final norm (default: yes for whole models, no with --layers).")
@click.option("--overwrite", is_flag=True, help="Replace a previous v4convert output at OUT once the new one is complete.")
def synth_cmd(preset: str, out: Path, seed: int, layers: str | None, shard_size: int | None,
              with_embed: bool | None, overwrite: bool) -> None:
    """Write a synthetic checkpoint in the exact published layout of a DeepSeek family.

    Same tensor names, dtypes (FP8 E4M3 + block scales, V4 FP4 experts), scale shapes, shard
    naming, index, config.json and a small byte-level BPE tokenizer. Values are random but sane
    and deterministic per seed; writing streams tensor by tensor.
    """
    from .. import api
    r = api.synth(api.SynthArgs(preset, out, seed=seed, layers=layers, shard_size=shard_size, with_embed=with_embed,
                                progress=sys.stderr.isatty(), overwrite=overwrite))
    click.echo(f"wrote {r.n_tensors} tensors, {r.n_bytes:,} bytes in {r.n_shards} shard(s) to {r.out}")


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("v4convert-demo"), show_default=True,
              help="Working directory for the demo's files.")
@click.option("--tokens", type=int, default=2048, show_default=True, help="Held-out tokens to score.")
@click.option("--ctx", type=int, default=None, help="Window length [default: as verify's: the bundled model's "
              "training context, 128].")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads (default: the cores not busy with other processes; see v4convert/threads.py).")
def demo_cmd(out: Path, tokens: int, ctx: int | None, threads: int | None) -> None:
    """The pipeline on the bundled trained tiny V3 model, offline, in minutes.

    Quantizes the bundled FP8 release (trained on Python stdlib text) to NVFP4 and MXFP4, verifies each
    against it on held-out text, and prints the comparison table and where the files are.
    """
    from ..demo import bundled_model, format_demo, run_demo
    from ..threads import set_torch_threads
    from ..verify import VerifyOptions, default_ctx
    set_torch_threads(threads)
    rows = run_demo(out, VerifyOptions(ctx=ctx or default_ctx(bundled_model("v3")), tokens=tokens), echo=click.echo)
    click.echo(format_demo(out, rows))


main.add_command(run_command)
main.add_command(verify_command)
main.add_command(export_command)
main.add_command(quantize_command)
main.add_command(calibrate_command)

if __name__ == "__main__":
    main()
