"""The fast paths of quant.methods.gptq (issue 12 "Scale") against the direct formulas they replace."""
from __future__ import annotations

import pytest
import torch

from v4convert.formats.fp4 import e2m1_lut
from v4convert.formats.fp4_grid import FP4Codec, rtn_grid
from v4convert.quant.methods.gptq import BATCH, _damped, _hinv_upper, _refine, original_target


def _layer(seed: int, n_out: int, k: int, n: int = 300):
    """Correlated inputs with uneven channels, fewer rows than K/2 (H rank-deficient before damping)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * (0.2 + 3 * torch.rand(k, generator=g))
    x = x + 0.7 * x[:, torch.randint(0, k, (k,), generator=g)]
    return torch.randn(n_out, k, generator=g) * 0.05, x, x.T @ x / n


def test_hinv_upper_is_the_upper_cholesky_factor_of_the_damped_inverse():
    _, _, h = _layer(1, 4, 200)
    u = _hinv_upper(h, 0.01, "t")
    hd = _damped(h, 0.01)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)   # the old 3 steps
    assert u.dtype == torch.float32 and torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    torch.testing.assert_close(u.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(u.double().T @ u.double() @ hd, torch.eye(200, dtype=torch.float64), rtol=0, atol=1e-4)


def test_original_target_solves_the_damped_normal_equations():
    w, x, h = _layer(2, 6, 160)
    xo = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    c = xo.T @ x / len(x)
    ws = original_target(w, h, c, 0.1)
    ref = w.double() + torch.linalg.solve(_damped(h, 0.1), (w.double() @ (c.double() - h.double())).T).T
    torch.testing.assert_close(ws.double(), ref, rtol=1e-5, atol=1e-6)


def _refine_per_column(w, codes, grid, hd, sweeps, name="t"):
    """The reference coordinate descent: all of G = D Hd updated after every moved column."""
    eff = grid.eff()
    q = e2m1_lut()[codes.long()] * eff.repeat_interleave(grid.block, 1)
    g = (w - q) @ hd
    diag = torch.diagonal(hd)
    for _ in range(sweeps):
        for j in range(w.shape[1]):
            c, qn = grid.encode((q[:, j] + g[:, j] / diag[j])[:, None], j, eff, name)
            delta = qn[:, 0] - q[:, j]
            if bool((delta != 0).any()):
                q[:, j] = qn[:, 0]
                codes[:, j] = c[:, 0]
                g -= delta[:, None] * hd[j][None, :]


@pytest.mark.parametrize("codec", [FP4Codec.NVFP4, FP4Codec.MXFP4])
def test_batched_refine_matches_per_column_sweeps(codec):
    """K = 3 batches (+ a partial one): moves in one batch reach the other batches' G through the matmul."""
    k = 3 * BATCH + 64
    w, _, h = _layer(4, 9, k)
    grid, codes = rtn_grid(w, codec)
    hd = _damped(h, 0.05).float()
    a, b = codes.clone(), codes.clone()
    _refine(w, a, grid, hd, 2, "t")
    _refine_per_column(w, b, grid, hd, 2)
    moved = (a != codes).sum()
    assert int(moved) > 50                                 # the sweeps do move codes in every batch
    assert torch.equal(a, b)                               # float32 summation order only: same codes here
