"""W4A4 (``quantize --activations w4a4``): static per-tensor activation scales from the calibration pass.

The statistics pass (``collect.collect_stats``) records ``amax = max|x|`` of every calibrated linear's inputs. For
W4A4 every NVFP4 output linear stores one static input scale derived from it (compressed-tensors
``input_global_scale = 448*6/amax``, ModelOpt ``input_scale = amax/(6*448)``; written by ``quant.engine``), and the
container config declares quantized input activations (``formats.containers``). MXFP4 W4A4 is dynamic per 32-block
(compressed-tensors' MXFP4 preset): config only, no tensor.

Linears that the serving engine runs as one module share one amax (the max over the members), so that every
kernel path sees one consistent value:

* fused partners of one work unit (gate+up of an MLP / shared expert / routed expert; q_a+kv_a where vLLM fuses
  them as ``fused_qkv_a_proj``): the plan already groups them into one unit;
* all routed experts of one MoE layer, per projection: gate+up (vLLM's ``w13``) and down (``w2``). vLLM's fused
  MoE reads one input scale per expert and reduces them (FlashInfer TRT-LLM: the min of ``input_global_scale``
  over all experts; CUTLASS: per expert); the same value for every expert makes all paths agree. Experts that
  saw no calibration token get the layer's value.

A group none of whose members the calibration forward ever ran (MTP blocks, V3's absorbed ``kv_b_proj``) has no
activation statistics: that is an error naming the linear (choice documented in runtime/DEVIATIONS.md) — keep
it as stored with ``--keep`` or quantize weight-only.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from v4convert.errors import UserError
from v4convert.families.roles import Role

ACTIVATIONS = ("w4a16", "w4a4")
NVFP4_ACTIONS = ("-> nvfp4", "mxfp4 -> nvfp4 (re-pack)")     # quant.plan.Action values with an NVFP4 output
REPACK_ACTION = "mxfp4 -> nvfp4 (re-pack)"
_W13 = (Role.EXPERT_GATE, Role.EXPERT_UP)
AMAX_SUFFIX = ":act_amax"          # statistics-file entry: float32 [1], the group's shared activation amax


class ActivationsError(UserError):
    """A ``--activations`` request that cannot be carried out."""


def check_request(activations: str, calib: bool, container: str) -> None:
    """Exit-2 errors before any work: W4A4 needs calibration data and a container with a place for the scales."""
    if activations not in ACTIVATIONS:
        raise ActivationsError(f"--activations {activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    if activations == "w4a16":
        return
    if not calib:
        raise ActivationsError("--activations w4a4 needs static activation scales from calibration: add --calib [PATH]")
    if container == "deepseek":
        raise ActivationsError("--activations w4a4: the DeepSeek container has no place for activation scales; use "
                               "--format compressed-tensors or modelopt")


def _group_keys(plan, ck) -> dict[str, tuple]:
    """NVFP4 output linear -> key of the group sharing its input scale (see the module docstring)."""
    keys: dict[str, tuple] = {}
    for u in plan.units:
        for t in u.tensors:
            if t.action.value not in NVFP4_ACTIONS:
                continue
            info = ck.tensor_info(t.name)
            if info.expert is not None:
                keys[t.name] = ("experts", info.layer, info.mtp, "w13" if t.role in _W13 else t.role.value)
            else:
                keys[t.name] = ("unit", u.index)
    return keys


def _keep_hint(name: str, ck) -> str:
    info = ck.tensor_info(name)
    if info.mtp and info.layer is not None:
        return f"--keep '{name.split('layers.')[0]}layers.{info.layer}.*'"
    import re
    return "--keep '" + re.sub(r"\.\d+\.", ".*.", name) + "'"      # every layer's (and expert's) copy


def input_amax_table(plan, amax: dict[str, float]) -> dict[str, float]:
    """Every NVFP4 output linear of ``plan`` -> its group's shared activation amax, from ``amax`` (the calibration's
    per-linear ``max|x|``, only linears that saw tokens). Raises :class:`ActivationsError` naming a linear whose
    whole group was never run by the calibration forward."""
    from v4convert.checkpoint import Checkpoint
    with Checkpoint.open(plan.source) as ck:
        keys = _group_keys(plan, ck)
        members: dict[tuple, list[str]] = defaultdict(list)
        for n, k in keys.items():
            members[k].append(n)
        out: dict[str, float] = {}
        for k, names in members.items():
            seen = [amax[n] for n in names if n in amax]
            if not seen:
                n = sorted(names)[0]
                raise ActivationsError(
                    f"--activations w4a4: tensor {n} was never run by the calibration forward (MTP block or absorbed "
                    f"attention projection), so it has no activation scale; keep it as stored ({_keep_hint(n, ck)}) "
                    f"or quantize weight-only (--activations w4a16)")
            for n in names:
                out[n] = max(seen)
    return out


def amax_tensors(table: dict[str, float]) -> dict[str, torch.Tensor]:
    """Statistics-file entries ``NAME:act_amax`` float32 ``[1]``."""
    return {n + AMAX_SUFFIX: torch.tensor([v], dtype=torch.float32) for n, v in table.items()}


def read_input_amax(path: str, names: list[str]) -> dict[str, float]:
    """``NAME:act_amax`` of ``names`` from the statistics file (the engine turns them into input scales)."""
    from safetensors import safe_open
    out: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for n in names:
            if n + AMAX_SUFFIX not in keys:
                raise ActivationsError(f"{path}: no activation amax for tensor {n} (statistics made for another plan?); "
                                       f"delete the file and rerun")
            out[n] = float(f.get_tensor(n + AMAX_SUFFIX)[0])
    return out
