"""W4A4 activation fake-quant: what a serving engine does to a linear's input before an FP4 x FP4 GEMM.

* NVFP4 (static global scale ``g`` = compressed-tensors ``input_global_scale`` = 448*6/act_amax, or ``1/input_scale``
  for ModelOpt, as vLLM's ``ModelOptNvFp4LinearMethod`` inverts it): per 16-block along K the E4M3 block scale
  ``s = e4m3(g * (amax_blk / 6))`` is computed on the fly, values ``e2m1(x / (s / g))`` (clamped to +-6, round to
  nearest even), result ``e2m1 * (s / g)``. Operation order of compressed-tensors ``forward_quantize`` for its
  NVFP4 preset (``calculate_qparams`` + ``_quantize_dequantize``); vLLM's reference ``ref_nvfp4_quant`` and its
  CUDA ``scaled_fp4_quant`` are the same numbers up to the last bit of ``x * (g / s)`` vs ``x / (s / g)`` (an FP4
  rounding decision differs only when a value lands within one float32 ulp of a rounding bound).
  An all-zero block gets the scale 0.125 (c-t's E4M3 epsilon) and stays zero.
* MXFP4 (dynamic, c-t's MXFP4 preset): per 32-block the exponent byte ``e = 127 + floor(log2(p2(amax))) - 2``
  where ``p2`` rounds amax to a power of two *up* when its mantissa is >= 1.75 (``round_to_power_2``: add 1 << 21 to
  the float32 bits, keep sign+exponent), clamped to [0, 255]; scale ``2**(e-127)``; values ``e2m1(x / scale) *
  scale``.

``ActQuant`` is set on a ``common.Linear`` (``.act_quant``) by :func:`plan_for` when the checkpoint's config declares
quantized 4-bit input activations; ``runtime.load(act_quant=False)`` turns it off. Inputs are computed in float32
and returned in the input dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from v4convert.formats.blocks import MXFP4_BLOCK, NVFP4_BLOCK
from v4convert.formats.fp4 import E2M1_MAX, e2m1_lut, e2m1_magnitude_index
from v4convert.formats.fp8 import E4M3_MAX

from .common import RuntimeLoadError

_CT_E4M3_EPS = 0.125          # compressed-tensors _get_dtype_eps(float8_e4m3fn): replaces a zero block scale
_F32_EXP_ROUND = 1 << 21      # float32 mantissa 23 bits, E2M1 mantissa 1: 1 << (23 - 1 - 1)
_F32_SIGN_EXP = ((1 << 9) - 1) << 23


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Float values (already scaled, clamped to +-6) -> the nearest E2M1 value (ties to even), same dtype."""
    return torch.copysign(e2m1_lut(x.dtype, x.device)[e2m1_magnitude_index(x).long()], x)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    k = x.shape[-1]
    if k % block:
        raise RuntimeLoadError(f"FP4 activation quant needs the input width ({k}) to be a multiple of {block}")
    return x.float().unflatten(-1, (k // block, block))


def nvfp4_fake_quant(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> NVFP4 quantize-dequantize with the static c-t-form ``global_scale`` (float32 scalar)."""
    g = global_scale.to(device=x.device, dtype=torch.float32).reshape(())
    xb = _blocks(x, NVFP4_BLOCK)                                        # [..., K/16, 16]
    s = g * (xb.abs().amax(-1) / E2M1_MAX)                              # [..., K/16]
    s = s.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, _CT_E4M3_EPS), s)
    eff = (s / g)[..., None]
    q = round_e2m1((xb / eff).clamp(-E2M1_MAX, E2M1_MAX))
    return (q * eff).flatten(-2).to(x.dtype)


def mxfp4_scales(block_amax: torch.Tensor) -> torch.Tensor:
    """float32 per-block amax -> float32 power-of-two scales (compressed-tensors ``generate_mx_scales``)."""
    bits = block_amax.float().contiguous().view(torch.int32)
    p2 = ((bits + _F32_EXP_ROUND) & _F32_SIGN_EXP).view(torch.float32)
    e = 127 + torch.floor(torch.log2(p2)) - 2
    e = torch.round(e.clamp(0, 255)).to(torch.uint8)
    s = 2.0 ** (e.to(torch.int32) - 127).float()
    return torch.where(s == 0, torch.ones_like(s), s)


def mxfp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> MXFP4 quantize-dequantize with dynamic E8M0 scales per 32-block."""
    xb = _blocks(x, MXFP4_BLOCK)
    s = mxfp4_scales(xb.abs().amax(-1))[..., None]
    q = round_e2m1((xb / s).clamp(-E2M1_MAX, E2M1_MAX))
    return (q * s).flatten(-2).to(x.dtype)


@dataclass(frozen=True)
class ActQuant:
    """One linear's input quantizer: ``kind`` "nvfp4" (static ``global_scale``, c-t form) or "mxfp4" (dynamic)."""
    kind: str
    global_scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        if self.kind == "nvfp4":
            return nvfp4_fake_quant(x, self.global_scale)
        return mxfp4_fake_quant(x)


# ---------------------------------------------------------------------------------------------- config -> linears
def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or module == target or module.endswith("." + target)


def _fp4_input_args(args: dict | None) -> str | None:
    """'nvfp4' / 'mxfp4' for 4-bit float ``input_activations`` we simulate, None for none; raises otherwise."""
    if not args or args.get("num_bits") != 4:
        return None
    if args.get("type") != "float":
        raise RuntimeLoadError(f"input_activations {args}: only 4-bit float (NVFP4 / MXFP4) is simulated")
    if args.get("strategy") == "tensor_group" and args.get("group_size") == NVFP4_BLOCK and args.get("dynamic") == "local":
        return "nvfp4"
    if args.get("strategy") == "group" and args.get("group_size") == MXFP4_BLOCK and args.get("dynamic") is True:
        return "mxfp4"
    raise RuntimeLoadError(f"input_activations {args}: unsupported FP4 activation scheme (NVFP4 tensor_group/16 "
                           f"dynamic 'local' or MXFP4 group/32 dynamic)")


def _static(ck, name: str, modelopt: bool) -> ActQuant:
    parts = ck.raw(name)
    if "input_scale" not in parts:
        stem = name[: -len(".weight")]
        raise RuntimeLoadError(f"{stem}: the config declares static NVFP4 input activations but the checkpoint has no "
                               f"{stem}.{'input_scale' if modelopt else 'input_global_scale'}")
    v = parts["input_scale"].to(torch.float32).reshape(()).clone()
    return ActQuant("nvfp4", (1.0 / v) if modelopt else v)


def plan_for(ck) -> dict[str, ActQuant]:
    """Checkpoint tensor name (``....weight`` of an FP4 linear) -> its input quantizer, from the config's
    ``quantization_config`` (compressed-tensors ``config_groups[*].input_activations``; ModelOpt ``quant_algo:
    NVFP4``). Empty when the config declares no 4-bit activations (W4A16, FP8, unquantized)."""
    qc = ck.config.get("quantization_config") or {}
    fp4 = [i for i in ck.infos() if i.storage.value in ("nvfp4_ct", "nvfp4_modelopt", "mxfp4") and len(i.shape) == 2]
    out: dict[str, ActQuant] = {}
    if qc.get("quant_method") == "modelopt":
        if qc.get("quant_algo") == "NVFP4":
            for i in fp4:
                if i.storage.value == "nvfp4_modelopt":
                    out[i.name] = _static(ck, i.name, modelopt=True)
        return out
    if qc.get("quant_method") != "compressed-tensors":
        return out
    ignore = qc.get("ignore") or []
    for g in (qc.get("config_groups") or {}).values():
        kind = _fp4_input_args(g.get("input_activations"))
        if kind is None:
            continue
        for i in fp4:
            mod = i.name[: -len(".weight")]
            if i.name in out or not any(_matches(mod, t) for t in g.get("targets") or []) \
                    or any(_matches(mod, t) for t in ignore if t != "Linear"):
                continue
            if (kind == "nvfp4") != (i.storage.value == "nvfp4_ct"):
                raise RuntimeLoadError(f"{mod}: stored as {i.storage.value} but its config group declares {kind} "
                                       f"input activations")
            out[i.name] = _static(ck, i.name, modelopt=False) if kind == "nvfp4" else ActQuant("mxfp4")
    return out
