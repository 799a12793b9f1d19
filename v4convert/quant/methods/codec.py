"""The calibration-free methods: the NVFP4 codec's own per-16-block scale rules (``formats.nvfp4``).

- ``rtn``: each block's scale from its amax (the NVFP4 reference rule);
- ``mse``: the scale among amax x clip ratios with the smallest squared error (the codec's search);
- ``four-over-six``: map the amax to 4 or to 6 on the E2M1 grid, whichever errs less (arXiv 2512.02010).
They ignore side inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4convert.formats.nvfp4 import NVFP4Convention, NVFP4Tensor, ScaleMethod, nvfp4_quantize


@dataclass(frozen=True)
class CodecScaleRule:
    method: ScaleMethod
    fp8_hot_path: bool = False    # the workers' fused FP8 path computes exactly this rule (RTN only: tests/test_native_codec.py)
    whole_tensor: bool = False
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.method.value)

    def nvfp4(self, x: torch.Tensor, *, convention: NVFP4Convention, global_amax: torch.Tensor | float | None,
              name: str, side=None) -> NVFP4Tensor:
        return nvfp4_quantize(x, convention=convention, method=self.method, global_amax=global_amax, name=name)


RTN = CodecScaleRule(ScaleMethod.RTN, fp8_hot_path=True)
MSE = CodecScaleRule(ScaleMethod.MSE)
FOUR_OVER_SIX = CodecScaleRule(ScaleMethod.FOUR_OVER_SIX)
