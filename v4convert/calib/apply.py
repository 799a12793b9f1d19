"""Calibrated quantize: the statistics file, the pass that writes it, and the worker side that reads it.

Statistics file (safetensors, never pickle): per calibrated linear ``NAME:h`` float32 ``[K, K]``
(``X^T X / n``), ``NAME:amax`` float32 ``[1]`` (max |x|), ``NAME:count`` int64 ``[1]``, with ``--gptq-target original`` also ``NAME:c`` float32 ``[K, K]`` (``Xo^T X / n``,
original x quantized-model inputs); metadata ``calib`` =
the JSON of the :class:`CalibOptions` it was made with, ``coverage`` = routed tokens per MoE layer x expert.
Linears without a record (never called, or an expert below ``--min-expert-tokens``) get the data-free base.
The quantize workers read one record per tensor (``safe_open``, memory bounded by that tensor), so bytes
depend only on the plan, the weights and this file: a resumed run reuses the file and is byte-identical.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from v4convert.formats.mxfp4 import MXScaleRule
from v4convert.formats.nvfp4 import NVFP4Convention

from v4convert.formats.fp4_grid import FP4Codec
from . import DEFAULT_GPTQ_DAMP
from .method import GPTQSettings, MethodSpec, quantize_weight


@dataclass(frozen=True)
class CalibOptions:
    """Everything about calibration that changes output bytes (primitives only: part of the plan fingerprint)."""
    method: str = "gptq"              # MethodSpec label
    stats: str = ""                   # statistics file path
    data_sha256: str = ""             # of the calibration token ids
    tokens: int = 0
    seq_len: int = 0
    propagate: bool = True
    all_experts: bool = False
    min_expert_tokens: int = 16
    gptq_damp: float = DEFAULT_GPTQ_DAMP
    gptq_act_order: bool = False
    gptq_scales_during: bool = False
    gptq_scales_search: bool = False
    gptq_refine: int = 0              # coordinate-descent sweeps after GPTQ
    gptq_target: str = "quantized"    # quantized | original (GPTQ aims at the original model's outputs: NAME:c)
    true_sequential: bool = False     # staged statistics inside a block (calib.collect SEQUENTIAL_STAGES)
    activations: str = "w4a16"        # w4a16 | w4a4 (static input scales from the stats' amax)

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec.parse(self.method)

    @property
    def gptq(self) -> GPTQSettings:
        return GPTQSettings(self.gptq_damp, self.gptq_act_order, self.gptq_scales_during, self.gptq_scales_search,
                            self.gptq_refine)

    def write_unit(self, unit, ts, w, opts) -> None:
        """``quant.workers`` hook: see :func:`write_calibrated`."""
        write_calibrated(unit, ts, w, opts)

    def input_amax(self, names: list[str]) -> dict[str, float]:
        """``quant.engine`` hook (W4A4): the shared activation amax of each NVFP4 linear (``calib.activations``)."""
        from .activations import read_input_amax
        return read_input_amax(self.stats, names)

    def key(self) -> str:
        d = asdict(self)
        d.pop("stats")
        for f in ("gptq_scales_search", "gptq_refine"):   # added later: keys (fingerprints) of runs without them
            if not d[f]:                                   # stay the same
                d.pop(f)
        if d["gptq_target"] == "quantized":
            d.pop("gptq_target")
        if not d["true_sequential"]:
            d.pop("true_sequential")
        return json.dumps(d, sort_keys=True)


def _conv(container_value: str) -> NVFP4Convention:
    return NVFP4Convention.MODELOPT if container_value == "modelopt" else NVFP4Convention.COMPRESSED_TENSORS


def load_record(path: str | Path, name: str) -> tuple[torch.Tensor, float, int] | None:
    """(h, amax, count) of ``name`` or None."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        if f"{name}:h" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
            return None
        return f.get_tensor(f"{name}:h"), float(f.get_tensor(f"{name}:amax")[0]), int(f.get_tensor(f"{name}:count")[0])


def load_cross(path: str | Path, name: str) -> torch.Tensor | None:
    """``NAME:c`` (``Xo^T X / n``, float32 ``[K, K]``) or None."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(f"{name}:c") if f"{name}:c" in f.keys() else None  # noqa: SIM118


def read_meta(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def record_tensors(stats: dict, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The file's records of ``stats`` (name -> ``LinearStats``), names in ``skip`` left out: ``NAME:h`` float32
    ``[K, K]``, ``NAME:amax`` float32 ``[1]``, ``NAME:count`` int64 ``[1]`` (the module docstring's layout)."""
    out: dict[str, torch.Tensor] = {}
    for n, s in sorted(stats.items()):
        if n in skip:
            continue
        out[f"{n}:h"] = s.hessian().contiguous()
        out[f"{n}:amax"] = torch.tensor([s.amax], dtype=torch.float32)
        out[f"{n}:count"] = torch.tensor([s.count], dtype=torch.int64)
        if s.xc is not None:
            out[f"{n}:c"] = s.cross().contiguous()
    return out


def save_stats(path: Path, collected, opts: CalibOptions, min_tokens_for: dict[str, int],
               extra: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write the statistics file atomically (tmp + rename); returns the names left to the data-free base
    because they saw fewer than ``min_tokens_for[name]`` tokens. ``extra``: more entries (W4A4 ``NAME:act_amax``)."""
    from safetensors.torch import save_file
    dropped = sorted(n for n, s in collected.stats.items() if s.count < min_tokens_for.get(n, 1))
    out = {**(extra or {}), **record_tensors(collected.stats, skip=set(dropped))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"calib": opts.key(), "coverage": json.dumps(collected.coverage),
                                       "tokens": str(collected.tokens), "dropped": json.dumps(dropped)})
    os.replace(tmp, path)
    return dropped


def codec_of(action_value: str) -> FP4Codec:
    return FP4Codec.MXFP4 if action_value == "-> mxfp4" else FP4Codec.NVFP4


def quantize_tensor(opts: CalibOptions, codec: FP4Codec, w: torch.Tensor, name: str, *, container: str,
                    global_amax: torch.Tensor | None, mx_rule: MXScaleRule, h: torch.Tensor | None = None):
    """One weight, calibrated when the statistics have a record for it (``h`` given or read from the file)."""
    if h is None:
        rec = load_record(opts.stats, name)
        h = rec[0] if rec is not None else None
    c = load_cross(opts.stats, name) if h is not None and opts.gptq_target == "original" else None
    return quantize_weight(opts.spec, codec, w, h, convention=_conv(container), global_amax=global_amax,
                           mx_rule=mx_rule, gptq=opts.gptq, name=name, c=c)


def write_calibrated(unit, ts, w, opts) -> None:
    """Worker side (``workers._to_nvfp4`` / ``_to_mxfp4`` when ``opts.calib`` is set): decode each tensor of the
    unit (fused partners share the NVFP4 global amax), quantize it with the calibrated method, write the
    codec's parts at the plan's offsets. Memory: the unit's weights in float32."""
    from v4convert.formats.containers import Part
    from v4convert.quant.workers import _decode_chunk, _out, _scale_f32, read_rows

    rule = opts.mx_rule                       # quant.plan.MXRule is formats' MXScaleRule
    dense = {}
    for t in ts:
        s = _scale_f32(t, read_rows(t.src["scale"])) if "scale" in t.src else None
        dense[t.name] = _decode_chunk(t, 0, t.shape[0], s)
    from v4convert.formats.nvfp4 import checked_amax
    shared = torch.stack([checked_amax(x, f"tensor {n}") for n, x in dense.items()]).amax()
    for t in ts:
        codec = codec_of(t.action.value)
        q = quantize_tensor(opts.calib, codec, dense[t.name], t.name, container=opts.container.value,
                            global_amax=shared if codec is FP4Codec.NVFP4 else None, mx_rule=rule)
        woff, _ = _out(unit, t, Part.WEIGHT)
        soff, _ = _out(unit, t, Part.SCALE)
        w.write(woff, q.packed.contiguous(), t.name)
        if codec is FP4Codec.NVFP4:
            w.write(soff, q.block_scale.contiguous().view(torch.uint8), t.name)
            goff, _ = _out(unit, t, Part.GLOBAL_SCALE)
            w.write(goff, q.global_scale.to(torch.float32).reshape(1), t.name)
        else:
            w.write(soff, q.scale.contiguous(), t.name)
