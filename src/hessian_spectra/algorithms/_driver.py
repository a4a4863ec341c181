"""The loop shared by :func:`~hessian_spectra.algorithms.lanczos.lanczos` and
:func:`~hessian_spectra.algorithms.block.block_lanczos`: search, check, verify.

1. **Search**: a deflated Krylov run (single-vector or block engine) finds the
   pairs still wanted; they join the :class:`~._lanczos_pool.Pool`.
2. **Check** for missed copies of repeated eigenvalues: a fresh random start,
   deflated against the pool, runs until its own extreme Ritz pair converges or
   is clearly worse than the k-th pair; if it beats the k-th pair it joins and the
   check repeats. The solver decides when a check is needed (always for one
   vector, only next to a cluster as wide as the block for a block).
3. **Verify**: a Rayleigh-Ritz step on the pool's span with ``A x`` from
   products (stored during the search, or recomputed), true residuals
   ``||A x - theta x||``; pairs above ``tol`` are searched again from their
   vectors, unless the residuals stopped decreasing (rounding floor).

The solvers supply the two runs as callables; everything else (budget,
bookkeeping, warnings, the result) lives here once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import BlockApply, gram, norm64, orthonormal_rows
from hessian_spectra.algorithms._lanczos_pool import Pool, better, sym, true_residuals
from hessian_spectra.algorithms._space import dimension
from hessian_spectra.algorithms._thick_restart import RunResult, which_order
from hessian_spectra.algorithms.results import ConvergenceWarning, EigenResult

__all__ = ["Search", "Solver", "init_rows", "solve"]

Search = Callable[[Tensor | None, Pool, int, float, int], RunResult]
"""``search(starts, pool, need, scale, stop_at)``: a run deflated against the pool for
``need`` more pairs, from the rows ``starts`` (or a random start when ``None``)."""

Check = Callable[[Pool, float, float, int], RunResult]
"""``check(pool, kth, scale, stop_at)``: the multiplicity-check run."""

NeedsCheck = Callable[[Pool, float, float], bool]
"""``needs_check(pool, kth, scale)``: whether a multiplicity check must run."""


@dataclass
class Solver:
    """What differs between the single-vector and the block solver.

    Attributes:
        name: ``"lanczos"`` or ``"block_lanczos"`` (messages, ``result.method``).
        search: the search run (:data:`Search`).
        check: the multiplicity-check run (:data:`Check`).
        needs_check: whether the pool needs one (:data:`NeedsCheck`; default always).
        reserve: products one more run needs at least (1, or the block size).
        keep_products: the runs store ``A x`` (no products for the true residuals).
        info: solver-specific entries for ``result.info``.
    """

    name: str
    search: Search
    check: Check
    needs_check: NeedsCheck = lambda pool, kth, scale: True
    reserve: int = 1
    keep_products: bool = True
    info: dict[str, Any] = field(default_factory=dict)


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
    return orthonormal_rows(B, rtol=1e-6)


def _warm_pool(
    apply: BlockApply, pool: Pool, B0: Tensor, AB0: Tensor | None, k: int, which: str, tol: float
) -> tuple[float, Tensor | None]:
    """Rayleigh-Ritz on the warm start's span: converged pairs join the pool; the
    rest (most wanted first) are returned as start rows. Returns ``(scale, starts)``."""
    wd, dev = apply.wd, B0.device
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
    return scale, (U[rest] if rest.numel() else None)


def solve(
    apply: BlockApply,
    solver: Solver,
    n: int,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    B0: Tensor | None = None,
    AB0: Tensor | None = None,
    multiplicity_check: bool = True,
) -> EigenResult:
    """Run search, check and verify (module docstring) within ``max_matvecs`` products;
    ``multiplicity_check=False`` leaves out the multiplicity check (a warm start trusted to hold the
    wanted pairs' neighbourhood; ``info["verified"]`` is then ``False``, without a warning)."""
    wd, dev = apply.wd, apply.op.device
    # without stored products, k products stay reserved for the last true residuals
    stop_at = max_matvecs - (0 if solver.keep_products else k)
    pool = Pool(n, wd, dev)
    scale, restarts, rounds = 0.0, 0, 0
    starts: Tensor | None = None
    if B0 is not None and B0.shape[0]:
        scale, starts = _warm_pool(apply, pool, B0, AB0, k, which, tol)
    verified, stagnated = False, False
    last_worst: float | None = None
    spent = {"search": 0, "verification": 0, "residuals": 0}

    def kth_value() -> float:
        return float(pool.theta[which_order(pool.theta, which)[k - 1]])

    while True:
        before = apply.count
        if len(pool) < k:
            fresh = len(pool) == 0
            run = solver.search(starts, pool, k - len(pool), scale, stop_at)
            pool.add(run.theta, run.vectors, run.products)
            scale, restarts, starts = max(scale, run.scale), restarts + run.restarts, None
            verified = run.exhausted and fresh
            spent["search"] += apply.count - before
            if not run.converged or len(pool) < k:
                break
        elif (
            multiplicity_check
            and not verified
            and len(pool) < dimension(n)
            and solver.needs_check(pool, kth_value(), scale)
        ):
            if apply.count + solver.reserve > stop_at:
                break
            rounds += 1
            kth = kth_value()
            check = solver.check(pool, kth, scale, stop_at)
            scale, restarts = max(scale, check.scale), restarts + check.restarts
            spent["verification"] += apply.count - before
            if not check.converged:
                break
            entered = any(better(float(t), kth, which, tol * scale) for t in check.theta)
            pool.add(check.theta, check.vectors, check.products)
            pool.trim(k, which)
            verified = not entered
        else:
            verified = True
            res = true_residuals(apply, pool)
            spent["residuals"] += apply.count - before
            scale = max(scale, float(pool.theta.abs().max()))
            fail = torch.nonzero(res > tol * scale).squeeze(1)
            if fail.numel() == 0 or apply.count + max(fail.numel(), solver.reserve) > stop_at:
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
    return _result(
        apply,
        solver,
        pool,
        k,
        which,
        tol,
        max_matvecs,
        scale,
        restarts,
        {
            "verified": verified and multiplicity_check,
            "checked": multiplicity_check,
            "verification_rounds": rounds,
            "matvecs": spent,
            "stagnated": stagnated,
        },
    )


def _result(
    apply: BlockApply,
    solver: Solver,
    pool: Pool,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    scale: float,
    restarts: int,
    state: dict[str, Any],
) -> EigenResult:
    """The :class:`EigenResult` of the pool (most wanted first), with the warnings."""
    wd, dev, name = apply.wd, apply.op.device, solver.name
    scale = max(scale, float(pool.theta.abs().max()) if len(pool) else 0.0)
    pool.keep(which_order(pool.theta, which))
    AX = torch.stack([a for a in pool.AX if a is not None]) if len(pool) else pool.X
    res = norm64(AX - pool.theta.to(dev, wd)[:, None] * pool.X, dim=1).cpu()
    mask = res <= tol * scale
    converged = bool(mask.all()) and len(pool) == k
    info = {
        **solver.info,
        "verified": state["verified"],
        "multiplicity_check": state["checked"],
        "verification_rounds": state["verification_rounds"],
        "scale": apply.unscale(scale),
        "restarts": restarts,
        "work_dtype": str(wd),
        "matvecs": state["matvecs"],
        "stagnated": state["stagnated"],
        "stored_products": solver.keep_products,
    }
    if not converged:
        worst = float((res / max(scale, 1e-300)).max()) if res.numel() else float("inf")
        why = (
            "the true residuals stopped decreasing, probably at the rounding level of the "
            f"operator's {apply.op.dtype} products; pass a larger tol"
            + (" (or use float64)" if apply.op.dtype != torch.float64 else "")
            if state["stagnated"]
            else "raise max_matvecs or ncv"
        )
        warnings.warn(
            f"{name}: {int((~mask).sum()) + k - len(pool)} of {k} eigenpairs did not reach "
            f"tol={tol:g} (largest relative residual {worst:.2e}, {apply.count} of "
            f"max_matvecs={max_matvecs} products used); {why}",
            ConvergenceWarning,
            stacklevel=5,
        )
    elif state["checked"] and not state["verified"]:
        warnings.warn(
            f"{name}: the pairs converged but the budget max_matvecs={max_matvecs} ran out while "
            "checking for missed (e.g. repeated) eigenvalues; raise max_matvecs",
            ConvergenceWarning,
            stacklevel=5,
        )
    return EigenResult(
        eigenvalues=apply.unscale(pool.theta.to(dev)),
        eigenvectors=pool.X.to(apply.op.dtype),
        residuals=apply.unscale(res.to(dev)),
        converged=converged,
        converged_mask=mask.to(dev),
        num_matvecs=apply.count,
        tol=tol,
        method=name,
        which=which,
        # Krylov steps: the products of the search and the multiplicity check
        iterations=state["matvecs"]["search"] + state["matvecs"]["verification"],
        info=info,
    )
