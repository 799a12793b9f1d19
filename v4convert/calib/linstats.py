"""Per-linear input statistics of the calibration pass (``calib.collect``): float64 sums of ``x x^T`` over the
inputs ``x [n, K]`` a linear saw, their max |x| and count, and with paired runs the cross sums with the original
model's inputs of the same rows (``--gptq-target original``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _accumulate(acc: torch.Tensor, p: torch.Tensor) -> None:
    """``acc += p`` (float64 += float32) in row blocks: the float64 cast of p is never whole (2 GiB at K=16384)."""
    step = max(1, (16 << 20) // p.shape[1])
    for i in range(0, p.shape[0], step):
        acc[i:i + step] += p[i:i + step]


@dataclass
class LinearStats:
    xtx: torch.Tensor                 # float64 [K, K], sum of x x^T (x: this model's inputs)
    amax: float = 0.0
    count: int = 0
    xc: torch.Tensor | None = None    # float64 [K, K], sum of xo x^T (xo: the original model's inputs), paired runs

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        """float32 ``t / n`` computed in row blocks so no float64 ``[K, K]`` temporary exists (2 GiB for V3's
        o_proj; elementwise, so the same bits)."""
        out = torch.empty(t.shape, dtype=torch.float32)
        n, step = max(self.count, 1), max(1, (16 << 20) // max(1, t.shape[-1]))
        for i in range(0, t.shape[0], step):
            out[i:i + step] = (t[i:i + step] / n).float()
        return out

    def hessian(self) -> torch.Tensor:
        """float32 ``[K, K]``: ``X^T X / n`` (zeros when nothing was seen)."""
        return self._mean(self.xtx)

    def cross(self) -> torch.Tensor | None:
        """float32 ``[K, K]``: ``Xo^T X / n`` (None without paired runs); equals ``hessian()`` bit for bit when
        every paired batch had identical inputs."""
        return None if self.xc is None else self._mean(self.xc)

    def add(self, x: torch.Tensor, xo: torch.Tensor | None = None) -> None:
        """Rows ``x [..., K]``; ``xo``: the original model's inputs of the same rows (needs ``xc``)."""
        x = x.reshape(-1, x.shape[-1]).float()
        if xo is not None:
            xo = xo.reshape(-1, xo.shape[-1]).float()
            if xo.shape != x.shape:
                raise RuntimeError(f"paired inputs {tuple(xo.shape)} vs {tuple(x.shape)}")     # our bug
        if x.shape[0] == 0:
            return
        p = x.T @ x                          # float32 per batch, float64 across batches
        _accumulate(self.xtx, p)
        if xo is not None:
            _accumulate(self.xc, p if torch.equal(xo, x) else xo.T @ x)
        self.amax = max(self.amax, float(x.abs().max()))
        self.count += x.shape[0]
