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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:                       # the heavy modules are imported on use
    import torch

    from .artifacts import ArtifactKind
    from .formats.containers import Container
    from .kernels.native import Kernel
    from .quant.engine import RunResult
    from .quant.plan import Plan
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
    scale_method: str = "rtn"                   # rtn | mse | four-over-six
    mx_rule: str = "floor"                      # floor | round-up
    keep_native_fp4: bool = False
    shard_bytes: int = 5 * 10**9
    workers: int | None = None
    overwrite: bool = False
    plan_only: bool = False
    sync_bytes: int = 10**9
    device: str | None = None
    kernel: "Kernel | str | None" = None
    progress: bool = False
    on_plan: Callable[["Plan"], None] | None = field(default=None, repr=False)   # called before any work


def quantize(a: QuantizeArgs) -> "RunResult | None":
    """Plan (headers only), then stream the quantization into ``a.out``; None with ``plan_only``."""
    from .checkpoint import Checkpoint
    from .formats.containers import Container
    from .kernels.native import Kernel
    from .quant.engine import OutputExistsError, execute
    from .quant.plan import MXRule, Options, ScaleChoice, make_plan
    from .quant.recipes import RuleSet, preset

    src, out = Path(a.src), Path(a.out)
    if out.exists() and not a.overwrite:   # fail before reading any header
        raise OutputExistsError(f"{out}: output directory exists; pass --overwrite to replace it")
    rname = a.recipe or ("nvfp4-experts" if a.scheme == "nvfp4" else "mxfp4-experts")
    container = Container(a.container) if a.container else Container.COMPRESSED_TENSORS
    opts = Options(container=container, scale_method=ScaleChoice(a.scale_method), mx_rule=MXRule(a.mx_rule),
                   keep_native_fp4=a.keep_native_fp4, shard_bytes=a.shard_bytes)
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
    # default: one in-process worker feeds a CUDA device; on CPU one process per core
    n_workers = a.workers or (1 if device.startswith("cuda") else (os.cpu_count() or 1))
    return execute(plan, out, workers=n_workers, overwrite=a.overwrite, progress=a.progress,
                   sync_bytes=a.sync_bytes, device=device, kernel=Kernel(a.kernel) if a.kernel else None)


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


def export(a: ExportArgs):
    """Run the registered exporter ``a.format``; returns its ``v4convert.export.ExportResult``."""
    from .export import export as run_exporter
    return run_exporter(a.format, a.src, a.out, a.options, progress=a.progress)


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


def verify(a: VerifyArgs) -> dict:
    """Compare the artifact with the reference on the same held-out windows; returns the report dict."""
    import torch

    from .verify import Thresholds, verify as run_verify
    return run_verify(Path(a.ref), Path(a.artifact), opts=a.opts, data=a.data,
                      thresholds=a.thresholds or Thresholds(), save_ref=a.save_ref, ref_cache=a.ref_cache,
                      art_kind=a.kind, device=a.device, dtype=a.dtype or torch.float32, progress=a.progress)


# ------------------------------------------------------------------------------------------------ inspect, synth
@dataclass
class InspectArgs:
    path: str | Path                            # a checkpoint directory or a bare config.json


def inspect(a: InspectArgs) -> dict:
    """What a checkpoint holds and what each output would weigh (JSON-able report)."""
    from .inspect import build_report
    return build_report(Path(a.path))


@dataclass
class SynthArgs:
    preset: str
    out: str | Path
    seed: int = 0
    layers: str | None = None
    shard_size: int | None = None
    with_embed: bool | None = None
    progress: bool = False


def synth(a: SynthArgs) -> "SynthResult":
    """Write a synthetic checkpoint in the exact published layout of ``a.preset``."""
    from .synth import synth as run_synth
    return run_synth(a.preset, Path(a.out), seed=a.seed, layers=a.layers, shard_size=a.shard_size,
                     with_embed=a.with_embed, progress=a.progress)
