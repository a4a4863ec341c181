"""The pairs :func:`~hessian_spectra.algorithms.lanczos.lanczos` has found, and their checks.

The pool holds converged pairs (orthonormal rows ``X``, values ``theta``, the
products ``A x`` where computed). Later runs are deflated against it; a
verification run's pairs join it when they beat its worst pair; the final
Rayleigh-Ritz step on its span gives the true residuals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import BlockApply, gram, norm64
from hessian_spectra.algorithms._thick_restart import which_order

__all__ = ["Pool", "better", "clearly_worse", "sym", "true_residuals"]


def better(a: float, b: float, which: str, margin: float) -> bool:
    """Whether eigenvalue ``a`` is more wanted than ``b`` by more than ``margin``."""
    if which == "LA":
        return a > b + margin
    if which == "SA":
        return a < b - margin
    return abs(a) > abs(b) + margin


class Pool:
    """The pairs found so far: rows of ``X`` orthonormal, ``AX`` rows where known."""

    def __init__(self, n: int, wd: torch.dtype, dev: torch.device) -> None:
        self.theta = torch.zeros(0, dtype=torch.float64)
        self.X = torch.zeros(0, n, dtype=wd, device=dev)
        self.AX: list[Tensor | None] = []

    def __len__(self) -> int:
        return int(self.theta.numel())

    def add(self, theta: Tensor, X: Tensor, AX: Tensor | None = None) -> None:
        self.theta = torch.cat([self.theta, theta.double().cpu()])
        self.X = torch.cat([self.X, X])
        self.AX += [None] * X.shape[0] if AX is None else list(AX)

    def keep(self, idx: Tensor) -> None:
        self.theta, self.X = self.theta[idx], self.X[idx.to(self.X.device)]
        self.AX = [self.AX[int(i)] for i in idx]

    def trim(self, k: int, which: str) -> None:
        self.keep(which_order(self.theta, which)[:k])


def clearly_worse(kth: float, which: str, tol: float) -> Callable[[Tensor, Tensor, float], bool]:
    """Early stop of a verification run: each extreme Ritz pair of the complement lies
    below the k-th pair kept by ``gap = distance to it``, with a residual that is at most
    ``sqrt(tol) * scale`` and at most ``gap / 10``.

    A Ritz vector mixing an eigenvector of eigenvalue ``mu`` with weight ``w`` has residual
    at least ``sqrt(w) |mu - theta|``, so a hidden eigenvalue beyond the k-th would have
    to carry less than 1% of the Ritz vector's weight to pass this test.
    """

    def accept(theta: Tensor, est: Tensor, scale: float) -> bool:
        for t, r in zip(theta.tolist(), est.tolist(), strict=True):
            if which == "LA":
                gap = kth - t
            elif which == "SA":
                gap = t - kth
            else:
                gap = abs(kth) - abs(t)
            if not (gap > tol * scale and r <= min(tol**0.5 * scale, 0.1 * gap)):
                return False
        return True

    return accept


def sym(T: Tensor) -> Tensor:
    return (T + T.T) / 2


def true_residuals(apply: BlockApply, pool: Pool) -> Tensor:
    """Recompute missing ``A x``, Rayleigh-Ritz on the pool's span; the residual norms
    ``||A x - theta x||`` (float64, host) of the rotated pairs."""
    missing = [i for i, a in enumerate(pool.AX) if a is None]
    if missing:
        idx = torch.tensor(missing, device=pool.X.device)
        for i, a in zip(missing, apply(pool.X[idx]), strict=True):
            pool.AX[i] = a
    AX = torch.stack([a for a in pool.AX if a is not None])
    theta, Y = torch.linalg.eigh(sym(gram(pool.X, AX).cpu()))
    Yd = Y.to(device=pool.X.device, dtype=pool.X.dtype)
    pool.X, AX = Yd.T @ pool.X, Yd.T @ AX
    pool.theta, pool.AX = theta, list(AX)
    return norm64(AX - theta.to(AX.device, AX.dtype)[:, None] * pool.X, dim=1).cpu()
