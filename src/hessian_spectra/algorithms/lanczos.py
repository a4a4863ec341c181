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
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from hessian_spectra.algorithms._codec import Serializable
from hessian_spectra.algorithms._common import (
    BlockApply,
    default_tol,
    in_vector_space,
    log_eigen,
    norm64,
    positive_float,
    positive_int,
    product_bar,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._driver import Solver, init_rows, solve
from hessian_spectra.algorithms._lanczos_pool import Pool, clearly_worse
from hessian_spectra.algorithms._lanczos_runs import lanczos_runs
from hessian_spectra.algorithms._literals import Which
from hessian_spectra.algorithms._random import Seed, gaussian, make_generator
from hessian_spectra.algorithms._seed_args import budget_from_max_iter, check_reorthogonalize
from hessian_spectra.algorithms._space import dimension
from hessian_spectra.algorithms._thick_restart import thick_restart
from hessian_spectra.algorithms.results import EigenResult
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["LanczosTridiag", "LanczosTridiagonal", "lanczos", "lanczos_tridiagonal"]

_WHICH = ("LA", "SA", "LM")


def _check_which(which: object) -> Which:
    if isinstance(which, str) and which.upper() in _WHICH:
        return cast(Which, which.upper())
    raise ValueError(
        f"which must be 'LA' (largest algebraic), 'SA' (smallest algebraic) or "
        f"'LM' (largest magnitude), got {which!r}"
    )


@in_vector_space
@keeping_graphs
def lanczos(
    operator: CurvatureOperator | Tensor,
    k: int = 10,
    max_iter: int | None = None,
    tol: float | None = None,
    which: Which = "LM",
    *,
    reorthogonalize: bool | None = None,
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    init: Tensor | None = None,
    progress: bool = False,
    keep_products: bool = True,
    check: bool = True,
) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator, with true residuals.

    Args:
        operator: a symmetric :class:`CurvatureOperator` or a square tensor.
        k: number of eigenpairs (``1 <= k <= n``).
        max_iter: most Lanczos steps (operator products spent on the search and
            the multiplicity check, each one step; at most ``n``); the run stops
            earlier once converged and verified. It sets ``max_matvecs`` to
            ``max(max_iter, 2 k)`` (plus ``k`` with ``keep_products=False``, for
            the residual products) and lets the Krylov basis grow to ``max_iter``
            vectors (``ncv``, as hessian-eigenthings' single run of ``max_iter``
            steps does) when those are not given. ``None``: the ``max_matvecs``
            and ``ncv`` defaults.
        tol: relative residual tolerance; default ``max(1e-6, 4 eps(dtype))``
            (``1e-6`` for float64, ``1e-5`` for float32, looser for float16/bfloat16).
        which: ``"LM"`` largest magnitude (the default, as in scipy's ``eigsh``),
            ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic.
        reorthogonalize: ``None`` or ``True``; the basis is always fully
            reorthogonalized (without it Lanczos returns ghost copies of converged
            eigenvalues), so ``False`` is refused with a warning and ignored.
        seed: ``int``, ``torch.Generator`` or ``None`` (fresh entropy).
        backend: ``None`` or the operator's own backend (:attr:`~CurvatureOperator.backend`).
        max_matvecs: budget of operator products (including the ``k`` that
            recompute ``A v`` when ``keep_products=False``); default
            ``max(1000, 50 * ncv)``.
        ncv: largest Krylov basis; default ``min(n, max(2k + 1, 20))`` as in
            ARPACK. Peak memory is about ``2 max(ncv, k + 21) + k`` vectors of
            length ``n`` in work precision (basis, its products, pairs found),
            ``max(ncv, k + 21) + 2k`` with ``keep_products=False``.
        init: warm start, a ``(n,)`` vector or a ``(j, n)`` block (e.g. the
            eigenvectors of a previous call); pairs of its span that already meet
            ``tol`` are kept and the search continues from the rest.
        progress: show a tqdm bar of products used.
        keep_products: keep the product ``A v`` of every basis vector (about
            twice the basis memory), so the true residuals ``||A x - lambda x||``
            of the answer are formed from products already done; ``False``
            recomputes ``A x`` for the returned vectors (``k`` more products).
        check: run the multiplicity check (a fresh random start looking for missed,
            e.g. repeated, eigenvalues). ``False`` leaves it out, for a warm start
            trusted to hold the wanted pairs' neighbourhood (as
            :class:`~hessian_spectra.CurvatureTracker` does between its checked
            measurements); ``info["verified"]`` is then ``False`` and
            ``info["multiplicity_check"]`` says it was not run.

    Returns:
        :class:`EigenResult` with ``eigenvalues`` (float64, most wanted first),
        ``eigenvectors`` ``(k, n)`` in the operator dtype, true ``residuals``,
        ``converged``, ``num_matvecs`` and ``iterations`` (Lanczos steps). A
        budget that runs out gives ``converged=False`` and a
        :class:`ConvergenceWarning`; so do true residuals that stop decreasing
        above ``tol`` (products too inexact for it: ``info["stagnated"]``), found
        after one more search instead of spending the whole budget. ``info`` also
        holds ``"matvecs"`` (products spent on the search, the multiplicity check
        and the true residuals), ``"restarts"``, ``"verification_rounds"``,
        ``"verified"`` and ``"scale"`` (the ``max |lambda|`` of the stopping test).

    Vectors are kept in float64 (float64 operators) or float32 (all others) and
    cast to the operator dtype only for products; the small projected problem is
    solved in float64.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = lanczos(A, k=3, seed=0)
        >>> [round(x) for x in res.eigenvalues.tolist()]
        [100, 99, 98]
    """
    check_backend(backend, "lanczos", operator)
    check_reorthogonalize(reorthogonalize, "lanczos")
    op = operator
    op = symmetric_operator(op, "lanczos")
    n = op.size
    k = positive_int(k, "k", "lanczos")
    if k > n:
        raise ValueError(f"lanczos: k={k} exceeds operator size n={n}; ask for k <= {n}")
    which = _check_which(which)
    tol = default_tol(op.dtype) if tol is None else positive_float(tol, "tol", "lanczos")
    if max_iter is not None:
        max_iter = positive_int(max_iter, "max_iter", "lanczos")
        if max_iter > n:
            raise ValueError(
                f"lanczos: max_iter={max_iter} exceeds operator size n={n}; a Krylov space of "
                f"dimension n holds every eigenvector, so max_iter <= {n} suffices"
            )
    if ncv is None:
        ncv = min(n, max(2 * k + 1, 20, max_iter or 0))
    else:
        ncv = min(positive_int(ncv, "ncv", "lanczos"), n)
        if ncv <= k and ncv < n:
            raise ValueError(f"lanczos: ncv={ncv} must exceed k={k} (or be >= n={n})")
    wd, dev = work_dtype(op.dtype), op.device
    nl = op.vector_length  # n, or this rank's slice of vectors split across ranks
    B0 = init_rows(init, nl, wd, dev, "lanczos") if init is not None else None
    n_init = 0 if B0 is None else B0.shape[0]
    minimum = 2 * k + n_init
    if max_matvecs is None:
        max_matvecs = (
            max(1000, 50 * ncv, minimum)
            if max_iter is None
            else budget_from_max_iter(max_iter, minimum, k, keep_products, "lanczos")
        )
    elif max_iter is not None:
        raise ValueError(
            "lanczos: give max_iter (Lanczos steps) or max_matvecs (all products), not both"
        )
    max_matvecs = positive_int(max_matvecs, "max_matvecs", "lanczos")
    if max_matvecs < minimum:
        raise ValueError(
            f"lanczos: max_matvecs={max_matvecs} is too small; it needs at least 2*k"
            + (" + the init vectors" if n_init else "")
            + f" = {minimum}"
        )
    gen = make_generator(op.common_seed(seed), dev)
    with product_bar(progress, max_matvecs, "lanczos", expected=ncv + 2 * k) as on_products:
        apply = BlockApply(op, wd, on_products, rescale=True)
        res = _lanczos(
            apply, nl, k, which, tol, ncv, max_matvecs, B0, gen, keep_products, bool(check)
        )
    return log_eigen("lanczos", res, ncv=ncv, budget=max_matvecs)


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
    keep_products: bool = True,
    multiplicity_check: bool = True,
) -> EigenResult:
    wd, dev = apply.wd, apply.op.device

    def search(starts: Tensor | None, pool: Pool, need: int, scale: float, stop_at: int):
        if starts is None:
            v0 = gaussian(1, n, gen, dtype=wd, device=dev)[0]
        else:  # one vector that holds every start row
            v0 = (starts / norm64(starts, dim=1).to(starts.dtype)[:, None]).sum(0)
        return thick_restart(
            apply,
            v0,
            locked=pool.X if len(pool) else None,
            nwant=need,
            which=which,
            tol=tol,
            m_max=max(ncv - len(pool), need + 8),
            stop_at=stop_at,
            generator=gen,
            scale=scale,
            keep_products=keep_products,
        )

    def check(pool: Pool, kth: float, scale: float, stop_at: int):
        nw = 2 if which == "LM" and dimension(n) - len(pool) >= 2 else 1
        return thick_restart(
            apply,
            gaussian(1, n, gen, dtype=wd, device=dev)[0],
            locked=pool.X,
            nwant=nw,
            which="BE" if which == "LM" else which,
            tol=tol,
            m_max=max(ncv - k, nw + 19),
            stop_at=stop_at,
            generator=gen,
            scale=scale,
            accept=clearly_worse(kth, which, tol),
            keep_products=keep_products,
        )

    solver = Solver(
        "lanczos", search, check, reserve=1, keep_products=keep_products, info={"ncv": ncv}
    )
    return solve(
        apply, solver, n, k, which, tol, max_matvecs, B0, multiplicity_check=multiplicity_check
    )


@dataclass(frozen=True)
class LanczosTridiagonal(Serializable):
    """Output of one plain Lanczos run.

    Attributes:
        alphas: ``(m,)`` float64 diagonal of ``T``.
        betas: ``(m - 1,)`` float64 off-diagonal.
        basis: ``(m, n)`` Lanczos vectors, one per row, in work precision
            (float64 for float64 operators, float32 otherwise).
        last_beta: norm of the residual after the last step (``0`` at breakdown).
        iterations: ``m``, the steps done (fewer than asked at an invariant subspace).
        num_matvecs: products used.

    ``to_dict``/``from_dict`` and ``save``/``load`` as for the other results (the
    basis only with ``include_vectors=True`` or in ``.pt``/``.safetensors`` files).
    """

    _vector_fields = ("basis",)

    alphas: Tensor
    betas: Tensor
    basis: Tensor
    last_beta: float
    iterations: int
    num_matvecs: int

    def matrix(self) -> Tensor:
        """The ``(m, m)`` tridiagonal matrix ``T = V A V^T``."""
        return torch.diag(self.alphas) + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)


@in_vector_space
@keeping_graphs
def lanczos_tridiagonal(
    operator: CurvatureOperator | Tensor,
    v0: Tensor,
    max_iter: int | None = None,
    *,
    reorthogonalize: bool = True,
    backend: LinAlgBackend | None = None,
    num_steps: int | None = None,
) -> LanczosTridiagonal:
    """``max_iter`` Lanczos steps from ``v0``: ``A V^T = V^T T + beta_m v_{m+1} e_m^T``.

    Args:
        operator: a symmetric operator or square tensor.
        v0: ``(n,)`` start vector (normalized here).
        max_iter: steps to take (capped at ``n``; fewer at an invariant subspace).
        reorthogonalize: full reorthogonalization (two passes of classical
            Gram-Schmidt per step). Without it the basis loses orthogonality and
            ``T`` shows ghost copies of converged eigenvalues (Paige 1976).
        backend: ``None`` or the operator's backend.
        num_steps: the former name of ``max_iter`` (deprecated).
    """
    check_backend(backend, "lanczos_tridiagonal", operator)
    op = operator
    if num_steps is not None:
        warnings.warn(
            "lanczos_tridiagonal: num_steps is deprecated; pass max_iter",
            DeprecationWarning,
            stacklevel=3,
        )
        if max_iter is not None:
            raise ValueError("lanczos_tridiagonal: give max_iter (num_steps is its old name)")
        max_iter = num_steps
    if max_iter is None:
        raise TypeError("lanczos_tridiagonal() needs max_iter, the number of Lanczos steps")
    num_steps = max_iter
    op = symmetric_operator(op, "lanczos_tridiagonal")
    num_steps = positive_int(num_steps, "max_iter", "lanczos_tridiagonal")
    n, wd = op.vector_length, work_dtype(op.dtype)
    if not isinstance(v0, Tensor) or v0.shape != (n,):
        got = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
        raise ValueError(f"lanczos_tridiagonal: v0 must have shape ({n},), got {got}")
    v = v0.detach().to(device=op.device, dtype=wd)
    if float(norm64(v)) == 0:
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


LanczosTridiag = LanczosTridiagonal
"""The name hessian-eigenthings gives :class:`LanczosTridiagonal`."""
