"""Power iteration (optionally with heavy-ball momentum) and its deflated form.

Plain power iteration ``v <- A v / ||A v||`` converges to the eigenvector of
largest magnitude at the rate ``|lambda_2 / lambda_1|``. With momentum
``beta`` (De Sa, He, Mitliagkas, Re, Xu 2018, "Accelerated stochastic power
iteration") the unnormalized iterates follow

.. math::

    x_{t+1} = A x_t - \\beta x_{t-1},

which with ``beta ~ lambda_2^2 / 4`` converges at the rate ``sqrt`` of the plain one.
The ratio ``||x_{t+1}|| / ||x_t||`` then tends to a root of ``r^2 - lambda r + beta``,
not to ``lambda``; the eigenvalue returned here is always the Rayleigh quotient
``v^T A v`` of the normalized iterate, so momentum leaves it unbiased.

Convergence is tested on the true residual ``||A v - (v^T A v) v||`` of the
current iterate, from the product the iteration computes anyway, so each step
costs one product and one host synchronisation for the test.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import (
    BlockApply,
    default_tol,
    gram,
    in_vector_space,
    norm64,
    positive_float,
    positive_int,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._random import Seed, gaussian, make_generator
from hessian_spectra.algorithms.results import ConvergenceWarning, EigenResult
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = [
    "deflated_power_iteration",
    "power_iteration",
    "power_iteration_one",
    "stochastic_power_iteration",
]


def _check_momentum(momentum: object, fn: str) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise TypeError(f"{fn}: momentum must be a float, got {type(momentum).__name__}")
    if not (math.isfinite(momentum) and momentum >= 0):
        raise ValueError(f"{fn}: momentum must be a finite number >= 0, got {momentum}")
    return float(momentum)


def _one_pair(
    apply: BlockApply,
    v0: Tensor,
    locked: Tensor,
    *,
    stop_at: int,
    tol: float,
    momentum: float,
    scale: float,
) -> tuple[float, Tensor, float, bool, int]:
    """Power iteration on ``(I - L^T L) A (I - L^T L)``; returns
    ``(lambda, v, residual, converged, steps)``."""

    def project(x: Tensor) -> Tensor:
        if locked.shape[0]:
            for _ in range(2):
                x = x - gram(locked, x[None])[:, 0].to(x.dtype) @ locked
        return x

    v = project(v0)
    v = v / norm64(v).to(v.dtype)
    v_prev = torch.zeros_like(v)
    ratio = torch.ones((), dtype=v.dtype, device=v.device)  # ||x_t|| / ||x_{t-1}||
    tiny = torch.finfo(v.dtype).tiny
    best = (0.0, v, math.inf)
    steps = 0
    while apply.count < stop_at:
        av = apply(v[None])[0]
        steps += 1
        lam_t = gram(v[None], av[None])[0, 0]
        r = av - lam_t.to(v.dtype) * v
        stats = torch.stack([lam_t, norm64(r), norm64(v)]).cpu()  # one sync per step
        lam, res, norm_v = float(stats[0]), float(stats[1]), float(stats[2])
        if norm_v == 0.0:  # the deflated iterate vanished: keep the previous one
            break
        best = (lam, v, res)
        scale = max(scale, abs(lam))
        if res <= tol * scale:
            return lam, v, res, True, steps
        u = project(av)
        if momentum:
            u = u - (momentum / ratio) * v_prev
        norm_u = norm64(u).to(u.dtype)
        v_prev, v, ratio = v, u / norm_u.clamp_min(tiny), norm_u
    lam, v, res = best
    return lam, v, res, res <= tol * max(scale, abs(lam)), steps


@in_vector_space
def power_iteration(
    operator: CurvatureOperator | Tensor,
    *,
    max_matvecs: int = 1000,
    tol: float | None = None,
    momentum: float = 0.0,
    init: Tensor | None = None,
    seed: Seed = None,
) -> EigenResult:
    """The eigenpair of largest magnitude by power iteration.

    Args:
        op: a symmetric operator or square tensor.
        max_matvecs: budget of products (one per step).
        tol: relative residual tolerance,
            ``||A v - lambda v|| <= tol * |lambda|``; default ``max(1e-6, 4 eps(dtype))``.
        momentum: heavy-ball coefficient ``beta >= 0`` (De Sa et al. 2018); about
            ``lambda_2^2 / 4`` is optimal, ``beta > lambda_1^2 / 4`` diverges from
            the top pair. The eigenvalue returned is ``v^T A v`` either way.
        init: ``(n,)`` start vector; random (Gaussian) by default.
        seed: ``int``, ``torch.Generator`` or ``None``.

    Returns:
        :class:`EigenResult` with one pair, ``method="power"``, ``which="LM"``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
        >>> round(power_iteration(A, seed=0).eigenvalues.item(), 6)
        5.0
    """
    return _power("power_iteration", operator, 1, max_matvecs, tol, momentum, init, seed)


@in_vector_space
def power_iteration_one(
    operator: CurvatureOperator | Tensor,
    init: Tensor | None = None,
    max_iter: int = 100,
    tol: float | None = None,
    *,
    momentum: float = 0.0,
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
) -> tuple[float, Tensor, float, int, bool]:
    """The dominant pair as hessian-eigenthings returns it: a plain tuple.

    The same iteration as :func:`power_iteration`, with ``max_iter`` products.

    Args:
        operator: a symmetric operator or square tensor.
        init: ``(n,)`` start vector (``v0``); random (Gaussian) by default.
        max_iter: most steps (one product each).
        tol: relative residual tolerance; default ``max(1e-6, 4 eps(dtype))``.
        momentum, seed: as in :func:`power_iteration`.
        backend: ``None`` or the operator's own backend (:attr:`~CurvatureOperator.backend`).

    Returns:
        ``(eigenvalue, eigenvector, residual_norm, iterations, converged)``: a float,
        the ``(n,)`` unit vector in the operator dtype, the true residual
        ``||A v - lambda v||``, the products used and whether it met ``tol``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
        >>> lam, v, res, its, ok = power_iteration_one(A, seed=0)
        >>> round(lam, 6), ok
        (5.0, True)
    """
    check_backend(backend, "power_iteration_one", operator)
    r = _power("power_iteration_one", operator, 1, max_iter, tol, momentum, init, seed)
    return (
        float(r.eigenvalues[0]),
        r.eigenvectors[0],
        float(r.residuals[0]),
        r.iterations,
        r.converged,
    )


@in_vector_space
def deflated_power_iteration(
    operator: CurvatureOperator | Tensor,
    k: int = 10,
    max_iter: int | None = 100,
    tol: float | None = None,
    *,
    momentum: float = 0.0,
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
    max_matvecs: int | None = None,
    init: Tensor | None = None,
) -> EigenResult:
    """``k`` eigenpairs of largest magnitude, one at a time, by deflated power iteration.

    Pair ``i`` runs power iteration on ``(I - P) A (I - P)`` with ``P`` the projector
    on the pairs found before it (projection deflation), with the budget left
    divided evenly among the pairs still to find. Residuals are those of the
    undeflated ``A``. Slower and less robust than :func:`lanczos` for close
    eigenvalues; kept for its small memory (three vectors plus the ``k`` found).

    Args:
        operator: a symmetric operator or square tensor.
        k: number of pairs (``1 <= k <= n``).
        max_iter: steps per pair; the budget is ``k * max_iter`` products.
            Power iteration converges at the rate ``|lambda_2 / lambda_1|``, so
            100 steps often do not reach ``tol``: the result then says
            ``converged=False`` (raise ``max_iter``, or use :func:`lanczos`).
        tol, momentum, seed: as in :func:`power_iteration`.
        backend: ``None`` or the operator's own backend (:attr:`~CurvatureOperator.backend`).
        max_matvecs: total budget instead of ``max_iter`` (pass ``max_iter=None``).
        init: ``(n,)`` or ``(k, n)`` start vectors (row ``i`` starts pair ``i``).

    Returns:
        :class:`EigenResult` sorted by decreasing ``|lambda|``.
    """
    check_backend(backend, "deflated_power_iteration", operator)
    if max_matvecs is None:
        if max_iter is None:
            raise ValueError("deflated_power_iteration: give max_iter or max_matvecs")
        max_matvecs = positive_int(k, "k", "deflated_power_iteration") * positive_int(
            max_iter, "max_iter", "deflated_power_iteration"
        )
    elif max_iter not in (None, 100):
        raise ValueError(
            "deflated_power_iteration: give max_iter (steps per pair) or max_matvecs "
            "(all products), not both"
        )
    op = operator
    return _power("deflated_power_iteration", op, k, max_matvecs, tol, momentum, init, seed)


@keeping_graphs
def _power(
    fn: str,
    op: CurvatureOperator | Tensor,
    k: int,
    max_matvecs: int | None,
    tol: float | None,
    momentum: float,
    init: Tensor | None,
    seed: Seed,
) -> EigenResult:
    op = symmetric_operator(op, fn)
    n, nl = op.size, op.vector_length  # nl: this rank's slice of sharded vectors
    k = positive_int(k, "k", fn)
    if k > n:
        raise ValueError(f"{fn}: k={k} exceeds operator size n={n}; ask for k <= {n}")
    max_matvecs = positive_int(1000 * k if max_matvecs is None else max_matvecs, "max_matvecs", fn)
    if max_matvecs < k:
        raise ValueError(
            f"{fn}: max_matvecs={max_matvecs} is below k={k}; give each pair at least one"
        )
    tol = default_tol(op.dtype) if tol is None else positive_float(tol, "tol", fn)
    momentum = _check_momentum(momentum, fn)
    wd, dev = work_dtype(op.dtype), op.device
    starts = None
    if init is not None:
        if not isinstance(init, Tensor):
            raise TypeError(f"{fn}: init must be a tensor, got {type(init).__name__}")
        starts = init.detach().to(device=dev, dtype=wd)
        if starts.dim() == 1:
            starts = starts[None]
        if starts.dim() != 2 or starts.shape[1] != nl or starts.shape[0] not in (1, k):
            raise ValueError(
                f"{fn}: init must have shape ({nl},) or ({k}, {nl}), got {tuple(init.shape)}"
            )
    gen = make_generator(op.common_seed(seed), dev)
    apply = BlockApply(op, wd, rescale=True)
    X = torch.zeros(0, nl, dtype=wd, device=dev)
    lams: list[float] = []
    res: list[float] = []
    conv: list[bool] = []
    scale = 0.0
    for i in range(k):
        budget = (max_matvecs - apply.count) // (k - i)
        if starts is not None and i < starts.shape[0]:
            v0 = starts[i]
        else:
            v0 = gaussian(1, nl, gen, dtype=wd, device=dev)[0]
        norm0 = float(norm64(v0))
        if X.shape[0]:
            for _ in range(2):
                v0 = v0 - gram(X, v0[None])[:, 0].to(v0.dtype) @ X
        if not float(norm64(v0)) > 1e-6 * norm0:
            v0 = gaussian(1, nl, gen, dtype=wd, device=dev)[0]
        lam, v, r, ok, _ = _one_pair(
            apply, v0, X, stop_at=apply.count + budget, tol=tol, momentum=momentum, scale=scale
        )
        scale = max(scale, abs(lam))
        X = torch.cat([X, v[None]])
        lams.append(lam)
        res.append(r)
        conv.append(ok)
    lam_t = torch.tensor(lams, dtype=torch.float64)
    order = torch.argsort(lam_t.abs(), descending=True, stable=True)
    mask = torch.tensor(conv)[order]
    converged = bool(mask.all())
    if not converged:
        warnings.warn(
            f"{fn}: {int((~mask).sum())} of {k} eigenpairs did not reach tol={tol:g} within "
            f"max_matvecs={max_matvecs}; raise max_matvecs, or use lanczos() for close eigenvalues",
            ConvergenceWarning,
            stacklevel=3,
        )
    return EigenResult(
        eigenvalues=apply.unscale(lam_t[order].to(dev)),
        eigenvectors=X[order.to(dev)].to(op.dtype),
        residuals=apply.unscale(torch.tensor(res, dtype=torch.float64)[order].to(dev)),
        converged=converged,
        converged_mask=mask.to(dev),
        num_matvecs=apply.count,
        tol=tol,
        method="power",
        which="LM",
        iterations=apply.count,
        info={"momentum": momentum},
    )


stochastic_power_iteration = deflated_power_iteration
"""The name hessian-eigenthings lists for power iteration on a sampled operator. There,
``full_dataset=False`` drew a new batch for every product; the operators here are one fixed
matrix, so it is :func:`deflated_power_iteration` itself."""
