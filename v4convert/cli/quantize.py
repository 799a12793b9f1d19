"""``v4convert quantize CKPT --fp4 [--scheme nvfp4|mxfp4] --out DIR``: the click command.

Builds the plan from the index (headers only), prints its summary, then runs the streaming engine.
Errors from bad input surface as one line through the main group's error handler.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from v4convert.formats.containers import Container

from ..quant.recipes import RecipeName
from .sizes import SIZE


@click.command("quantize")
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fp4", "fp4", is_flag=True, required=True, help="Quantize to FP4 (the only mode so far; required).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--scheme", type=click.Choice(["nvfp4", "mxfp4"]), default="nvfp4", show_default=True,
              help="FP4 flavour; picks the default recipe (nvfp4-experts / mxfp4-experts).")
@click.option("--recipe", type=click.Choice([r.value for r in RecipeName]), default=None,
              help="Recipe preset (overrides --scheme's default).")
@click.option("--format", "fmt", type=click.Choice([c.value for c in Container]), default=None,
              help="Output container (default: compressed-tensors; deepseek is MXFP4 only).")
@click.option("--keep", multiple=True, metavar="PATTERN", help="Keep matching tensors as stored (fnmatch on names; repeatable).")
@click.option("--override", multiple=True, metavar="PATTERN=CODEC", help="Force a codec (nvfp4, mxfp4, keep) on matching tensors.")
@click.option("--scale-method", type=click.Choice(["rtn", "mse", "four-over-six"]), default="rtn", show_default=True,
              help="NVFP4 block-scale choice.")
@click.option("--mx-rule", type=click.Choice(["floor", "round-up"]), default="floor", show_default=True,
              help="MXFP4 exponent rule: OCP floor or round-up (no clipping).")
@click.option("--keep-native-fp4", is_flag=True, help="V4: keep the native MXFP4 experts as they are (no NVFP4 re-pack).")
@click.option("--shard-size", type=SIZE, default="5G", show_default=True,
              help="Target output shard size (binary units: 5G = 5 GiB; 500M, bytes).")
@click.option("--workers", type=int, default=None, help="Worker processes (default: CPU cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (or a foreign unfinished OUT.partial).")
@click.option("--plan-only", is_flag=True, help="Print the plan summary and exit.")
@click.option("--sync-every", type=SIZE, default="1G", show_default=True,
              help="Journal (fsync) after this much output (binary units).")
@click.option("--device", default=None, help="Compute device for the FP8->NVFP4 hot path (default: cuda if present, else cpu).")
@click.option("--kernel", type=click.Choice(["native", "torch"]), default=None,
              help="FP8->NVFP4 hot path: the native C kernel (default on CPU when a C compiler builds it) or "
                   "torch. Both write identical bytes.")
def quantize_command(ckpt: Path, fp4: bool, out: Path, scheme: str, recipe: str | None, fmt: str | None,
                     keep: tuple[str, ...], override: tuple[str, ...], scale_method: str, mx_rule: str,
                     keep_native_fp4: bool, shard_size: int, workers: int | None, overwrite: bool,
                     plan_only: bool, sync_every: int, device: str | None, kernel: str | None) -> None:
    """Quantize a DeepSeek checkpoint to FP4, streaming, resumable.

    Reads the release as published (FP8 blocks, V4 MXFP4 experts), writes OUT.partial/ and renames it
    to OUT when complete. A killed run restarted with the same command resumes where it stopped and
    produces byte-identical output.
    """
    from .. import api

    n_shards = 0

    def on_plan(plan) -> None:
        nonlocal n_shards
        n_shards = len(plan.shards)
        click.echo(plan.summary(), err=True)

    r = api.quantize(api.QuantizeArgs(
        src=ckpt, out=out, scheme=scheme, recipe=recipe, container=fmt, keep=keep, overrides=override,
        scale_method=scale_method, mx_rule=mx_rule, keep_native_fp4=keep_native_fp4,
        shard_bytes=shard_size, workers=workers, overwrite=overwrite, plan_only=plan_only,
        sync_bytes=sync_every, device=device, kernel=kernel, progress=sys.stderr.isatty(),
        on_plan=on_plan))
    if r is None:
        return
    extra = f", mxfp4->nvfp4 inexact blocks {r.repack_inexact}/{r.repack_blocks}" if r.repack_blocks else ""
    click.echo(f"wrote {r.bytes_out:,} bytes in {n_shards} shard(s) to {r.out}"
               f" ({r.resumed_units} of {r.units} units resumed{extra})")
