"""GPTQ (Frantar et al., arXiv 2210.17323) for one linear onto an FP4 grid (NVFP4 or MXFP4).

``W [N, K]`` (out x in), ``H [K, K] = X^T X / n`` from the calibration inputs ``X [n, K]`` of this linear.
Columns are quantized left to right (or by decreasing ``diag(H)`` with ``act_order``); each column's
rounding error is spread over the not-yet-quantized columns through the upper Cholesky factor of ``H^-1``
(lazy batch updates of ``BATCH`` columns, as the reference implementation). Damping adds
``damp * mean(diag H)`` to the diagonal; inputs that never fire (``H[j, j] = 0``) get ``H[j, j] = 1`` and
their column is rounded without spreading error (the weight is kept, not zeroed as the reference does,
since other data may use it).

Block scales (``ScalesAt``): ``BEFORE`` takes the data-free method's scales from the original ``W``
(the NVFP4 global scale always comes from the original amax, shared by fused partners); ``DURING`` re-derives
each block's scale as RTN would from the *updated* weights when GPTQ reaches the block's first column (the
reference's ``groupsize`` behaviour); ``SEARCH`` also decides when GPTQ reaches a block, per row, among the
activation-weighted search's candidates for the updated block (``awq.block_candidates``), by the GPTQ loss of
the block's columns under each (``_search_block``). ``act_order`` needs ``BEFORE`` (scales are tied to
contiguous blocks).
With ``H = I`` no error is spread, so the output is bit-identical to RTN on the same scales.

``refine`` (``--gptq-refine N``): N coordinate-descent sweeps after GPTQ on the same damped objective
``(w - q) H' (w - q)^T``, scales fixed (``_refine``; each move is to the grid point nearest a code's 1-D
optimum, so the objective never rises -- the CDQuant-style polish of a GPTQ solution).

``original_target`` (``--gptq-target original``, GPTAQ-style, arXiv 2504.02692): with ``--propagate quantized`` the
Hessian ``H = X~^T X~ / n`` comes from the partly quantized model's inputs ``X~ [n, K]``, while the output to
match is the original model's ``X W^T`` (``X`` the original model's inputs of the same tokens). The damped
least-squares weight for the quantized inputs is ``W* = W + W (C - H) H'^-1`` (``C = X^T X~ / n``, ``H'`` GPTQ's
damped H); GPTQ then rounds ``W*`` on ``H`` (``||X~ (W* - Q)^T||`` is the rest of ``||X W^T - X~ Q^T||``).
"""
from __future__ import annotations

import enum

import torch
from v4convert.formats.mxfp4 import MXFP4Tensor, MXScaleRule
from v4convert.formats.nvfp4 import NVFP4Convention, NVFP4Tensor, ScaleMethod

from v4convert.formats.fp4 import e2m1_encode, e2m1_lut
from v4convert.formats.fp4_grid import FP4Codec, Grid, rtn_grid
from .awq import block_candidates
from v4convert.errors import UserError

BATCH = 128          # columns per lazy update (a multiple of both block sizes)
DEFAULT_DAMP = 0.01


class ScalesAt(enum.Enum):
    BEFORE = "before"
    DURING = "during"
    SEARCH = "search"    # as DURING, but each row's block scale is the awq candidate with the least GPTQ loss


class GPTQError(UserError):
    """A Hessian that is not positive definite after damping (the user can raise ``--gptq-damp``)."""


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """float64 ``H + damp * mean(diag H) I`` with dead inputs' ``H[j, j] = 1`` first (GPTQ's objective)."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp * torch.diagonal(h).mean()
    return h


def _hinv_upper(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """float32 upper Cholesky factor ``U`` of ``H'^-1`` (``H'`` = :func:`_damped`, factorised in float64).

    One Cholesky and one triangular inverse (not Cholesky, inverse, Cholesky): with ``J`` the exchange matrix
    and ``J H' J = L L^T``, ``H'^-1 = R^T R`` for ``R = J L^-1 J`` upper triangular with a positive diagonal,
    i.e. ``R`` is the factor (unique). Same matrix as ``cholesky(cholesky_inverse(cholesky(H')), upper=True)``
    up to float64 rounding (a few float32 ulps at most after the cast); ~3x fewer flops at K = 7168."""
    hd = _damped(h, damp).flip(0, 1)                    # J H' J, float64 [K, K]
    lo, info = torch.linalg.cholesky_ex(hd)
    del hd
    if int(info) != 0:
        raise GPTQError(f"{name}: Hessian not positive definite after damping {damp}; raise --gptq-damp")
    eye = torch.eye(h.shape[0], dtype=lo.dtype)
    linv = torch.linalg.solve_triangular(lo, eye, upper=False)          # L^-1, lower
    del lo, eye
    return linv.flip(0, 1).float()


def _search_block(grid: Grid, b: int, x: torch.Tensor, u: torch.Tensor, base: ScaleMethod, mx_rule: MXScaleRule,
                  name: str) -> None:
    """``ScalesAt.SEARCH``: per row, block ``b``'s scale = the candidate (:func:`awq.block_candidates` of the
    block's current values ``x [N, block]``) whose GPTQ pass over the block's columns has the least loss
    ``sum_i ((x_i - q_i) / U_ii)^2`` (the OBS error of those columns; ``u [block, block]`` the block's part of
    the upper Cholesky factor of H^-1). Ties keep the earlier candidate (the first is RTN of ``x``)."""
    n, blk = x.shape
    cands = block_candidates(grid, x, base, mx_rule, name)
    nv = grid.codec is FP4Codec.NVFP4
    # all candidates at once, C = len(cands): the same per-element operations as Grid.encode
    eff = torch.stack([c.eff()[:, 0] for c in cands])                              # [C, N]
    div = torch.where(eff == 0, torch.ones_like(eff), eff)
    neg_exp = None if nv else -torch.stack([c.exp[:, 0] for c in cands]).float()   # [C, N]
    lut = e2m1_lut()
    wc = x.expand(len(cands), n, blk).clone()
    loss = torch.zeros(len(cands), n)
    for t in range(blk):
        col = wc[:, :, t]
        codes = e2m1_encode(col / div if nv else torch.ldexp(col, neg_exp), name)
        err = (col - lut[codes.long()] * eff) / u[t, t]
        wc[:, :, t:] -= err[:, :, None] * u[t, t:]
        loss += err.square()
    pick = torch.argmin(loss, 0)                       # [N]; the first minimum on ties (candidate 0: RTN)
    rows = torch.arange(n)
    if nv:
        grid.ws[:, b] = torch.stack([c.ws[:, 0].float() for c in cands])[pick, rows].to(torch.float8_e4m3fn)
    else:
        grid.exp[:, b] = torch.stack([c.exp[:, 0] for c in cands])[pick, rows]


def original_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float) -> torch.Tensor:
    """``W* [N, K]`` float32 = ``W + W (C - H) H'^-1``: the minimiser of ``||X~ W*^T - X W^T||^2 + ||(W* - W) R||^2``
    (``R^T R = H' - H``: GPTQ's damping and dead-input ones) for ``h = X~^T X~ / n``, ``c = X^T X~ / n`` (both
    ``[K, K]``, same n). ``c`` equal to ``h`` (identical streams) returns ``w`` itself: plain GPTQ, bit for bit."""
    if torch.equal(c, h):
        return w
    d = c.double()
    d -= h                                              # C - H in float64 (as c.double() - h.double())
    m = w.double() @ d                                  # [N, K]
    del d                                               # at most two float64 [K, K] at once (K = 7168: 0.8 GB)
    hd = _damped(h, damp)                               # float64, symmetric positive definite
    lo, info = torch.linalg.cholesky_ex(hd)             # SPD: Cholesky solve (half LU's flops)
    del hd
    if int(info) != 0:
        raise GPTQError(f"Hessian not positive definite after damping {damp}; raise --gptq-damp")
    return (w.double() + torch.cholesky_solve(m.T, lo).T).float()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, codec: FP4Codec, *,
                  convention: NVFP4Convention = NVFP4Convention.COMPRESSED_TENSORS,
                  base: ScaleMethod = ScaleMethod.RTN, global_amax: torch.Tensor | None = None,
                  mx_rule: MXScaleRule = MXScaleRule.OCP_FLOOR, damp: float = DEFAULT_DAMP,
                  act_order: bool = False, scales: ScalesAt = ScalesAt.BEFORE, grid: Grid | None = None,
                  refine: int = 0, name: str = "tensor") -> NVFP4Tensor | MXFP4Tensor:
    """GPTQ-quantize ``w [N, K]`` with Hessian ``h [K, K]``; ``base``: the data-free NVFP4 scale choice whose
    scales (and, for four-over-six, 256-based global scale) GPTQ starts from; ``grid``: start from these block
    scales instead (e.g. the activation-weighted search's), same global scale rules."""
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match in-features {k}")   # our bug
    if act_order and scales is not ScalesAt.BEFORE:
        raise UserError(f"{name}: act-order needs block scales chosen before GPTQ (--gptq-scales before)")
    w = w.detach().float()
    if grid is None:
        grid, _ = rtn_grid(w, codec, convention=convention, method=base, global_amax=global_amax, mx_rule=mx_rule,
                           name=name)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    hp = h[perm][:, perm]
    U = _hinv_upper(hp, damp, name)
    W = w[:, perm].clone()
    codes = torch.empty(n, k, dtype=torch.uint8)
    B = grid.block
    eff = grid.eff()
    for i1 in range(0, k, BATCH):
        i2 = min(k, i1 + BATCH)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if scales is ScalesAt.DURING and j % B == 0:
                grid.set_block_from(j // B, W1[:, i:i + B].abs().amax(1), mx_rule)
                eff = grid.eff()
            elif scales is ScalesAt.SEARCH and j % B == 0:
                _search_block(grid, j // B, W1[:, i:i + B], U1[i:i + B, i:i + B], base, mx_rule, name)
                eff = grid.eff()
            col = int(perm[j])
            c, q = grid.encode(W1[:, i:i + 1], col, eff, name)
            codes[:, j] = c[:, 0]
            err = (W1[:, i] - q[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    if refine:
        _refine(w, out, grid, _damped(h, damp).float(), refine, name)
    return grid.tensor(out)


def _refine(w: torch.Tensor, codes: torch.Tensor, grid: Grid, hd: torch.Tensor, sweeps: int, name: str) -> None:
    """Coordinate descent on GPTQ's objective ``(w - q) Hd (w - q)^T`` per row, scales fixed (in place on
    ``codes [N, K]``): column by column, each row's code moves to the grid point nearest the 1-D optimum
    ``q_j + (D Hd)_j / Hd_jj`` (D = w - q), which never raises the objective (a parabola in q_j).

    Lazy updates as GPTQ's: inside a batch of ``BATCH`` columns only the batch's part of ``G = D Hd [N, K]`` is
    kept current (rank-1 per moved column); at the batch's end the rest of ``G`` gets the batch's moves in one
    matmul. The same sweep as updating all of ``G`` per column (the reference order) up to float32 summation
    order; ~K/BATCH fewer passes over ``G``, which dominated at K = 7168 (one [N, K] update per column)."""
    eff = grid.eff()
    q = e2m1_lut()[codes.long()] * eff.repeat_interleave(grid.block, 1)     # [N, K] dequantized
    g = (w - q) @ hd                                                          # [N, K] = D Hd
    diag = torch.diagonal(hd)
    n, k = w.shape
    for _ in range(sweeps):
        for j1 in range(0, k, BATCH):
            j2 = min(k, j1 + BATCH)
            gb = g[:, j1:j2].clone()                     # [N, b] current G of the batch's columns
            hb = hd[j1:j2, j1:j2]
            moves = torch.zeros(n, j2 - j1)              # [N, b] q_new - q_old per column
            moved = False
            for t in range(j2 - j1):
                j = j1 + t
                c, qn = grid.encode((q[:, j] + gb[:, t] / diag[j])[:, None], j, eff, name)
                delta = qn[:, 0] - q[:, j]
                if bool((delta != 0).any()):
                    q[:, j] = qn[:, 0]
                    codes[:, j] = c[:, 0]
                    gb -= delta[:, None] * hb[t][None, :]
                    moves[:, t] = delta
                    moved = True
            if moved:
                g[:, j1:j2] = gb
                if j1:
                    g[:, :j1] -= moves @ hd[j1:j2, :j1]
                if j2 < k:
                    g[:, j2:] -= moves @ hd[j1:j2, j2:]
