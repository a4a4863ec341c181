"""Extreme eigenpairs of a symmetric operator by restarted block Lanczos.

:func:`block_lanczos` grows a block Krylov space from ``b`` vectors at once, so
every product is a ``(b, n)`` block through ``op.matmat`` (one data pass per
block for the Hessian, GGN and Fisher operators), with full reorthogonalization
and thick restart (block Krylov-Schur: Zhou & Saad 2008; engine in
:mod:`._block_krylov`). It stops when every requested pair has

.. math::

    \\|A v_i - \\lambda_i v_i\\| \\le \\mathrm{tol} \\cdot \\max_j |\\lambda_j|,

measured on true residuals: ``A v`` is recomputed for the returned vectors (these
products count) after a Rayleigh-Ritz step on their span. A block of ``b`` random
vectors sees ``b`` copies of a repeated eigenvalue; when the pairs found hold a
cluster of ``b`` or more nearly equal eigenvalues, a fresh random block deflated
against them checks for further copies (as in
:func:`~hessian_spectra.algorithms.lanczos.lanczos`).
"""

from __future__ import annotations

from torch import Tensor

from hessian_spectra.algorithms._block_run import CountingApply, run_block_lanczos
from hessian_spectra.algorithms._common import (
    default_tol,
    in_vector_space,
    log_eigen,
    positive_float,
    positive_int,
    product_bar,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._driver import init_rows
from hessian_spectra.algorithms._literals import Which
from hessian_spectra.algorithms._random import Seed, make_generator
from hessian_spectra.algorithms.lanczos import _check_which
from hessian_spectra.algorithms.results import EigenResult
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["block_lanczos", "default_block_size_for", "default_ncv"]


def default_block_size_for(k: int, n: int) -> int:
    """The default block size: 2 for ``k = 1``, 4 for ``k <= 20``, 8 beyond (at most ``n``).

    Chosen by measurement (docs/algorithms.md, "Block methods and eigenpairs"):
    on the Hessians of a 10k-parameter MLP and a small transformer, a block run
    needs about 0.9-1.0x, 1.2x, 1.6x and 2.4x the products of
    :func:`~hessian_spectra.algorithms.lanczos.lanczos` for ``b = 2, 4, 8, 16`` at
    ``k = 10`` (1.7x already at ``b = 4`` for ``k = 1``), while a block of ``b``
    Hessian products costs about ``a + c b``, the shared forward and backward
    ``a`` being one to three per-vector costs ``c`` on a CPU. These sizes minimise
    the estimated time ``products(b) / b * (a + c b)`` there. A block need not be
    as wide as ``k`` for repeated eigenvalues: clusters as wide as the block are
    checked for further copies.
    """
    b = 2 if k == 1 else 4 if k <= 20 else 8
    return max(1, min(b, n))


def default_ncv(k: int, b: int, n: int) -> int:
    """The default basis size ``min(n, max(3k + 8b, 40))``.

    A thick restart keeps about two thirds of the basis, so a cycle raises the
    Krylov degree by about ``ncv / (3b)``; a basis that allows only two or three
    block steps per cycle needed up to 4x more products on slowly converging
    spectra (the bottom of a dense bulk), measured against this default.
    """
    return min(n, max(3 * k + 8 * b, 40))


@in_vector_space
@keeping_graphs
def block_lanczos(
    operator: CurvatureOperator | Tensor,
    k: int = 1,
    *,
    which: Which = "LM",
    block_size: int | None = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    init: Tensor | None = None,
    seed: Seed = None,
    progress: bool = False,
    keep_products: bool = True,
) -> EigenResult:
    """``k`` extreme eigenpairs by thick-restart block Lanczos, with true residuals.

    Args:
        operator: a symmetric :class:`CurvatureOperator` or a square tensor.
        k: number of eigenpairs (``1 <= k <= n``).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        block_size: vectors per product block ``b``; default
            2 for ``k = 1``, 4 for ``k <= 20``, 8 beyond
            (:func:`default_block_size_for`); wider blocks suit operators whose
            blocks cost little more than one product (GPUs).
        tol: relative residual tolerance; default ``max(1e-6, 4 eps(dtype))``.
        max_matvecs: budget of products (a block of ``b`` counts ``b``; with
            ``keep_products=False`` the final ``k`` true-residual products
            included); default ``max(2000, 50 * ncv)``.
        ncv: largest basis (rows); default ``min(n, max(3k + 8b, 40))``
            (:func:`default_ncv`). Peak memory about ``2 (ncv + b) + k`` vectors
            of length ``n`` in work precision (``ncv + 2b + k`` with
            ``keep_products=False``).
        init: warm start, a ``(n,)`` vector or a ``(j, n)`` block (e.g. the
            eigenvectors of a previous call): pairs of its span that already meet
            ``tol`` are kept; the others start the block.
        seed: ``int``, ``torch.Generator`` or ``None`` (fresh entropy).
        progress: show a tqdm bar of products used.
        keep_products: keep the products ``A V`` of the basis, so the true
            residuals of the answer come from products already done; ``False``
            recomputes ``A x`` for the returned vectors (``k`` more products,
            about half the memory).

    Returns:
        :class:`EigenResult` with ``method="block_lanczos"``, eigenvalues
        (float64, most wanted first), eigenvectors ``(k, n)`` in the operator
        dtype, true ``residuals``, ``converged``. ``info`` holds ``"block_size"``,
        ``"ncv"``, ``"blocks"`` (``matmat`` calls), ``"matvecs"`` (products spent
        on the search, the multiplicity check and the true residuals),
        ``"verified"``, ``"verification_rounds"``, ``"stagnated"`` and
        ``"scale"``. A budget that runs out, or true residuals that stop
        decreasing above ``tol``, give ``converged=False`` and a
        :class:`ConvergenceWarning`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = block_lanczos(A, k=3, seed=0)
        >>> [round(x) for x in res.eigenvalues.tolist()]
        [100, 99, 98]
    """
    fn = "block_lanczos"
    op = symmetric_operator(operator, fn)
    n = op.size
    k = positive_int(k, "k", fn)
    if k > n:
        raise ValueError(f"{fn}: k={k} exceeds operator size n={n}; ask for k <= {n}")
    which = _check_which(which)
    b = (
        default_block_size_for(k, n)
        if block_size is None
        else min(positive_int(block_size, "block_size", fn), n)
    )
    tol = default_tol(op.dtype) if tol is None else positive_float(tol, "tol", fn)
    if ncv is None:
        ncv = default_ncv(k, b, n)
    else:
        ncv = min(positive_int(ncv, "ncv", fn), n)
        if ncv < k + 2 * b and ncv < n:
            raise ValueError(
                f"{fn}: ncv={ncv} must be at least k + 2 * block_size = {k + 2 * b} (or >= n={n})"
            )
    wd, dev = work_dtype(op.dtype), op.device
    nl = op.vector_length  # n, or this rank's slice of vectors split across ranks
    B0 = init_rows(init, nl, wd, dev, fn) if init is not None else None
    n_init = 0 if B0 is None else B0.shape[0]
    minimum = k + max(b, n_init) + n_init  # the init's Rayleigh-Ritz step, then one block
    if max_matvecs is None:
        max_matvecs = max(2000, 50 * ncv, minimum)
    max_matvecs = positive_int(max_matvecs, "max_matvecs", fn)
    if max_matvecs < minimum:
        raise ValueError(
            f"{fn}: max_matvecs={max_matvecs} is too small; it needs at least k + block_size"
            + (" + 2 * the init vectors" if n_init else "")
            + f" = {minimum}"
        )
    gen = make_generator(op.common_seed(seed), dev)
    with product_bar(progress, max_matvecs, fn, expected=ncv + 2 * k) as on_products:
        apply = CountingApply(op, wd, on_products, rescale=True)
        res = run_block_lanczos(
            apply, nl, k, which, tol, b, ncv, max_matvecs, B0, gen, keep_products=keep_products
        )
    return log_eigen(fn, res, block_size=b, ncv=ncv, budget=max_matvecs)
