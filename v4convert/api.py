"""The typed Python API: one ``*Args`` dataclass and one function per stage. The CLI and the demo call these.

    from v4convert import api
    r = api.quantize(api.QuantizeArgs(src="DeepSeek-V3", out="V3-NVFP4"))           # -> quant.engine.RunResult
    g = api.export(api.ExportArgs(src="V3-NVFP4", out="v3.gguf", format="gguf"))     # -> export.ExportResult
    rep = api.verify(api.VerifyArgs(ref="DeepSeek-V3", artifact="v3.gguf"))          # -> report dict
    info = api.inspect(api.InspectArgs(path="DeepSeek-V3"))                          # -> report dict
    s = api.synth(api.SynthArgs(preset="v3-tiny", out="tiny"))                       # -> synth.SynthResult

Errors in the user's input raise ``v4convert.errors.UserError`` subclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .calib import DEFAULT_GPTQ_DAMP

if TYPE_CHECKING:                       # the heavy modules are imported on use
    import torch

    from .artifacts import ArtifactKind
    from .formats.containers import Container
    from .kernels.native import Kernel
    from .quant.engine import RunResult
    from .quant.plan import Plan
    from .runtime import DynamicRouting
    from .synth import SynthResult
    from .verify import Thresholds, VerifyOptions


# ------------------------------------------------------------------------------------------------ quantize
@dataclass
class QuantizeArgs:
    """``v4convert quantize``. ``recipe`` None: nvfp4-experts / mxfp4-experts after ``scheme``; ``container``
    None: compressed-tensors; ``device`` None: cuda if present, else cpu; ``workers`` None: 1 on CUDA, else one
    per CPU core; ``kernel`` None: the engine's choice (native C on CPU where it builds)."""
    src: str | Path
    out: str | Path
    scheme: str = "nvfp4"                       # nvfp4 | mxfp4
    recipe: str | None = None                   # quant.recipes.RecipeName value
    container: "Container | str | None" = None
    keep: tuple[str, ...] = ()                  # fnmatch patterns kept as stored
    overrides: tuple[str, ...] = ()             # PATTERN=CODEC
    scale_method: str | None = None             # rtn | mse | four-over-six (None: rtn); alias of a data-free method
    mx_rule: str = "floor"                      # floor | round-up
    keep_native_fp4: bool = False
    keep_bf16: bool = False                     # kept FP8-block linears written as BF16 (compressed-tensors)
    shard_bytes: int = 5 * 10**9
    workers: int | None = None
    overwrite: bool = False
    allow_missing: bool = False                 # write although tensors the config implies are absent
    allow_nonfinite: bool = False               # copy NaN/Inf in tensors kept as stored
    plan_only: bool = False
    sync_bytes: int = 10**9
    device: str | None = None
    kernel: "Kernel | str | None" = None
    progress: bool = False
    on_plan: Callable[["Plan"], None] | None = field(default=None, repr=False)   # called before any work
    # calibration (v4convert.calib): method = data-free base and/or gptq / awq joined by '+'
    method: str | None = None                   # None: gptq with calib, else scale_method / rtn
    calib: bool = False                         # calibrate (needs gptq or awq in method)
    calib_data: Path | None = None              # .txt / .jsonl / directory; None: bundled training split
    calib_stats: Path | None = None             # a `calibrate --stats` directory reused instead of a pass
    calib_tokens: int = 8192
    calib_seq_len: int = 512
    propagate: str = "quantized"                # quantized | original
    calib_all_experts: bool = False
    min_expert_tokens: int = 16
    gptq_damp: float = DEFAULT_GPTQ_DAMP
    gptq_act_order: bool = False
    gptq_scales: str = "before"                 # before | during | search
    gptq_refine: int = 0                        # coordinate-descent sweeps after GPTQ (same scales)
    gptq_target: str = "quantized"              # quantized | original (GPTAQ-style target, calib.collect)
    true_sequential: bool = False               # staged statistics inside a block (calib.collect)
    plot: bool = False                          # calibration-coverage.png beside the artifact
    activations: str = "w4a16"                  # w4a16 | w4a4 (static input scales; needs calib)
    log: Callable[[str], None] | None = field(default=None, repr=False)         # calibration messages


def quantize(a: QuantizeArgs) -> "RunResult | None":
    """Plan (headers only), then stream the quantization into ``a.out``; None with ``plan_only``."""
    from .checkpoint import Checkpoint
    from .formats.containers import Container
    from .kernels.native import Kernel
    from .quant.engine import OutputExistsError, execute
    from .quant.plan import MXRule, Options, ScaleChoice, make_plan
    from .quant.recipes import RuleSet, preset

    from . import outputs
    from .devices import check_device

    src, out = Path(a.src), Path(a.out)
    if a.device is not None:
        check_device(a.device)
    outputs.recover(out)
    try:                                 # the output rule, before reading any header
        outputs.claim(out, sources=[src], overwrite=a.overwrite)
    except outputs.OutputError as e:
        raise OutputExistsError(str(e)) from None
    rname = a.recipe or ("nvfp4-experts" if a.scheme == "nvfp4" else "mxfp4-experts")
    container = Container(a.container) if a.container else Container.COMPRESSED_TENSORS
    from .calib.method import MethodError
    from .calib.run import calibration_options
    if a.plot:
        if not (a.calib or a.calib_stats):
            raise MethodError("--plot draws the calibration coverage; it needs --calib or --calib-stats")
        from .verify.plot import require_matplotlib
        require_matplotlib()              # fail before any work
    spec, copts, data = calibration_options(
        src, out, a.scale_method, a.method, a.calib, Path(a.calib_data) if a.calib_data else None, a.calib_tokens,
        a.calib_seq_len, a.propagate, a.calib_all_experts, a.min_expert_tokens, a.gptq_damp, a.gptq_act_order,
        a.gptq_scales, a.activations, container.value, Path(a.calib_stats) if a.calib_stats else None,
        refine=a.gptq_refine, target=a.gptq_target, sequential=a.true_sequential)
    opts = Options(container=container, scale_method=ScaleChoice(spec.base.value), mx_rule=MXRule(a.mx_rule),
                   keep_native_fp4=a.keep_native_fp4, shard_bytes=a.shard_bytes, keep_bf16=a.keep_bf16,
                   allow_missing=a.allow_missing, allow_nonfinite=a.allow_nonfinite, calib=copts)
    rules = RuleSet(preset(rname), keep=a.keep, overrides=a.overrides)
    with Checkpoint.open(src) as ck:
        plan = make_plan(ck, rules, opts)
    if a.on_plan is not None:
        a.on_plan(plan)
    if a.plan_only:
        return None
    device = a.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # default: one in-process worker feeds a CUDA device; on CPU one process per free core, and an
    # explicit --workers shares the free cores (never oversubscribed: threads.split_threads)
    from .threads import split_threads
    n_workers, per_worker = split_threads(1 if device.startswith("cuda") and a.workers is None else a.workers)
    extra: dict[str, str | bytes] = {}
    if copts is not None:
        import json

        from .calib.run import REPORT_NAME, coverage_png, run_calibration
        report = run_calibration(plan, data, copts, progress=a.progress, log=a.log or print)
        extra[REPORT_NAME] = json.dumps(report, indent=1) + "\n"
        if a.plot and report["coverage"]:
            extra["calibration-coverage.png"] = coverage_png({int(k): v for k, v in report["coverage"].items()},
                                                             copts.min_expert_tokens, src.name)
    r = execute(plan, out, workers=n_workers, threads=per_worker, overwrite=a.overwrite, progress=a.progress,
                sync_bytes=a.sync_bytes, device=device, kernel=Kernel(a.kernel) if a.kernel else None,
                extra_files=extra)
    if copts is not None:
        Path(copts.stats).unlink(missing_ok=True)
    return r


# ------------------------------------------------------------------------------------------------ export
@dataclass
class ExportArgs:
    """``v4convert export``: ``format`` is a name of ``v4convert.export.EXPORTERS``; ``options`` that exporter's
    ``Options`` (None: its defaults)."""
    src: str | Path
    out: str | Path
    format: str = "gguf"
    options: object | None = None
    progress: bool = False
    log: Callable[[str], None] | None = field(default=None, repr=False)   # pre-write lines (GGUF: the type mix)


def export(a: ExportArgs):
    """Run the registered exporter ``a.format``; returns its ``v4convert.export.ExportResult``."""
    from .export import export as run_exporter
    return run_exporter(a.format, a.src, a.out, a.options, progress=a.progress, log=a.log)


# ------------------------------------------------------------------------------------------------ verify
@dataclass
class VerifyArgs:
    """``v4convert verify``: see ``v4convert.verify.verify`` for the report's fields."""
    ref: str | Path
    artifact: str | Path
    opts: "VerifyOptions | None" = None
    data: Path | None = None
    thresholds: "Thresholds | None" = None
    save_ref: Path | None = None
    ref_cache: Path | None = None
    kind: "ArtifactKind | None" = None
    device: str = "cpu"
    dtype: "torch.dtype | None" = None          # None: float32
    progress: Callable[[str, int, int], None] | None = field(default=None, repr=False)
    dynamic_routing: "DynamicRouting | None" = None   # artifact (our runtime) with dynamic expert routing
    act_quant: bool = True      # False: ignore the artifact config's declared 4-bit activations (weights-only)


def verify(a: VerifyArgs) -> dict:
    """Compare the artifact with the reference on the same held-out windows; returns the report dict."""
    import torch

    from .verify import Thresholds, verify as run_verify
    return run_verify(Path(a.ref), Path(a.artifact), opts=a.opts, data=a.data,
                      thresholds=a.thresholds or Thresholds(), save_ref=a.save_ref, ref_cache=a.ref_cache,
                      art_kind=a.kind, device=a.device, dtype=a.dtype or torch.float32, progress=a.progress,
                      dynamic_routing=a.dynamic_routing, act_quant=a.act_quant)


# ------------------------------------------------------------------------------------------------ inspect, synth
@dataclass
class InspectArgs:
    path: str | Path                            # a checkpoint directory or a bare config.json
    memory: str | None = None                   # one memory pool, e.g. "64GB" (binary units): adds memory_fit
    devices: str | None = None                  # N devices, e.g. "2x32GB" (whole layers per device)
    kv_tokens: int = 32768                      # KV cache tokens counted with the weights
    reserve: str = "1GB"                        # per device, for the runtime


def inspect(a: InspectArgs) -> dict:
    """What a checkpoint holds and what each output would weigh (JSON-able report); with ``memory`` or
    ``devices``, whether each output + a KV cache of ``kv_tokens`` fits (``memory_fit``)."""
    from .inspect import build_report
    budget = None
    if a.memory or a.devices:
        from .memfit import Budget, MemorySpecError, parse_devices, parse_size
        if a.memory and a.devices:
            raise MemorySpecError("give --memory or --device, not both")
        n, size = parse_devices(a.devices) if a.devices else (1, parse_size(a.memory))
        budget = Budget(n, size, parse_size(a.reserve))
    return build_report(Path(a.path)) if budget is None else build_report(Path(a.path), budget, a.kv_tokens)


@dataclass
class SynthArgs:
    preset: str
    out: str | Path
    seed: int = 0
    layers: str | None = None
    shard_size: int | None = None
    with_embed: bool | None = None
    progress: bool = False
    overwrite: bool = False


def synth(a: SynthArgs) -> "SynthResult":
    """Write a synthetic checkpoint in the exact published layout of ``a.preset``."""
    from .synth import synth as run_synth
    return run_synth(a.preset, Path(a.out), seed=a.seed, layers=a.layers, shard_size=a.shard_size,
                     with_embed=a.with_embed, progress=a.progress, overwrite=a.overwrite)
