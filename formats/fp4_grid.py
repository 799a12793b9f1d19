"""An FP4 grid with fixed per-block scales: the codecs' own arithmetic, one column (or block) at a time.

GPTQ and the activation-weighted search choose codes (and block scales) themselves, but the bytes they
produce must be exactly what ``formats.nvfp4`` / ``formats.mxfp4`` would write for the same scales, so this
module reuses the codecs' stage functions and operation order:

* NVFP4: ``eff = _effective_scale(ws, gscale, convention)`` per 16-block, codes ``e2m1_encode(x / eff)``
  (an all-zero block divides by 1), value ``E2M1[code] * eff``.
* MXFP4: ``e`` per 32-block, codes ``e2m1_encode(ldexp(x, -e))``, value ``E2M1[code] * 2**e``.

``Grid.encode(x, j0)`` quantizes columns ``j0 .. j0+c-1`` of ``x [N, c]``; ``Grid.tensor(codes)`` packs the
full ``[N, K]`` code matrix into the codec's tensor type (``NVFP4Tensor`` / ``MXFP4Tensor``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .fp4 import E2M1_MAX, e2m1_encode, e2m1_lut, pack_fp4
from .fp8 import E4M3_MAX, E8M0_BIAS
from .mxfp4 import (
    MXFP4_BLOCK,
    MXFP4Tensor,
    MXScaleRule,
    mxfp4_block_exponents,
    mxfp4_quantize,
)
from .nvfp4 import (
    FOUR_OVER_SIX_SCALE_MAX,
    NVFP4_BLOCK,
    NVFP4Convention,
    NVFP4Tensor,
    ScaleMethod,
    _block_scale,
    _effective_scale,
    nvfp4_global_scale,
    nvfp4_quantize,
)


class FP4Codec(enum.Enum):
    NVFP4 = "nvfp4"     # 16-blocks, E4M3 block scales, FP32 global scale
    MXFP4 = "mxfp4"     # 32-blocks, E8M0 block scales


BLOCK = {FP4Codec.NVFP4: NVFP4_BLOCK, FP4Codec.MXFP4: MXFP4_BLOCK}


@dataclass
class Grid:
    """Per-block scales of one ``[N, K]`` weight. NVFP4: ``ws`` float8_e4m3fn ``[N, K/16]`` + ``gscale``
    (0-dim, ``convention``) + ``amax``; MXFP4: ``exp`` int32 unbiased exponents ``[N, K/32]``."""
    codec: FP4Codec
    ws: torch.Tensor | None = None
    gscale: torch.Tensor | None = None
    convention: NVFP4Convention | None = None
    amax: torch.Tensor | None = None
    exp: torch.Tensor | None = None

    @property
    def block(self) -> int:
        return BLOCK[self.codec]

    def eff(self) -> torch.Tensor:
        """float32 ``[N, K/block]``: the multiplier of each block's E2M1 values."""
        if self.codec is FP4Codec.NVFP4:
            return _effective_scale(self.ws.float(), self.gscale, self.convention)
        return torch.ldexp(torch.ones_like(self.exp, dtype=torch.float32), self.exp.float())

    def encode(self, x: torch.Tensor, j0: int, eff: torch.Tensor | None = None,
               name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``j0..`` of float32 ``x [N, c]`` -> (codes uint8 [N, c], dequantized float32 [N, c])."""
        c = x.shape[1]
        b = torch.arange(j0, j0 + c, device=x.device) // self.block
        eff = self.eff() if eff is None else eff
        e = eff[:, b]
        if self.codec is FP4Codec.NVFP4:
            codes = e2m1_encode(x / torch.where(e == 0, torch.ones_like(e), e), name)
        else:
            codes = e2m1_encode(torch.ldexp(x, -self.exp[:, b].float()), name)
        return codes, e2m1_lut(device=x.device)[codes.long()] * e

    def set_block_from(self, b: int, block_amax: torch.Tensor, rule: MXScaleRule = MXScaleRule.OCP_FLOOR) -> None:
        """Re-derive block ``b``'s scale (all rows) from ``block_amax [N]`` as RTN does ("scales during GPTQ")."""
        if self.codec is FP4Codec.NVFP4:
            self.ws[:, b] = _block_scale(block_amax, self.gscale, self.convention, E2M1_MAX)
        else:
            self.exp[:, b] = mxfp4_block_exponents(block_amax, rule)

    def tensor(self, codes: torch.Tensor) -> NVFP4Tensor | MXFP4Tensor:
        """Full ``[N, K]`` codes -> the codec's tensor (the bytes the containers write)."""
        if self.codec is FP4Codec.NVFP4:
            return NVFP4Tensor(pack_fp4(codes), self.ws.clone(), self.gscale, self.convention, self.amax)
        return MXFP4Tensor(pack_fp4(codes), (self.exp + E8M0_BIAS).to(torch.uint8))


def rtn_grid(w: torch.Tensor, codec: FP4Codec, *, convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
             method: ScaleMethod = ScaleMethod.RTN, global_amax: torch.Tensor | None = None,
             mx_rule: MXScaleRule = MXScaleRule.OCP_FLOOR, name: str = "tensor") -> tuple[Grid, torch.Tensor]:
    """The data-free codec's scales for ``w [N, K]`` and its codes: (grid, codes uint8 [N, K]); MXFP4 honours
    ``method`` mse (exponent search) and treats four-over-six as rtn.
    ``grid.tensor(codes)`` is bit-identical to ``nvfp4_quantize`` / ``mxfp4_quantize``."""
    from v4convert.formats.fp4 import unpack_fp4
    if codec is FP4Codec.NVFP4:
        q = nvfp4_quantize(w, convention=convention, method=method, global_amax=global_amax, name=name)
        g = Grid(codec, ws=q.block_scale.clone(), gscale=q.global_scale, convention=convention, amax=q.amax)
        return g, unpack_fp4(q.packed)
    q = mxfp4_quantize(w, rule=mx_rule, name=name, mse=method is ScaleMethod.MSE)   # four-over-six: NVFP4 only
    return Grid(codec, exp=q.scale.to(torch.int32) - E8M0_BIAS), unpack_fp4(q.packed)


def nvfp4_global(amax: torch.Tensor, convention: NVFP4Convention, four_over_six: bool = False) -> torch.Tensor:
    return nvfp4_global_scale(amax, convention, FOUR_OVER_SIX_SCALE_MAX if four_over_six else E4M3_MAX)
