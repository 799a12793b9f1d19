"""Drive a calibrated quantize: statistics pass over the plan's FP4 targets -> statistics file -> report.

``run_calibration(plan, data, copts)`` is called by ``quantize`` between planning and execution. It reuses an
existing statistics file made with the same settings (a resumed run), otherwise runs
``collect.collect_stats`` with the method itself as the propagation quantizer, writes the file, prints the
expert-coverage table and warns about experts left to the data-free base.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


from .apply import CalibOptions, _conv, codec_of, read_meta, save_stats
from .collect import collect_stats
from .data import CalibData
from .saved import SavedPass, load_collected, open_pass
from v4convert.formats.fp4_grid import FP4Codec
from .method import quantize_weight

CALIB_ACTIONS = ("-> nvfp4", "-> mxfp4")
REPORT_NAME = "calibration.json"


def coverage_table(coverage: dict[int, list[int]], min_tokens: int) -> str:
    """Routed tokens per MoE layer: min / median / max over experts and the experts below ``min_tokens``."""
    lines = [f"expert coverage (routed calibration tokens; < {min_tokens} -> data-free fallback)",
             f"  {'layer':>5} {'experts':>7} {'min':>7} {'median':>7} {'max':>7} {'below':>6}"]
    for layer, counts in sorted(coverage.items()):
        c = sorted(counts)
        below = sum(1 for x in c if x < min_tokens)
        lines.append(f"  {layer:>5} {len(c):>7} {c[0]:>7} {c[len(c) // 2]:>7} {c[-1]:>7} {below:>6}")
    return "\n".join(lines)


def coverage_png(coverage: dict[int, list[int]], min_tokens: int, title: str) -> bytes:
    """Heat-map PNG (layers x experts, routed calibration tokens; experts below ``min_tokens`` outlined)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(coverage)
    grid = [coverage[k] for k in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(grid[0]) + 2), 0.45 * len(layers) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for r, row in enumerate(grid):
        for e, c in enumerate(row):
            if c < min_tokens:
                ax.add_patch(plt.Rectangle((e - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_yticks(range(len(layers)), [str(k) for k in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{title}: routed calibration tokens (red: < {min_tokens}, data-free fallback)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run_calibration(plan, data: CalibData | SavedPass, copts: CalibOptions, *, progress: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    """Write ``copts.stats`` (or reuse it) and return the report (also written beside the artifact)."""
    from v4convert.checkpoint import Checkpoint

    from .activations import REPACK_ACTION, amax_tensors, input_amax_table
    path = Path(copts.stats)
    a4 = copts.activations == "w4a4"        # re-packed MXFP4 -> NVFP4 linears need their input amax too (stats only)
    tensors = [t for t in plan.tensors() if t.action.value in CALIB_ACTIONS or (a4 and t.action.value == REPACK_ACTION)]
    with Checkpoint.open(plan.source) as ck:
        expert = {t.name: ck.tensor_info(t.name).expert for t in tensors}
    if path.is_file() and read_meta(path).get("calib") == copts.key():
        log(f"calibration: reusing statistics {path}")
        meta = read_meta(path)
        coverage = {int(k): v for k, v in json.loads(meta["coverage"]).items()}
        dropped = json.loads(meta["dropped"])
    else:
        groups = {}
        for u in plan.units:
            names = [t.name for t in u.tensors]
            for n in names:
                groups[n] = names
        action = {t.name: t.action.value for t in tensors}
        min_for = {n: (copts.min_expert_tokens if e is not None and action[n] in CALIB_ACTIONS else 1)
                   for n, e in expert.items()}
        rule = plan.options.mx_rule           # quant.plan.MXRule is formats' MXScaleRule
        spec, conv = copts.spec, _conv(plan.options.container.value)

        def quantize(name: str, w: torch.Tensor, stats, gamax: torch.Tensor) -> torch.Tensor:
            if action[name] == REPACK_ACTION:     # lossless re-pack: the weights stay what they are
                return w
            codec = codec_of(action[name])
            h = stats.hessian() if stats is not None and stats.count >= min_for[name] else None
            c = stats.cross() if h is not None else None        # --gptq-target original: Xo^T X / n
            q = quantize_weight(spec, codec, w.float(), h, convention=conv, mx_rule=rule, gptq=copts.gptq,
                                global_amax=gamax if codec is FP4Codec.NVFP4 else None, name=name, c=c)
            return q.dequantize()

        if isinstance(data, SavedPass):       # statistics once, many artifacts (calib/saved.py)
            log(f"calibration: reusing the saved pass {data.path} ({data.tokens} tokens x {data.seq_len} from "
                f"{data.source}), method {copts.method}, {len(tensors)} linears")
            col = load_collected(data, [t.name for t in tensors])
        else:
            log(f"calibration: {data.windows.shape[0]} windows x {data.windows.shape[1]} tokens from {data.source}, "
                f"method {copts.method}, {len(tensors)} linears")
            col = collect_stats(plan.source, data, [t.name for t in tensors], quantize=quantize, groups=groups,
                                propagate=copts.propagate, all_experts=copts.all_experts, progress=progress,
                                spill_dir=path.parent, target_original=copts.gptq_target == "original",
                                sequential=copts.true_sequential)
        table = input_amax_table(plan, {n: s.amax for n, s in col.stats.items()}) if a4 else {}
        dropped = save_stats(path, col, copts, min_for, extra=amax_tensors(table))
        coverage = col.coverage
    if coverage:
        log(coverage_table(coverage, copts.min_expert_tokens))
    never = []
    from .apply import load_record
    for t in tensors:
        if t.action.value in CALIB_ACTIONS and t.name not in dropped and load_record(path, t.name) is None:
            never.append(t.name)
    if dropped:
        log(f"warning: {len(dropped)} expert linear(s) saw fewer than {copts.min_expert_tokens} calibration tokens "
            f"and use the data-free base, e.g. {dropped[0]} (more data or --calib-all-experts helps)")
    if never:
        log(f"note: {len(never)} linear(s) are not called by the forward pass (e.g. {never[0]}); data-free base")
    windows = [copts.tokens // copts.seq_len, copts.seq_len] if isinstance(data, SavedPass) else list(data.windows.shape)
    return {"method": copts.method, "source": data.source, "tokens": copts.tokens,
            "windows": windows, "propagate": "quantized" if copts.propagate else "original",
            "all_experts": copts.all_experts, "min_expert_tokens": copts.min_expert_tokens,
            "coverage": {str(k): v for k, v in sorted(coverage.items())}, "fallback_experts": dropped,
            "uncalibrated": never}


def calibration_options(ckpt: Path, out: Path, scale_method: str | None, method: str | None, calib: bool,
                        calib_data: Path | None, tokens: int, seq_len: int, propagate: str, all_experts: bool,
                        min_expert_tokens: int, damp: float, act_order: bool, scales: str,
                        activations: str = "w4a16", container: str = "compressed-tensors",
                        calib_stats: Path | None = None, refine: int = 0, target: str = "quantized",
                        sequential: bool = False):
    """(MethodSpec, CalibOptions or None, CalibData or None) from ``quantize``'s arguments; user errors raise
    ``MethodError`` / ``CalibDataError`` / ``ActivationsError``. ``scale_method`` is the old alias of a data-free
    ``method``. ``activations="w4a4"`` needs ``calib`` and then also allows a data-free method (calibration for the
    activation scales only). ``calib_stats``: a directory of ``calibrate --stats`` to reuse instead of a pass (the
    third value is then its ``SavedPass``; implies ``propagate="original"``). ``target="original"``
    (``--gptq-target``): GPTQ aims at the original model's outputs (needs gptq and ``propagate="quantized"``). ``sequential`` (``--true-sequential``): staged statistics
    inside each block (``calib.collect``; needs ``propagate="quantized"``)."""
    from .activations import check_request
    from .method import MethodError
    if calib_stats is not None:
        if calib:
            raise MethodError("--calib runs a calibration pass and --calib-stats reuses a saved one; give one of them")
        saved = open_pass(calib_stats, ckpt)
        if all_experts and not saved.all_experts:
            raise MethodError(f"--calib-all-experts: the saved pass {calib_stats} was made without it")
        calib, propagate, all_experts = True, "original", saved.all_experts
    check_request(activations, calib, container)
    a4 = activations == "w4a4"
    from .apply import CalibOptions
    from .data import calibration_windows
    from .method import MethodSpec
    if method is not None and scale_method is not None:
        raise MethodError("--scale-method is an alias of --method; give one of them")
    if method is None:
        method = scale_method or ("gptq" if calib else "rtn")
    spec = MethodSpec.parse(method)
    if not spec.needs_data and not a4:
        if calib:
            raise MethodError(f"--method {method} is data-free; --calib needs gptq or awq in --method")
        return spec, None, None
    if not calib:
        raise MethodError(f"--method {method} needs calibration data: add --calib [PATH] (or --calib-stats DIR)")
    if refine and not spec.gptq:
        raise MethodError(f"--gptq-refine polishes GPTQ's result; --method {method} has no gptq")
    if target == "original" and not spec.gptq:
        raise MethodError(f"--gptq-target original moves GPTQ's target; --method {method} has no gptq")
    if target == "original" and (propagate != "quantized" or all_experts):
        raise MethodError("--gptq-target original pairs the quantized stream with the original one: it needs "
                          "--propagate quantized (and no --calib-stats) and does not support --calib-all-experts")
    if sequential and propagate != "quantized":
        raise MethodError("--true-sequential quantizes a block's linears in stages: it needs --propagate quantized "
                          "(and no --calib-stats)")
    if act_order and scales != "before":
        raise MethodError(f"--gptq-act-order needs --gptq-scales before (got {scales}: scales tied to contiguous blocks)")
    if min_expert_tokens < 0 or damp <= 0:
        raise MethodError("--min-expert-tokens must be >= 0 and --gptq-damp > 0")
    if calib_stats is not None:
        data = saved
        sha, n_tokens, seq_len = saved.data_sha256, saved.tokens, saved.seq_len
    else:
        data = calibration_windows(ckpt, calib_data, tokens, seq_len)
        sha, n_tokens = data.sha256, data.n_tokens
    copts = CalibOptions(method=spec.label, stats=str(out.with_name(out.name + ".calib-stats.safetensors")),
                         data_sha256=sha, tokens=n_tokens, seq_len=seq_len,
                         propagate=propagate == "quantized", all_experts=all_experts,
                         min_expert_tokens=min_expert_tokens, gptq_damp=damp, gptq_act_order=act_order,
                         gptq_scales_during=scales == "during", gptq_scales_search=scales == "search",
                         gptq_refine=refine, gptq_target=target, true_sequential=sequential,
                         activations=activations)
    return spec, copts, data
