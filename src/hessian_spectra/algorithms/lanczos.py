"""Extreme eigenpairs of a symmetric operator by restarted Lanczos.

:func:`lanczos` runs thick-restart Lanczos with full reorthogonalization
(Wu & Simon 2000) until every requested pair has a true residual

.. math::

    \\|A v_i - \\lambda_i v_i\\| \\le \\mathrm{tol} \\cdot \\max_j |\\lambda_j|,

then checks that no eigenvalue was missed: a single-vector Krylov space sees only
one copy of a repeated eigenvalue, so a fresh random start, deflated against the
pairs found, is run until its own extreme Ritz pair converges; if that pair beats
the worst one kept it joins, and the check repeats. Finally ``A v_i`` is
recomputed for the returned vectors (these products count), a Rayleigh-Ritz step
on their span refines them, and the residuals reported are the true ones.

:func:`lanczos_tridiagonal` gives the raw tridiagonal matrix of one plain run.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import (
    BlockApply,
    default_tol,
    gram,
    norm64,
    positive_float,
    positive_int,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._lanczos_pool import (
    Pool,
    better,
    clearly_worse,
    sym,
    true_residuals,
)
from hessian_spectra.algorithms._lanczos_runs import lanczos_runs
from hessian_spectra.algorithms._random import Seed, gaussian, make_generator
from hessian_spectra.algorithms._thick_restart import thick_restart, which_order
from hessian_spectra.algorithms.results import ConvergenceWarning, EigenResult
from hessian_spectra.operators.base import CurvatureOperator

__all__ = ["LanczosTridiagonal", "lanczos", "lanczos_tridiagonal"]

_WHICH = ("LA", "SA", "LM")


def _check_which(which: object) -> str:
    if isinstance(which, str) and which.upper() in _WHICH:
        return which.upper()
    raise ValueError(
        f"which must be 'LA' (largest algebraic), 'SA' (smallest algebraic) or "
        f"'LM' (largest magnitude), got {which!r}"
    )


def _init_block(init: Tensor, n: int, wd: torch.dtype, dev: torch.device) -> Tensor:
    if not isinstance(init, Tensor):
        raise TypeError(
            f"lanczos: init must be a tensor of shape (n,) or (j, n), got {type(init).__name__}"
        )
    B = init.detach().to(device=dev, dtype=wd)
    if B.dim() == 1:
        B = B[None]
    if B.dim() != 2 or B.shape[1] != n:
        raise ValueError(
            f"lanczos: init must have shape ({n},) or (j, {n}), got {tuple(init.shape)}"
        )
    Q, Rm = torch.linalg.qr(B.T)
    d = Rm.diagonal().abs()
    good = d > 1e-6 * max(float(d.max()) if d.numel() else 0.0, 1e-300)
    return Q.T[good].contiguous()


def lanczos(
    op: CurvatureOperator | Tensor,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float | None = None,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    init: Tensor | None = None,
    seed: Seed = None,
    progress: bool = False,
) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator, with true residuals.

    Args:
        op: a symmetric :class:`CurvatureOperator` or a square tensor.
        k: number of eigenpairs (``1 <= k <= n``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative residual tolerance; default ``max(1e-6, 4 eps(dtype))``
            (``1e-6`` for float64/float32, looser for float16/bfloat16).
        max_matvecs: budget of operator products (including the final ``k``
            that recompute ``A v``); default ``max(1000, 50 * ncv)``.
        ncv: largest Krylov basis; default ``min(n, max(2k + 1, 20))`` as in
            ARPACK. Peak memory is about ``max(ncv, k + 21) + k`` vectors of
            length ``n`` in work precision (basis, pairs found, their products).
        init: warm start, a ``(n,)`` vector or a ``(j, n)`` block (e.g. the
            eigenvectors of a previous call); pairs of its span that already meet
            ``tol`` are kept and the search continues from the rest.
        seed: ``int``, ``torch.Generator`` or ``None`` (fresh entropy).
        progress: show a tqdm bar of products used.

    Returns:
        :class:`EigenResult` with ``eigenvalues`` (float64, most wanted first),
        ``eigenvectors`` ``(k, n)`` in the operator dtype, true ``residuals``,
        ``converged`` and ``num_matvecs``. A budget that runs out gives
        ``converged=False`` and a :class:`ConvergenceWarning`; so do true
        residuals that stop decreasing above ``tol`` (products too inexact for
        it: ``info["stagnated"]``), found after one more search instead of
        spending the whole budget. ``info`` also holds ``"matvecs"`` (products
        spent on the search, the multiplicity check and the true residuals),
        ``"verification_rounds"``, ``"verified"`` and ``"scale"`` (the
        ``max |lambda|`` of the stopping test).

    Vectors are kept in float64 (float64 operators) or float32 (all others) and
    cast to the operator dtype only for products; the small projected problem is
    solved in float64.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = lanczos(A, k=3, seed=0)
        >>> [round(x) for x in res.eigenvalues.tolist()]
        [100, 99, 98]
    """
    op = symmetric_operator(op, "lanczos")
    n = op.size
    k = positive_int(k, "k", "lanczos")
    if k > n:
        raise ValueError(f"lanczos: k={k} exceeds the operator size n={n}; ask for k <= {n}")
    which = _check_which(which)
    tol = default_tol(op.dtype) if tol is None else positive_float(tol, "tol", "lanczos")
    if ncv is None:
        ncv = min(n, max(2 * k + 1, 20))
    else:
        ncv = min(positive_int(ncv, "ncv", "lanczos"), n)
        if ncv <= k and ncv < n:
            raise ValueError(f"lanczos: ncv={ncv} must exceed k={k} (or be >= n={n})")
    wd, dev = work_dtype(op.dtype), op.device
    B0 = _init_block(init, n, wd, dev) if init is not None else None
    n_init = 0 if B0 is None else B0.shape[0]
    minimum = 2 * k + n_init
    if max_matvecs is None:
        max_matvecs = max(1000, 50 * ncv, minimum)
    max_matvecs = positive_int(max_matvecs, "max_matvecs", "lanczos")
    if max_matvecs < minimum:
        raise ValueError(
            f"lanczos: max_matvecs={max_matvecs} is too small; it needs at least 2*k"
            + (" + the init vectors" if n_init else "")
            + f" = {minimum}"
        )
    gen = make_generator(seed, dev)
    ctx: Any = nullcontext(None)
    if progress:
        from tqdm.auto import tqdm

        ctx = tqdm(total=max_matvecs, desc="lanczos", unit="matvec")
    with ctx as bar:
        apply = BlockApply(op, wd, bar.update if bar is not None else None)
        return _lanczos(apply, n, k, which, tol, ncv, max_matvecs, B0, gen)


def _lanczos(
    apply: BlockApply,
    n: int,
    k: int,
    which: str,
    tol: float,
    ncv: int,
    max_matvecs: int,
    B0: Tensor | None,
    gen: torch.Generator,
) -> EigenResult:
    wd, dev = apply.wd, apply.op.device
    stop_at = max_matvecs - k  # k products stay reserved for the true residuals
    pool = Pool(n, wd, dev)
    scale, restarts, rounds = 0.0, 0, 0
    v0: Tensor | None = None
    if B0 is not None and B0.shape[0]:
        AB = apply(B0)
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
            v0 = (U[rest] / torch.linalg.vector_norm(U[rest], dim=1, keepdim=True)).sum(0)
    verified, stagnated = False, False
    last_worst: float | None = None
    spent = {"search": 0, "verification": 0, "residuals": 0}
    while True:
        before = apply.count
        if len(pool) < k:
            need = k - len(pool)
            start = v0 if v0 is not None else gaussian(1, n, gen, dtype=wd, device=dev)[0]
            run = thick_restart(
                apply,
                start,
                locked=pool.X if len(pool) else None,
                nwant=need,
                which=which,
                tol=tol,
                m_max=max(ncv - len(pool), need + 8),
                stop_at=stop_at,
                generator=gen,
                scale=scale,
            )
            fresh = len(pool) == 0
            pool.add(run.theta, run.vectors)
            scale, restarts, v0 = max(scale, run.scale), restarts + run.restarts, None
            verified = run.exhausted and fresh
            spent["search"] += apply.count - before
            if not run.converged or len(pool) < k:
                break
        elif not verified and len(pool) < n:
            if apply.count >= stop_at:
                break
            rounds += 1
            kth = float(pool.theta[which_order(pool.theta, which)[k - 1]])
            start = gaussian(1, n, gen, dtype=wd, device=dev)[0]
            nw = 2 if which == "LM" and n - len(pool) >= 2 else 1
            run = thick_restart(
                apply,
                start,
                locked=pool.X,
                nwant=nw,
                which="BE" if which == "LM" else which,
                tol=tol,
                m_max=max(ncv - k, nw + 19),
                stop_at=stop_at,
                generator=gen,
                scale=scale,
                accept=clearly_worse(kth, which, tol),
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
            if fail.numel() == 0 or apply.count + fail.numel() > stop_at:
                break
            worst = float(res[fail].max()) / scale
            if last_worst is not None and worst > 0.9 * last_worst:
                stagnated = True  # another search did not lower the true residuals
                break
            last_worst = worst
            bad = pool.X[fail.to(dev)]
            v0 = (bad / torch.linalg.vector_norm(bad, dim=1, keepdim=True)).sum(0)
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
    converged = bool(mask.all())
    info = {
        "verified": verified,
        "verification_rounds": rounds,
        "scale": scale,
        "ncv": ncv,
        "work_dtype": str(wd),
        "matvecs": spent,
        "stagnated": stagnated,
    }
    if not converged:
        worst = float((res / max(scale, 1e-300)).max())
        why = (
            "the true residuals stopped decreasing, probably at the rounding level of the "
            f"operator's {apply.op.dtype} products; pass a larger tol"
            + (" (or use float64)" if apply.op.dtype != torch.float64 else "")
            if stagnated
            else "raise max_matvecs or ncv"
        )
        warnings.warn(
            f"lanczos: {int((~mask).sum())} of {k} eigenpairs did not reach tol={tol:g} "
            f"(largest relative residual {worst:.2e}, {apply.count} of max_matvecs="
            f"{max_matvecs} products used); {why}",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif not verified:
        warnings.warn(
            f"lanczos: the pairs converged but the budget max_matvecs={max_matvecs} ran out while "
            "checking for missed (e.g. repeated) eigenvalues; raise max_matvecs",
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
        method="lanczos",
        which=which,
        iterations=restarts,
        info=info,
    )


@dataclass(frozen=True)
class LanczosTridiagonal:
    """Output of one plain Lanczos run.

    Attributes:
        alphas: ``(m,)`` float64 diagonal of ``T``.
        betas: ``(m - 1,)`` float64 off-diagonal.
        basis: ``(m, n)`` Lanczos vectors, one per row, in work precision
            (float64 for float64 operators, float32 otherwise).
        last_beta: norm of the residual after the last step (``0`` at breakdown).
        iterations: ``m``, the steps done (fewer than asked at an invariant subspace).
        num_matvecs: products used.
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor
    last_beta: float
    iterations: int
    num_matvecs: int

    def matrix(self) -> Tensor:
        """The ``(m, m)`` tridiagonal matrix ``T = V A V^T``."""
        return torch.diag(self.alphas) + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)


def lanczos_tridiagonal(
    op: CurvatureOperator | Tensor,
    v0: Tensor,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
) -> LanczosTridiagonal:
    """``num_steps`` Lanczos steps from ``v0``: ``A V^T = V^T T + beta_m v_{m+1} e_m^T``.

    Args:
        op: a symmetric operator or square tensor.
        v0: ``(n,)`` start vector (normalized here).
        num_steps: steps to take (capped at ``n``; fewer at an invariant subspace).
        reorthogonalize: full reorthogonalization (two passes of classical
            Gram-Schmidt per step). Without it the basis loses orthogonality and
            ``T`` shows ghost copies of converged eigenvalues (Paige 1976).
    """
    op = symmetric_operator(op, "lanczos_tridiagonal")
    num_steps = positive_int(num_steps, "num_steps", "lanczos_tridiagonal")
    n, wd = op.size, work_dtype(op.dtype)
    if not isinstance(v0, Tensor) or v0.shape != (n,):
        got = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
        raise ValueError(f"lanczos_tridiagonal: v0 must have shape ({n},), got {got}")
    v = v0.detach().to(device=op.device, dtype=wd)
    if float(torch.linalg.vector_norm(v)) == 0:
        raise ValueError("lanczos_tridiagonal: v0 is zero; pass a nonzero start vector")
    apply = BlockApply(op, wd)
    runs = lanczos_runs(apply, v[None], num_steps, reorthogonalize=reorthogonalize)
    m = int(runs.lengths[0])
    assert runs.basis is not None
    return LanczosTridiagonal(
        alphas=runs.alphas[0, :m].clone(),
        betas=runs.betas[0, : m - 1].clone(),
        basis=runs.basis[:m, 0].clone(),
        last_beta=float(runs.betas[0, m - 1]),
        iterations=m,
        num_matvecs=apply.count,
    )
