"""``v4convert quantize CKPT --fp4 [--scheme nvfp4|mxfp4] --out DIR``: the click command.

Builds the plan from the index (headers only), prints its summary, then runs the streaming engine.
Errors from bad input surface as one line through the main group's error handler.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from v4convert.formats.containers import Container

from ..calib import DEFAULT_GPTQ_DAMP
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
@click.option("--scale-method", type=click.Choice(["rtn", "mse", "four-over-six"]), default=None,
              help="NVFP4 block-scale choice (data-free; default rtn). Alias of --method for these three.")
@click.option("--method", "method", default=None, metavar="M[+M...]",
              help="Quantization method: rtn | mse | four-over-six (data-free) and/or gptq | awq (need --calib), "
                   "joined with '+', e.g. gptq, awq+gptq, gptq+four-over-six. Default: gptq with --calib, else rtn.")
@click.option("--calib", "calib", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help="Calibrate on PATH (.txt, .jsonl with a 'text' field, or a directory of them), tokenized with the "
                   "checkpoint's tokenizer.json; without PATH: the bundled corpus's training split.")
@click.option("--calib-stats", "calib_stats", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, metavar="DIR",
              help="Reuse the statistics `v4convert calibrate CKPT --stats DIR` saved instead of running a calibration "
                   "pass (one pass, many recipes; implies --propagate original).")
@click.option("--calib-tokens", type=int, default=8192, show_default=True,
              help="Calibration tokens (real models: 8192-131072 recommended).")
@click.option("--calib-seq-len", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--propagate", type=click.Choice(["quantized", "original"]), default="quantized", show_default=True,
              help="Feed each layer the outputs of the already quantized layers, or of the original model.")
@click.option("--calib-all-experts", is_flag=True,
              help="Send every calibration token through every routed expert for statistics (outputs still use "
                   "the real routing).")
@click.option("--min-expert-tokens", type=int, default=16, show_default=True,
              help="Experts routed fewer calibration tokens fall back to the data-free method (with a warning).")
@click.option("--plot", "plot", is_flag=True,
              help="With --calib/--calib-stats: also write DIR/calibration-coverage.png (experts x layers heat-map; needs matplotlib).")
@click.option("--activations", type=click.Choice(["w4a16", "w4a4"]), default="w4a16", show_default=True,
              help="w4a4: also quantize activations (needs --calib): static per-tensor NVFP4 input scales from the "
                   "calibration's max|x| (compressed-tensors input_global_scale / ModelOpt input_scale; fused groups "
                   "and a layer's experts share one), MXFP4 dynamic per 32. w4a16: weight-only.")
@click.option("--gptq-damp", type=float, default=DEFAULT_GPTQ_DAMP, show_default=True,
              help="GPTQ damping (fraction of mean diag H added to its diagonal; lower fits the calibration text "
                   "closer and over-fits it sooner).")
@click.option("--gptq-act-order", is_flag=True, help="GPTQ: quantize columns by decreasing activation energy.")
@click.option("--gptq-scales", type=click.Choice(["before", "during", "search"]), default="before", show_default=True,
              help="GPTQ block scales: from the original weights, re-derived from the updated ones per block (as "
                   "RTN), or searched per row and block on the updated ones (awq's candidates, the least GPTQ loss).")
@click.option("--gptq-refine", type=click.IntRange(0, 100), default=0, show_default=True, metavar="N",
              help="GPTQ: N coordinate-descent sweeps after GPTQ on its objective (same block scales; never raises "
                   "the damped calibration error).")
@click.option("--gptq-target", type=click.Choice(["quantized", "original"]), default="quantized", show_default=True,
              help="GPTQ's target outputs with --propagate quantized: those of the linear on the quantized model's "
                   "inputs (plain GPTQ), or the original model's (GPTAQ-style: a second, original hidden-state "
                   "stream in the pass; W* = W + W (C - H) H'^-1 with C = Xo^T X / n, then GPTQ on H).")
@click.option("--true-sequential", is_flag=True,
              help="With --propagate quantized: quantize a block's linears in stages (attention inputs, output "
                   "projections, gate/up, down), each stage's statistics taken with the earlier ones quantized; routed "
                   "experts' statistics after the block's attention is quantized. One more block run per stage.")
@click.option("--mx-rule", type=click.Choice(["floor", "round-up"]), default="floor", show_default=True,
              help="MXFP4 exponent rule: OCP floor or round-up (no clipping).")
@click.option("--keep-bf16", is_flag=True,
              help="Write kept FP8-block linears as BF16 (compressed-tensors; ModelOpt always does): for engines "
                   "without FP8 block kernels, e.g. vLLM on a CPU without AMX.")
@click.option("--keep-native-fp4", is_flag=True, help="V4: keep the native MXFP4 experts as they are (no NVFP4 re-pack).")
@click.option("--shard-size", type=SIZE, default="5G", show_default=True,
              help="Target output shard size (binary units: 5G = 5 GiB; 500M, bytes).")
@click.option("--workers", type=int, default=None, help="Workers (default: one per free core): threads for data-free methods (their reads, kernels and "
              "writes run without the GIL, so one worker's disk wait overlaps another's compute), processes for "
              "calibrated ones; V4C_POOL=threads|processes overrides. The free cores are shared among them, so "
              "workers x threads never exceeds the cores not busy with other processes.")
@click.option("--overwrite", is_flag=True, help="Replace a previous v4convert output at OUT (only once the new one is "
              "complete). Never deletes a directory v4convert did not write, nor the source.")
@click.option("--allow-missing", is_flag=True, help="Write an artifact although the checkpoint lacks tensors its "
              "config implies (recorded in the output's metadata).")
@click.option("--allow-nonfinite", is_flag=True, help="Copy NaN/Inf in tensors kept as stored instead of refusing.")
@click.option("--plan-only", is_flag=True, help="Print the plan summary and exit.")
@click.option("--sync-every", type=SIZE, default="1G", show_default=True,
              help="Journal (fsync) after this much output (binary units).")
@click.option("--device", default=None, help="Compute device for the FP8->NVFP4 hot path (default: cuda if present, else cpu).")
@click.option("--kernel", type=click.Choice(["native", "torch"]), default=None,
              help="FP8->NVFP4 hot path and the MXFP4->NVFP4 re-pack: the native C kernels (default on CPU "
                   "when a C compiler builds them) or torch. Both write identical bytes.")
def quantize_command(ckpt: Path, fp4: bool, out: Path, scheme: str, recipe: str | None, fmt: str | None,
                     keep: tuple[str, ...], override: tuple[str, ...], scale_method: str | None, method: str | None,
                     calib: str | None, calib_stats: Path | None, calib_tokens: int, calib_seq_len: int, propagate: str,
                     calib_all_experts: bool, min_expert_tokens: int, plot: bool, activations: str, gptq_damp: float,
                     gptq_act_order: bool, gptq_scales: str, gptq_refine: int, gptq_target: str, true_sequential: bool, mx_rule: str,
                     keep_bf16: bool, keep_native_fp4: bool, shard_size: int, workers: int | None, overwrite: bool,
                     allow_missing: bool, allow_nonfinite: bool,
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
        scale_method=scale_method, mx_rule=mx_rule, keep_native_fp4=keep_native_fp4, keep_bf16=keep_bf16,
        shard_bytes=shard_size, workers=workers, overwrite=overwrite,
        allow_missing=allow_missing, allow_nonfinite=allow_nonfinite, plan_only=plan_only,
        sync_bytes=sync_every, device=device, kernel=kernel, progress=sys.stderr.isatty(),
        on_plan=on_plan, method=method, calib=calib is not None, calib_data=Path(calib) if calib else None,
        calib_stats=calib_stats, calib_tokens=calib_tokens, calib_seq_len=calib_seq_len, propagate=propagate,
        calib_all_experts=calib_all_experts, min_expert_tokens=min_expert_tokens, gptq_damp=gptq_damp,
        gptq_act_order=gptq_act_order, gptq_scales=gptq_scales, gptq_refine=gptq_refine, gptq_target=gptq_target, true_sequential=true_sequential, plot=plot, activations=activations, log=lambda m: click.echo(m, err=True)))
    if r is None:
        return
    extra = f", mxfp4->nvfp4 inexact blocks {r.repack_inexact}/{r.repack_blocks}" if r.repack_blocks else ""
    click.echo(f"wrote {r.bytes_out:,} bytes in {n_shards} shard(s) to {r.out}"
               f" ({r.resumed_units} of {r.units} units resumed{extra})")
