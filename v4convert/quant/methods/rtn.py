"""Round-to-nearest: each 16-block's scale from its amax (the NVFP4 reference rule)."""
from __future__ import annotations

import torch

from v4convert.formats.nvfp4 import NVFP4Convention, NVFP4Tensor, ScaleMethod, nvfp4_quantize


class RTN:
    method = ScaleMethod.RTN
    name = method.value
    fp8_hot_path = True       # workers' fused FP8 path is RTN bit for bit (tests/test_native_codec.py)
    whole_tensor = False

    def nvfp4(self, x: torch.Tensor, *, convention: NVFP4Convention, global_amax: torch.Tensor | float | None,
              name: str, side=None) -> NVFP4Tensor:
        return nvfp4_quantize(x, convention=convention, method=self.method, global_amax=global_amax, name=name)
