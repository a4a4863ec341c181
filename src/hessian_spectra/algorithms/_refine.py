"""Refine eigenpairs from a warm block, to an eigenvalue-error tolerance.

:class:`~hessian_spectra.CurvatureTracker` measures an operator that moves a little
between measurements. Its last Ritz vectors (the wanted ``k`` and a few more) span
most of the new wanted eigenvectors, including the neighbours that cross them: at
the edge of stability the top eigenvalues lie within a few percent and trade
places between measurements, so a single warm vector follows the wrong branch.

:func:`refine` does a Rayleigh-Ritz step on the warm block and grows the basis by
the residuals of the wanted Ritz pairs not yet converged (Davidson without a
preconditioner: the Krylov space of the residuals, augmented by the block), one
product per residual. It stops on the **eigenvalue error**, not the residual: a
Ritz pair ``(theta_i, y_i)`` with residual ``r_i`` has an eigenvalue within

.. math::

    \\min(r_i,\\; r_i^2 / \\delta_i)

of ``theta_i`` (Kato-Temple), where ``delta_i`` is the distance from ``theta_i``
to the nearest other eigenvalue. ``delta_i`` is taken from the neighbouring Ritz
values of the basis, each moved towards ``theta_i`` by its own residual: a bound
when the eigenvalues next to the wanted ones lie within those neighbours'
residuals (the basis holds them), an estimate before; holding them is what the
warm start is trusted for between the tracker's checked measurements (fresh random
starts). Eigenvalue errors fall with the square of the residual, so a plot's
accuracy costs far fewer products than the same residual would.

A run that does not meet ``tol`` within ``max_matvecs`` says so
(``converged=False``); the tracker then runs a verified :func:`lanczos`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import (
    BlockApply,
    gram,
    in_vector_space,
    norm64,
    orthonormal_rows,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._driver import init_rows
from hessian_spectra.algorithms._lanczos_pool import sym
from hessian_spectra.algorithms._thick_restart import which_order
from hessian_spectra.algorithms.results import EigenResult
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["refine", "temple_estimates"]


def temple_estimates(theta: Tensor, residuals: Tensor) -> Tensor:
    """Kato-Temple estimate of each Ritz value's eigenvalue error, from its neighbours.

    ``theta`` and ``residuals`` are the Ritz values and residual norms of one basis
    (any order). For each value the gap ``delta`` to its neighbours above and below
    (each less that neighbour's residual) gives ``min(r, r^2 / delta)``; where a
    neighbour's interval reaches the value (``delta <= 0``) the residual itself.
    A value with no neighbour on one side (an end of the basis' spectrum) takes the
    gap on the other side: the basis is trusted to hold the eigenvalues beyond it;
    a basis of one vector has no gap, and its bound is the residual.
    """
    theta, residuals = theta.double().cpu(), residuals.double().cpu()
    m = theta.numel()
    order = torch.argsort(theta)
    t, r = theta[order], residuals[order]
    inf = torch.full((1,), float("inf"), dtype=torch.float64)
    below = torch.cat([inf, t[1:] - t[:-1] - r[:-1]]) if m > 1 else inf
    above = torch.cat([t[1:] - t[:-1] - r[1:], inf]) if m > 1 else inf
    delta = torch.minimum(below, above)
    quad = torch.where((delta > 0) & torch.isfinite(delta), r * r / delta.clamp_min(1e-300), r)
    bound = torch.minimum(r, quad)
    out = torch.empty_like(bound)
    out[order] = bound
    return out


@in_vector_space
@keeping_graphs
def refine(
    operator: CurvatureOperator | Tensor,
    init: Tensor,
    k: int,
    which: str,
    tol: float,
    *,
    keep: int,
    max_matvecs: int = 40,
    max_basis: int = 30,
) -> tuple[EigenResult, Tensor]:
    """The ``k`` wanted eigenpairs of ``operator`` grown from the rows of ``init``.

    Returns the result (``info["error_estimates"]``: each eigenvalue's error estimate,
    ``converged`` when all are at most ``tol * max |lambda|``) and the ``keep`` most
    wanted Ritz vectors of the final basis (operator dtype), the next warm block.
    """
    operator = symmetric_operator(operator, "refine")
    wd, dev = work_dtype(operator.dtype), operator.device
    apply = BlockApply(operator, wd, rescale=True)
    Q = init_rows(init, operator.vector_length, wd, dev, "refine")
    if Q.shape[0] < k:
        raise ValueError(f"refine: the warm block spans {Q.shape[0]} directions, fewer than k={k}")
    AQ = apply(Q)
    while True:
        theta, S = torch.linalg.eigh(sym(gram(Q, AQ).cpu()))
        order = which_order(theta, which)
        theta, S = theta[order], S[:, order].to(device=dev, dtype=wd)
        Y, AY = S.T @ Q, S.T @ AQ
        R = AY - theta.to(device=dev, dtype=wd)[:, None] * Y
        res = norm64(R, dim=1).cpu()
        bounds = temple_estimates(theta, res)[:k]
        scale = float(theta[:k].abs().max())
        done = bounds <= tol * scale
        if bool(done.all()) or apply.count >= max_matvecs:
            break
        if Q.shape[0] + k > max_basis:  # thick restart on the most wanted Ritz vectors
            Q, AQ = Y[: max(keep, k)], AY[: max(keep, k)]
        W = R[:k][~done.to(dev)]
        for _ in range(2):  # residuals are orthogonal to the basis up to rounding
            W = W - gram(W, Q).to(wd) @ Q
        W = orthonormal_rows(W, rtol=1e-6)
        if W.shape[0] == 0:  # the residuals lie in the basis: nothing more to find
            break
        Q, AQ = torch.cat([Q, W]), torch.cat([AQ, apply(W)])
    result = EigenResult(
        eigenvalues=apply.unscale(theta[:k].to(dev)),
        eigenvectors=Y[:k].to(operator.dtype),
        residuals=apply.unscale(res[:k].to(dev)),
        converged=bool(done.all()),
        converged_mask=done.to(dev),
        num_matvecs=apply.count,
        tol=tol,
        method="refine",
        which=which,
        iterations=apply.count,
        info={
            "error_estimates": apply.unscale(bounds).tolist(),
            "scale": apply.unscale(scale),
            "basis": int(Q.shape[0]),
            "verified": False,
            "multiplicity_check": False,
        },
    )
    return result, Y[: max(keep, k)].to(operator.dtype)
