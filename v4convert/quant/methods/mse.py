"""MSE: per 16-block, the scale among amax x clip ratios with the smallest squared error (codec's search)."""
from __future__ import annotations

import torch

from v4convert.formats.nvfp4 import NVFP4Convention, NVFP4Tensor, ScaleMethod, nvfp4_quantize


class MSE:
    method = ScaleMethod.MSE
    name = method.value
    fp8_hot_path = False
    whole_tensor = False

    def nvfp4(self, x: torch.Tensor, *, convention: NVFP4Convention, global_amax: torch.Tensor | float | None,
              name: str, side=None) -> NVFP4Tensor:
        return nvfp4_quantize(x, convention=convention, method=self.method, global_amax=global_amax, name=name)
