"""``eigenpairs``: extreme eigenpairs by the solver a fixed rule picks for the operator.

Both solvers return the same guarantees (true residuals below ``tol``, honest
``converged`` flags); they differ in how they spend products:
:func:`~hessian_spectra.algorithms.lanczos.lanczos` one vector per product,
:func:`~hessian_spectra.algorithms.block.block_lanczos` ``b`` vectors per
``matmat``. A block run needs more products (about ``gamma(b, k)`` times those of
``lanczos``, measured, :data:`PRODUCT_RATIO`), so it pays only where a block of
``b`` products costs far less than ``b`` single ones.

``method="auto"`` decides from the operator and the arguments alone, never from
timings, so the same call picks the same solver and block size on every run
whatever the machine's load. The operator states what a row of a block adds to
its cost (:attr:`~hessian_spectra.operators.base.CurvatureOperator.block_row_cost`
``r``: a block of ``b`` costs ``1 + r (b - 1)`` single products); the estimated
time of a block run relative to ``lanczos`` is then

.. math::

    \\gamma(b, k) \\, \\frac{1 + r (b - 1)}{b}

for ``b = 2, 4, 8`` (at most ``n``), and the smallest wins if it is below 0.8
(so an operator whose blocks are merely as cheap per vector as single products
stays on the single-vector path). An operator that states no cost gets
``lanczos``: blocks are chosen only where they are known to be cheaper per
vector. None of the library's model operators states one before its first
product: on the CPU a block of 8 Hessian products was not cheaper per vector than
8 single ones at realistic sizes (``docs/benchmarks.md``), and by default their
rows loop (:mod:`~hessian_spectra.operators._mechanism`), so ``auto`` runs
``lanczos`` for them; ``method="block"`` asks for blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from hessian_spectra.algorithms._common import (
    in_vector_space,
    logger,
    positive_int,
    symmetric_operator,
)
from hessian_spectra.algorithms._literals import EigenMethod, Which
from hessian_spectra.algorithms._random import Seed
from hessian_spectra.algorithms.block import block_lanczos
from hessian_spectra.algorithms.lanczos import _check_which, lanczos
from hessian_spectra.algorithms.results import EigenResult
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["AUTO_MAX_BLOCK", "PRODUCT_RATIO", "blocks_cannot_pay", "choose", "eigenpairs"]

_METHODS = ("auto", "lanczos", "block")

AUTO_MAX_BLOCK = 8
"""The widest block ``method="auto"`` considers."""

PRODUCT_RATIO: dict[int, dict[int, float]] = {
    1: {2: 0.93, 4: 1.44, 8: 2.41, 16: 4.14},
    5: {2: 0.96, 4: 1.39, 8: 2.13, 16: 3.61},
    10: {2: 0.92, 4: 1.31, 8: 1.98, 16: 3.05},
    20: {2: 0.93, 4: 1.21, 8: 1.65, 16: 2.46},
}
"""``gamma(b, k)``: products of ``block_lanczos(block_size=b)`` over those of
``lanczos``, both with their defaults (``tol=1e-6``, products kept), top-k; mean of
two seeds on the float64 Hessians of the benchmark's 11k-parameter MLP and causal
transformer LM (``python bench/product_ratio.py``). Rows ``k``, columns ``b``; a
``k`` between rows uses the row below it."""

_MARGIN = 0.8  # a block must be estimated this much faster to be chosen


def _ratio_row(k: int) -> dict[int, float]:
    return PRODUCT_RATIO[max(r for r in PRODUCT_RATIO if r <= k)]


def _check_row_cost(row_cost: Any) -> float | None:
    if row_cost is None:
        return None
    if isinstance(row_cost, bool) or not isinstance(row_cost, int | float):
        raise TypeError(
            f"an operator's block_row_cost must be a number or None, got {type(row_cost).__name__}"
        )
    if not (math.isfinite(row_cost) and row_cost >= 0):
        raise ValueError(
            f"an operator's block_row_cost must be a finite number >= 0 (what a row adds to a "
            f"block's cost, relative to one product on its own), got {row_cost!r}"
        )
    return float(row_cost)


def choose(row_cost: float | None, k: int, n: int) -> dict[str, Any]:
    """The solver ``method="auto"`` runs, from the operator's stated row cost.

    ``row_cost`` ``r``: what each row adds to a block's cost, relative to one product
    on its own (a block of ``b`` costs ``1 + r (b - 1)`` products); ``None``: not
    known. Returns ``"chosen"`` (``"lanczos"`` or ``"block"``), ``"block_size"``
    (``None`` for ``lanczos``), ``"block_row_cost"`` and ``"estimated_time_ratio"``
    (per block size ``b <= min(n, AUTO_MAX_BLOCK)``: ``gamma(b, k) (1 + r (b - 1)) / b``,
    a block run's estimated time over ``lanczos``'s; empty without a cost). A block
    is chosen only when its estimate is below 0.8.
    """
    est: dict[int, float] = {}
    if row_cost is not None:
        ratios = _ratio_row(k)
        est = {
            b: ratios[b] * (1.0 + row_cost * (b - 1)) / b
            for b in sorted(ratios)
            if b <= min(n, AUTO_MAX_BLOCK)
        }
    best = min(est, key=lambda b: est[b]) if est else None
    chosen = "block" if best is not None and est[best] < _MARGIN else "lanczos"
    return {
        "chosen": chosen,
        "block_size": best if chosen == "block" else None,
        "block_row_cost": row_cost,
        "estimated_time_ratio": {str(b): v for b, v in est.items()},
    }


def blocks_cannot_pay(row_cost: float | None, k: int, n: int) -> bool:
    """Whether no block size is estimated at least 20% faster than ``lanczos`` at this
    row cost (:func:`choose`); ``True`` when the cost is unknown."""
    return choose(row_cost, k, n)["chosen"] == "lanczos"


@in_vector_space
@keeping_graphs
def eigenpairs(
    operator: CurvatureOperator | torch.Tensor,
    k: int = 1,
    *,
    which: Which = "LM",
    method: EigenMethod = "auto",
    tol: float | None = None,
    max_matvecs: int | None = None,
    init: torch.Tensor | None = None,
    seed: Seed = None,
    progress: bool = False,
    keep_products: bool = True,
) -> EigenResult:
    """``k`` extreme eigenpairs by ``lanczos`` or ``block_lanczos``, chosen by a fixed rule.

    Args:
        operator: a symmetric :class:`CurvatureOperator` or a square tensor.
        k: number of eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        method: ``"auto"`` (choose from the operator's stated
            :attr:`~hessian_spectra.operators.base.CurvatureOperator.block_row_cost`
            and ``k``: :func:`choose`; ``lanczos`` when it states none),
            ``"lanczos"`` (single-vector thick-restart Lanczos) or ``"block"``
            (block Lanczos with its default block size).
        tol: relative residual tolerance; default ``max(1e-6, 4 eps(dtype))``.
        max_matvecs: budget of products; default that of the solver chosen.
        init: warm start, ``(n,)`` or ``(j, n)`` (e.g. previous eigenvectors).
        seed: ``int``, ``torch.Generator`` or ``None``.
        progress: show a tqdm bar of products used.
        keep_products: keep the products of the Krylov basis so the true
            residuals need no more products (see :func:`lanczos`).

    Returns:
        The chosen solver's :class:`EigenResult` (``method`` says which ran), the
        same as calling that solver with the same arguments. With
        ``method="auto"``, ``info`` adds what :func:`choose` returned:
        ``"chosen"``, ``"block_size"``, ``"block_row_cost"`` and
        ``"estimated_time_ratio"``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = eigenpairs(A, k=2, seed=0)
        >>> res.info["chosen"], [round(x) for x in res.eigenvalues.tolist()]
        ('lanczos', [100, 99])
    """
    fn = "eigenpairs"
    if method not in _METHODS:
        raise ValueError(
            f"{fn}: method must be 'auto', 'lanczos' or 'block', got {method!r}; 'auto' picks "
            "the solver from the operator's stated block row cost"
        )
    op = symmetric_operator(operator, fn)
    n = op.size
    k = positive_int(k, "k", fn)
    if k > n:
        raise ValueError(f"{fn}: k={k} exceeds operator size n={n}; ask for k <= {n}")
    which = _check_which(which)
    common = dict(
        which=which,
        tol=tol,
        max_matvecs=max_matvecs,
        init=init,
        seed=seed,
        progress=progress,
        keep_products=keep_products,
    )
    if method == "lanczos":
        return lanczos(op, k, **common)  # type: ignore[arg-type]
    if method == "block":
        return block_lanczos(op, k, **common)  # type: ignore[arg-type]
    decision = choose(_check_row_cost(op.block_row_cost), k, n)
    logger.info(
        "%s: block row cost %s; chose %s (block size %s)",
        fn,
        decision["block_row_cost"],
        decision["chosen"],
        decision["block_size"],
    )
    if decision["chosen"] == "lanczos":
        res = lanczos(op, k, **common)  # type: ignore[arg-type]
    else:
        res = block_lanczos(op, k, block_size=decision["block_size"], **common)  # type: ignore[arg-type]
    return dataclasses.replace(res, info={**res.info, **decision})
