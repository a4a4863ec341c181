"""The driver behind :func:`~hessian_spectra.algorithms.block.block_lanczos`.

:func:`run_block_lanczos` runs the block engine (:mod:`._block_krylov`) for the
wanted pairs, checks for missed copies of repeated eigenvalues where a block may
not have seen them (:func:`cluster_edge`), and ends with the true residuals of the
pairs found (:func:`~._lanczos_pool.true_residuals`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from hessian_spectra.algorithms._block_krylov import block_thick_restart
from hessian_spectra.algorithms._common import BlockApply, gram, norm64
from hessian_spectra.algorithms._lanczos_pool import (
    Pool,
    better,
    clearly_worse,
    sym,
    true_residuals,
)
from hessian_spectra.algorithms._random import gaussian
from hessian_spectra.algorithms._thick_restart import which_order
from hessian_spectra.algorithms.results import ConvergenceWarning, EigenResult

__all__ = [
    "CLUSTER",
    "SEARCH_MARGIN",
    "CountingApply",
    "cluster_edge",
    "init_rows",
    "run_block_lanczos",
]

SEARCH_MARGIN = 0.5
"""The search stops when the Ritz estimates reach ``SEARCH_MARGIN * tol``: the true
residual adds the products' rounding (about ``2e-7 max|lambda|`` for float32
Hessians of small networks) to the estimate, and a margin is cheaper than another
search after a failed true-residual check."""

CLUSTER = 1e-3
"""Relative width (of ``max |lambda|``) within which eigenvalues count as one cluster
for the multiplicity check."""


def init_rows(init: object, n: int, wd: torch.dtype, dev: torch.device, fn: str) -> Tensor:
    """Orthonormal rows spanning a warm start ``(n,)`` or ``(j, n)`` (dependent rows dropped)."""
    if not isinstance(init, Tensor):
        raise TypeError(
            f"{fn}: init must be a tensor of shape (n,) or (j, n), got {type(init).__name__}"
        )
    B = init.detach().to(device=dev, dtype=wd)
    if B.dim() == 1:
        B = B[None]
    if B.dim() != 2 or B.shape[1] != n:
        raise ValueError(f"{fn}: init must have shape ({n},) or (j, {n}), got {tuple(init.shape)}")
    Q, Rm = torch.linalg.qr(B.T)
    d = Rm.diagonal().abs()
    good = d > 1e-6 * max(float(d.max()) if d.numel() else 0.0, 1e-300)
    return Q.T[good].contiguous()


class CountingApply(BlockApply):
    """:class:`BlockApply` that also counts its ``matmat`` calls (:attr:`calls`)."""

    calls = 0

    def __call__(self, V: Tensor) -> Tensor:
        self.calls += 1
        return super().__call__(V)


def cluster_edge(theta: Tensor, size: int, width: float, which: str, kth: float) -> float | None:
    """How far a check for missed copies of repeated eigenvalues must look.

    A Krylov space grown from ``size`` random vectors holds ``size`` copies of a
    repeated eigenvalue, so only a value that already has ``size`` or more copies
    (``size`` values of ``theta`` within ``width``: a cluster) can have more that
    were missed, and a missed copy matters only if it beats the k-th value
    ``kth`` by more than ``width``. Returns the least wanted such cluster value,
    moved by ``width`` towards the less wanted side (for ``"LM"`` its magnitude),
    or ``None`` when no cluster matters (no check needed).
    """
    if size > theta.numel():
        return None
    s = theta.sort().values
    member = torch.zeros(s.numel(), dtype=torch.bool)
    spread = s[size - 1 :] - s[: s.numel() - size + 1]
    for i in torch.nonzero(spread <= width).squeeze(1).tolist():
        member[i : i + size] = True
    vals = [float(v) for v in s[member] if better(float(v), kth, which, width)]
    if not vals:
        return None
    if which == "LA":
        return min(vals) - width
    if which == "SA":
        return max(vals) + width
    return min(abs(v) for v in vals) - width


def run_block_lanczos(
    apply: BlockApply,
    n: int,
    k: int,
    which: str,
    tol: float,
    b: int,
    ncv: int,
    max_matvecs: int,
    B0: Tensor | None,
    gen: torch.Generator,
    *,
    X0: Tensor | None = None,
    AX0: Tensor | None = None,
    AB0: Tensor | None = None,
) -> EigenResult:
    """The solver behind :func:`block_lanczos` on counted products ``apply``.

    ``X0``/``AX0``: an orthonormal ``(b, n)`` random start block and its products,
    already spent; ``AB0``: the products of the warm-start rows ``B0``, if already
    spent (both used by :func:`~hessian_spectra.algorithms.eigenpairs.eigenpairs`).
    """
    wd, dev = apply.wd, apply.op.device
    stop_at = max_matvecs - k  # k products stay reserved for the true residuals
    pool = Pool(n, wd, dev)
    scale, restarts, rounds = 0.0, 0, 0
    starts: Tensor | None = None
    if B0 is not None and B0.shape[0]:
        AB = apply(B0) if AB0 is None else AB0
        theta, Y = torch.linalg.eigh(sym(gram(B0, AB).cpu()))
        Yd = Y.to(device=dev, dtype=wd)
        U, AU = Yd.T @ B0, Yd.T @ AB
        res = norm64(AU - theta.to(dev, wd)[:, None] * U, dim=1).cpu()
        scale = float(theta.abs().max())
        order = which_order(theta, which)[:k]
        ok = order[res[order] <= tol * scale]
        pool.add(theta[ok], U[ok.to(dev)], AU[ok.to(dev)])
        rest = order[res[order] > tol * scale].to(dev)
        if rest.numel():
            starts = U[rest]
    verified, stagnated = False, False
    last_worst: float | None = None
    spent = {"search": 0, "verification": 0, "residuals": 0}
    while True:
        before = apply.count
        if len(pool) < k:
            need = k - len(pool)
            if starts is None and X0 is not None and len(pool) == 0:
                start, pre = X0, AX0
            else:
                start = starts if starts is not None else gaussian(b, n, gen, dtype=wd, device=dev)
                pre = None
            X0 = AX0 = None
            width = max(b, start.shape[0])  # a warm start refines all its vectors at once
            run = block_thick_restart(
                apply,
                start,
                locked=pool.X if len(pool) else None,
                nwant=need,
                which=which,
                tol=tol * SEARCH_MARGIN,
                m_max=max(ncv - len(pool), need + 2 * width),
                block=width,
                stop_at=stop_at,
                generator=gen,
                scale=scale,
                AX0=pre,
            )
            fresh = len(pool) == 0
            pool.add(run.theta, run.vectors)
            scale, restarts, starts = max(scale, run.scale), restarts + run.restarts, None
            verified = run.exhausted and fresh
            spent["search"] += apply.count - before
            if not run.converged or len(pool) < k:
                break
        elif (
            not verified
            and len(pool) < n
            and (
                edge := cluster_edge(
                    pool.theta,
                    b,
                    CLUSTER * scale,
                    which,
                    float(pool.theta[which_order(pool.theta, which)[k - 1]]),
                )
            )
            is not None
        ):
            if apply.count + b > stop_at:
                break
            rounds += 1
            kth = float(pool.theta[which_order(pool.theta, which)[k - 1]])
            nw = 2 if which == "LM" and n - len(pool) >= 2 else 1
            run = block_thick_restart(
                apply,
                gaussian(b, n, gen, dtype=wd, device=dev),
                locked=pool.X,
                nwant=nw,
                which="BE" if which == "LM" else which,
                tol=tol,
                m_max=max(ncv - k, nw + 3 * b),
                block=b,
                stop_at=stop_at,
                generator=gen,
                scale=scale,
                accept=clearly_worse(edge, which, tol),
            )
            scale, restarts = max(scale, run.scale), restarts + run.restarts
            spent["verification"] += apply.count - before
            if not run.converged:
                break
            entered = any(better(float(t), kth, which, tol * scale) for t in run.theta)
            pool.add(run.theta, run.vectors)
            pool.trim(k, which)
            verified = not entered
        else:
            verified = True
            res = true_residuals(apply, pool)
            spent["residuals"] += apply.count - before
            scale = max(scale, float(pool.theta.abs().max()))
            fail = torch.nonzero(res > tol * scale).squeeze(1)
            if fail.numel() == 0 or apply.count + max(fail.numel(), b) > stop_at:
                break
            worst = float(res[fail].max()) / scale
            if last_worst is not None and worst > 0.9 * last_worst:
                stagnated = True  # another search did not lower the true residuals
                break
            last_worst = worst
            starts = pool.X[fail.to(dev)]
            failed = set(fail.tolist())
            pool.keep(
                torch.tensor([i for i in range(len(pool)) if i not in failed], dtype=torch.long)
            )
            verified = False
    before = apply.count
    true_residuals(apply, pool)
    spent["residuals"] += apply.count - before
    scale = max(scale, float(pool.theta.abs().max()))
    order = which_order(pool.theta, which)
    pool.keep(order)
    AX = torch.stack([a for a in pool.AX if a is not None])
    res = norm64(AX - pool.theta.to(dev, wd)[:, None] * pool.X, dim=1).cpu()
    mask = res <= tol * scale
    converged = bool(mask.all()) and len(pool) == k
    info = {
        "block_size": b,
        "ncv": ncv,
        "blocks": getattr(apply, "calls", None),
        "verified": verified,
        "verification_rounds": rounds,
        "scale": scale,
        "work_dtype": str(wd),
        "matvecs": spent,
        "stagnated": stagnated,
    }
    if not converged:
        worst = float((res / max(scale, 1e-300)).max()) if res.numel() else float("inf")
        why = (
            "the true residuals stopped decreasing, probably at the rounding level of the "
            f"operator's {apply.op.dtype} products; pass a larger tol"
            + (" (or use float64)" if apply.op.dtype != torch.float64 else "")
            if stagnated
            else "raise max_matvecs or ncv"
        )
        warnings.warn(
            f"block_lanczos: {int((~mask).sum()) + k - len(pool)} of {k} eigenpairs did not "
            f"reach tol={tol:g} (largest relative residual {worst:.2e}, {apply.count} of "
            f"max_matvecs={max_matvecs} products used); {why}",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif not verified:
        warnings.warn(
            f"block_lanczos: the pairs converged but the budget max_matvecs={max_matvecs} ran "
            "out while checking for missed (e.g. repeated) eigenvalues; raise max_matvecs",
            ConvergenceWarning,
            stacklevel=3,
        )
    return EigenResult(
        eigenvalues=pool.theta.to(dev),
        eigenvectors=pool.X.to(apply.op.dtype),
        residuals=res.to(dev),
        converged=converged,
        converged_mask=mask.to(dev),
        num_matvecs=apply.count,
        tol=tol,
        method="block_lanczos",
        which=which,
        iterations=restarts,
        info=info,
    )
