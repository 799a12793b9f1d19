"""Quantization methods behind one protocol: a method turns one float weight chunk into an FP4 tensor.

A method may use per-tensor side inputs (``SideInputs``: activation statistics, a Hessian) that a calibration
pass (``v4convert.calib``) computes; the calibration-free methods ignore them. Rows are independent in every
method here (scales are per 16 along K; the global scale comes in as ``global_amax``), so the workers hand a
method row chunks ``[r, K]`` of a tensor; a method that needs the whole tensor says so with ``whole_tensor``.

Registry: ``METHODS`` (one row per method, keyed by quantize's ``--scale-method`` value). A new method = its module
here + one row + its tests. Implementations: ``codec`` (rtn, mse, four-over-six: the codec's scale rules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from v4convert.formats.nvfp4 import NVFP4Convention, NVFP4Tensor, ScaleMethod

from .codec import FOUR_OVER_SIX, MSE, RTN


@dataclass(frozen=True)
class SideInputs:
    """Per-tensor inputs a method may use (None: not computed)."""
    act_absmax: torch.Tensor | None = None     # float32 [K]: max |activation| per input channel
    hessian: torch.Tensor | None = None        # float32 [K, K]: sum of x x^T over the calibration tokens


class Method(Protocol):
    name: str                 # the --scale-method value
    fp8_hot_path: bool        # the FP8 -> NVFP4 fused path (workers) computes exactly this method
    whole_tensor: bool        # needs all rows at once (False: row chunks are fine)

    def nvfp4(self, x: torch.Tensor, *, convention: NVFP4Convention, global_amax: torch.Tensor | float | None,
              name: str, side: SideInputs | None = None) -> NVFP4Tensor:
        """float ``[r, K]`` -> NVFP4 (E2M1 codes, E4M3 scale per 16, FP32 global scale from ``global_amax``)."""


METHODS: dict[ScaleMethod, Method] = {m.method: m for m in (RTN, MSE, FOUR_OVER_SIX)}


def get(method: ScaleMethod) -> Method:
    return METHODS[method]
