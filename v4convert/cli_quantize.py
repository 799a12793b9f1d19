"""``v4convert quantize CKPT --fp4 [--scheme nvfp4|mxfp4] --out DIR``: the click command.

Builds the plan from the index (headers only), prints its summary, then runs the streaming engine.
Errors from bad input surface as one line through the main group's error handler.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from v4convert.formats.containers import Container

from .recipes import RecipeName


def _parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    for suf, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("G", 10**9), ("M", 10**6), ("K", 10**3), ("B", 1)):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mult)
    return int(t)


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
              help="With --calib: also write DIR/calibration-coverage.png (experts x layers heat-map; needs matplotlib).")
@click.option("--gptq-damp", type=float, default=0.01, show_default=True, help="GPTQ damping (fraction of mean diag H).")
@click.option("--gptq-act-order", is_flag=True, help="GPTQ: quantize columns by decreasing activation energy.")
@click.option("--gptq-scales", type=click.Choice(["before", "during"]), default="before", show_default=True,
              help="GPTQ block scales: from the original weights, or re-derived from the updated ones per block.")
@click.option("--mx-rule", type=click.Choice(["floor", "round-up"]), default="floor", show_default=True,
              help="MXFP4 exponent rule: OCP floor or round-up (no clipping).")
@click.option("--keep-native-fp4", is_flag=True, help="V4: keep the native MXFP4 experts as they are (no NVFP4 re-pack).")
@click.option("--shard-size", default="5GB", show_default=True, help="Target output shard size (e.g. 5GB, 500MB).")
@click.option("--workers", type=int, default=None, help="Worker processes (default: CPU cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (or a foreign unfinished OUT.partial).")
@click.option("--plan-only", is_flag=True, help="Print the plan summary and exit.")
@click.option("--sync-every", default="1GB", show_default=True, help="Journal (fsync) after this much output.")
@click.option("--device", default=None, help="Compute device for the FP8->NVFP4 hot path (default: cuda if present, else cpu).")
@click.option("--kernel", type=click.Choice(["native", "torch"]), default=None,
              help="FP8->NVFP4 hot path: the native C kernel (default on CPU when a C compiler builds it) or "
                   "torch. Both write identical bytes.")
def quantize_command(ckpt: Path, fp4: bool, out: Path, scheme: str, recipe: str | None, fmt: str | None,
                     keep: tuple[str, ...], override: tuple[str, ...], scale_method: str | None, method: str | None,
                     calib: str | None, calib_tokens: int, calib_seq_len: int, propagate: str,
                     calib_all_experts: bool, min_expert_tokens: int, plot: bool, gptq_damp: float, gptq_act_order: bool,
                     gptq_scales: str, mx_rule: str,
                     keep_native_fp4: bool, shard_size: str, workers: int | None, overwrite: bool,
                     plan_only: bool, sync_every: str, device: str | None, kernel: str | None) -> None:
    """Quantize a DeepSeek checkpoint to FP4, streaming, resumable.

    Reads the release as published (FP8 blocks, V4 MXFP4 experts), writes OUT.partial/ and renames it
    to OUT when complete. A killed run restarted with the same command resumes where it stopped and
    produces byte-identical output.
    """
    from v4convert.formats.native import Kernel

    from .checkpoint import Checkpoint
    from .engine import OutputExistsError, execute
    from .quantize import MXRule, Options, ScaleChoice, make_plan
    from .recipes import RuleSet, preset

    if out.exists() and not overwrite:   # fail before reading any header
        raise OutputExistsError(f"{out}: output directory exists; pass --overwrite to replace it")
    rname = recipe or ("nvfp4-experts" if scheme == "nvfp4" else "mxfp4-experts")
    container = Container(fmt) if fmt else Container.COMPRESSED_TENSORS
    if plot and calib is None:
        from .calib.method import MethodError
        raise MethodError("--plot draws the calibration coverage; it needs --calib")
    if plot:
        from .verify import require_matplotlib
        require_matplotlib()              # fail before any work
    spec, copts, data = _calibration_options(ckpt, out, scale_method, method, calib, calib_tokens, calib_seq_len,
                                             propagate, calib_all_experts, min_expert_tokens, gptq_damp,
                                             gptq_act_order, gptq_scales)
    opts = Options(container=container, scale_method=ScaleChoice(spec.base.value), mx_rule=MXRule(mx_rule),
                   keep_native_fp4=keep_native_fp4, shard_bytes=_parse_size(shard_size), calib=copts)
    rules = RuleSet(preset(rname), keep=keep, overrides=override)
    with Checkpoint.open(ckpt) as ck:
        plan = make_plan(ck, rules, opts)
    click.echo(plan.summary(), err=True)
    if plan_only:
        return
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # default: one in-process worker feeds a CUDA device; on CPU one process per core
    n_workers = workers or (1 if device.startswith("cuda") else (os.cpu_count() or 1))
    extra = {}
    if copts is not None:
        import json

        from .calib.run import REPORT_NAME, run_calibration
        report = run_calibration(plan, data, copts, progress=sys.stderr.isatty(),
                                 log=lambda m: click.echo(m, err=True))
        extra[REPORT_NAME] = json.dumps(report, indent=1) + "\n"
        if plot and report["coverage"]:
            from .calib.run import coverage_png
            extra["calibration-coverage.png"] = coverage_png({int(k): v for k, v in report["coverage"].items()},
                                                             copts.min_expert_tokens, ckpt.name)
    r = execute(plan, out, workers=n_workers, overwrite=overwrite, progress=sys.stderr.isatty(),
                sync_bytes=_parse_size(sync_every), device=device,
                kernel=Kernel(kernel) if kernel else None, extra_files=extra)
    if copts is not None:
        Path(copts.stats).unlink(missing_ok=True)
    extra = f", mxfp4->nvfp4 inexact blocks {r.repack_inexact}/{r.repack_blocks}" if r.repack_blocks else ""
    click.echo(f"wrote {r.bytes_out:,} bytes in {len(plan.shards)} shard(s) to {r.out}"
               f" ({r.resumed_units} of {r.units} units resumed{extra})")


def _calibration_options(ckpt: Path, out: Path, scale_method, method, calib, tokens, seq_len, propagate,
                         all_experts, min_expert_tokens, damp, act_order, scales):
    """(MethodSpec, CalibOptions or None, CalibData or None) from the command line; user errors raise."""
    from .calib.method import MethodError, MethodSpec
    if method is not None and scale_method is not None:
        raise MethodError("--scale-method is an alias of --method; give one of them")
    if method is None:
        method = scale_method or ("gptq" if calib is not None else "rtn")
    spec = MethodSpec.parse(method)
    if not spec.needs_data:
        if calib is not None:
            raise MethodError(f"--method {method} is data-free; --calib needs gptq or awq in --method")
        return spec, None, None
    if calib is None:
        raise MethodError(f"--method {method} needs calibration data: add --calib [PATH]")
    if min_expert_tokens < 0 or damp <= 0:
        raise MethodError("--min-expert-tokens must be >= 0 and --gptq-damp > 0")
    from .calib.apply import CalibOptions
    from .calib.data import calibration_windows
    data = calibration_windows(ckpt, Path(calib) if calib else None, tokens, seq_len)
    copts = CalibOptions(method=spec.label, stats=str(out.with_name(out.name + ".calib-stats.safetensors")),
                         data_sha256=data.sha256, tokens=data.n_tokens, seq_len=seq_len,
                         propagate=propagate == "quantized", all_experts=all_experts,
                         min_expert_tokens=min_expert_tokens, gptq_damp=damp, gptq_act_order=act_order,
                         gptq_scales_during=scales == "during")
    return spec, copts, data
