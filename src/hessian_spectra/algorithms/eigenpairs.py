"""``eigenpairs``: extreme eigenpairs by whichever solver is faster for the operator.

Both solvers return the same guarantees (true residuals below ``tol``, honest
``converged`` flags); they differ in how they spend products:
:func:`~hessian_spectra.algorithms.lanczos.lanczos` one vector per product,
:func:`~hessian_spectra.algorithms.block.block_lanczos` ``b`` vectors per
``matmat``. A block run needs more products (about ``gamma(b, k)`` times those of
``lanczos``, measured, :data:`PRODUCT_RATIO`) but a block of ``b`` products may cost
far less than ``b`` single ones (one shared data pass). ``method="auto"`` times one
single product and one block of up to :data:`PROBE_BLOCK`, models a block of ``b`` as
``a + c b`` from these, and picks the option of least estimated time

.. math::

    T_\\text{lanczos} \\propto a + c, \\qquad
    T_\\text{block}(b) \\propto \\gamma(b, k) \\, \\frac{a + c b}{b},

choosing a block only when it is estimated at least 20% faster (so an operator
whose blocks are merely as cheap per vector as single products, like a small
dense matrix, stays on the single-vector path). An operator that reports after the
probe block what a row of a block costs relative to a row on its own
(:attr:`~hessian_spectra.operators.base.CurvatureOperator.block_row_cost`: ``1.0``
for a Hessian whose rows loop over kept graphs) gets
``lanczos`` at once when ``gamma(b, k)`` times that cost is at least 0.8 for every
``b`` (:func:`blocks_cannot_pay`), without the second timing of the block that a
freshly measured mechanism needs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import Tensor

from hessian_spectra.algorithms._block_run import CountingApply, run_block_lanczos
from hessian_spectra.algorithms._common import (
    default_tol,
    in_vector_space,
    logger,
    orthonormal_rows,
    positive_float,
    positive_int,
    product_bar,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._driver import init_rows
from hessian_spectra.algorithms._literals import EigenMethod, Which
from hessian_spectra.algorithms._random import Seed, gaussian, make_generator
from hessian_spectra.algorithms._space import allreduce_max
from hessian_spectra.algorithms.block import block_lanczos, default_ncv
from hessian_spectra.algorithms.lanczos import _check_which, lanczos
from hessian_spectra.algorithms.results import EigenResult
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["PROBE_BLOCK", "PRODUCT_RATIO", "blocks_cannot_pay", "eigenpairs"]

_METHODS = ("auto", "lanczos", "block")

PROBE_BLOCK = 8
"""Most rows of the block product timed by ``method="auto"`` (its rows start the
block run): ``min(8, max(4, 2k), n)``; a smaller probe for small ``k``, where the
widest blocks rarely pay and the probe is a larger share of the work."""

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


def _timed(apply: Any, V: Tensor) -> tuple[Tensor, float]:
    dev = V.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = apply(V)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def choose(t_single: float, t_block: float, probe: int, k: int, n: int) -> dict[str, Any]:
    """The estimated times of each option from measured product times.

    ``t_single``: one product; ``t_block``: one block of ``probe`` products. Fits
    ``a + c b`` (``c = (t_block - t_single) / (probe - 1)``, ``a = t_single - c``,
    both clipped at 0) and returns the option of least estimated time
    (``"lanczos"`` or ``"block"``), its block size and the estimates relative to
    ``lanczos``.
    """
    c = max(0.0, (t_block - t_single) / max(probe - 1, 1))
    a = max(0.0, t_single - c)
    unit = max(a + c, 1e-300)
    est = {
        b: _ratio_row(k)[b] * (a + c * b) / (b * unit)
        for b in sorted(_ratio_row(k))
        if b <= min(n, probe)
    }
    best = min(est, key=lambda b: est[b]) if est else None
    chosen = "block" if best is not None and est[best] < _MARGIN else "lanczos"
    return {
        "chosen": chosen,
        "block_size": best if chosen == "block" else None,
        "cost_ratio": t_block / (probe * t_single) if t_single > 0 else float("nan"),
        "estimated_time_ratio": {str(b): v for b, v in est.items()},
        "t_single_s": t_single,
        "t_block_s": t_block,
        "probe_block": probe,
    }


def blocks_cannot_pay(row_cost: float | None, probe: int, k: int, n: int) -> bool:
    """Whether no block size up to ``probe`` can be estimated at least 20% faster than
    ``lanczos`` when a row of a block costs ``row_cost`` times a row on its own
    (``gamma(b, k) * row_cost >= 0.8`` for every ``b``); ``False`` when the cost is
    unknown."""
    if row_cost is None:
        return False
    sizes = [b for b in _ratio_row(k) if b <= min(n, probe)]
    return all(_ratio_row(k)[b] * row_cost >= _MARGIN for b in sizes)


@in_vector_space
@keeping_graphs
def eigenpairs(
    operator: CurvatureOperator | Tensor,
    k: int = 1,
    *,
    which: Which = "LM",
    method: EigenMethod = "auto",
    tol: float | None = None,
    max_matvecs: int | None = None,
    init: Tensor | None = None,
    seed: Seed = None,
    progress: bool = False,
    keep_products: bool = True,
) -> EigenResult:
    """``k`` extreme eigenpairs by ``lanczos`` or ``block_lanczos``, whichever is faster.

    Args:
        operator: a symmetric :class:`CurvatureOperator` or a square tensor.
        k: number of eigenpairs.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        method: ``"auto"`` (time the operator's products and choose),
            ``"lanczos"`` (single-vector thick-restart Lanczos) or ``"block"``
            (block Lanczos with its default block size).
        tol: relative residual tolerance; default ``max(1e-6, 4 eps(dtype))``.
        max_matvecs: budget of products, the probe's included; default that of
            the solver chosen.
        init: warm start, ``(n,)`` or ``(j, n)`` (e.g. previous eigenvectors).
        seed: ``int``, ``torch.Generator`` or ``None``.
        progress: show a tqdm bar of products used.
        keep_products: keep the products of the Krylov basis so the true
            residuals need no more products (see :func:`lanczos`).

    Returns:
        The chosen solver's :class:`EigenResult` (``method`` says which ran).
        With ``method="auto"``, ``num_matvecs`` includes the probe products and
        ``info`` adds ``"chosen"`` (``"lanczos"`` or ``"block"``),
        ``"cost_ratio"`` (measured time of a block of ``probe_block`` products
        over ``probe_block`` single ones), ``"estimated_time_ratio"`` (per block
        size, estimated block time over lanczos time), ``"t_single_s"``,
        ``"t_block_s"``, ``"probe_matvecs"`` and ``"block_row_cost"`` (what the
        operator reported after the probe block that a row of a block costs
        relative to a row on its own, or ``None``; see
        :attr:`~hessian_spectra.operators.base.CurvatureOperator.block_row_cost`).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = eigenpairs(A, k=2, seed=0)
        >>> res.info["chosen"] in ("lanczos", "block"), [round(x) for x in res.eigenvalues.tolist()]
        (True, [100, 99])
    """
    fn = "eigenpairs"
    if method not in _METHODS:
        raise ValueError(
            f"{fn}: method must be 'auto', 'lanczos' or 'block', got {method!r}; 'auto' times the "
            "operator's single and block products and picks the faster solver"
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
        progress=progress,
        keep_products=keep_products,
    )
    if method == "lanczos":
        return lanczos(op, k, seed=seed, **common)  # type: ignore[arg-type]
    if method == "block":
        return block_lanczos(op, k, seed=seed, **common)  # type: ignore[arg-type]
    tol = default_tol(op.dtype) if tol is None else positive_float(tol, "tol", fn)
    wd, dev = work_dtype(op.dtype), op.device
    nl = op.vector_length  # n, or this rank's slice of vectors split across ranks
    B0 = init_rows(init, nl, wd, dev, fn) if init is not None else None
    gen = make_generator(op.common_seed(seed), dev)
    n_init = 0 if B0 is None else B0.shape[0]
    warm_probe = n_init >= 2  # time the warm start's own products
    probe = n_init if warm_probe else min(PROBE_BLOCK, max(4, 2 * k), n)
    probe_cost = (
        probe + (1 if warm_probe else 2) + (probe if "auto" in op.product_mechanisms else 0)
    )
    if max_matvecs is not None:
        max_matvecs = positive_int(max_matvecs, "max_matvecs", fn)
        minimum = probe_cost + 2 * k + n_init + probe
        if max_matvecs < minimum:
            raise ValueError(
                f"{fn}: max_matvecs={max_matvecs} is too small for method='auto', which spends "
                f"{probe_cost} products timing the operator; it needs at least {minimum} "
                "(or pick method='lanczos' or 'block')"
            )
    apply = CountingApply(op, wd, rescale=True)
    AB0: Tensor | None = None
    X0: Tensor | None = None
    AX0: Tensor | None = None
    hopeless = False
    if warm_probe:
        assert B0 is not None
        tuning = op.product_mechanisms
        AB0, tb = _timed(apply, B0)
        row_cost = op.block_row_cost
        hopeless = blocks_cannot_pay(row_cost, probe, k, n)
        if not hopeless and op.product_mechanisms != tuning:  # it measured its mechanism
            _, tb = _timed(apply, B0)
        _, t1 = _timed(apply, B0[:1])
    else:
        X0 = orthonormal_rows(gaussian(probe, nl, gen, dtype=wd, device=dev))
        _, t1 = _timed(apply, X0[:1])  # also warms up caches
        tuning = op.product_mechanisms
        AX0, tb = _timed(apply, X0)
        row_cost = op.block_row_cost
        hopeless = blocks_cannot_pay(row_cost, probe, k, n)
        if not hopeless:
            if op.product_mechanisms != tuning:  # the block measured its mechanism: time it again
                _, tb = _timed(apply, X0)
            _, t1b = _timed(apply, X0[1:2])
            t1 = min(t1, t1b) if probe > 1 else t1
    # ranks sharing sliced vectors decide together (on the slowest rank's timings)
    t1, tb = allreduce_max(t1), allreduce_max(tb)
    decision = choose(t1, tb, probe, k, n)
    decision["block_row_cost"] = row_cost
    if hopeless:  # no block size could be estimated fast enough at the operator's row cost
        decision.update(chosen="lanczos", block_size=None)
    spent = apply.count
    logger.info(
        "%s: one product %.3g s, a block of %d %.3g s; chose %s (block size %s)",
        fn,
        t1,
        probe,
        tb,
        decision["chosen"],
        decision.get("block_size"),
    )
    rest = None if max_matvecs is None else max_matvecs - spent
    if decision["chosen"] == "lanczos":
        res = lanczos(op, k, seed=gen, **{**common, "tol": tol, "max_matvecs": rest})  # type: ignore[arg-type]
    else:
        b = int(decision["block_size"])
        res = _block_from_probe(
            op, apply, k, which, tol, b, rest, B0, AB0, gen, X0, AX0, progress, keep_products
        )
    info = {**res.info, **decision, "probe_matvecs": spent}
    return dataclasses.replace(res, num_matvecs=res.num_matvecs + spent, info=info)


def _block_from_probe(
    op: CurvatureOperator,
    probe_apply: CountingApply,
    k: int,
    which: str,
    tol: float,
    b: int,
    max_matvecs: int | None,
    B0: Tensor | None,
    AB0: Tensor | None,
    gen: torch.Generator,
    X0: Tensor | None,
    AX0: Tensor | None,
    progress: bool,
    keep_products: bool,
) -> EigenResult:
    """``block_lanczos`` reusing the probe's products: its random rows start the Krylov
    space, or the products of the warm start ``B0`` (``AB0``) are not recomputed."""
    n = op.vector_length  # n, or this rank's slice of vectors split across ranks
    ncv = default_ncv(k, b, op.size)
    n_init = 0 if B0 is None else B0.shape[0]
    if max_matvecs is None:
        max_matvecs = max(2000, 50 * ncv, k + b + n_init)
    with product_bar(progress, max_matvecs, "block_lanczos", expected=ncv + 2 * k) as on_products:
        apply = CountingApply(
            op, probe_apply.wd, on_products, rescale=True, factor=probe_apply.decided_factor
        )
        return run_block_lanczos(
            apply,
            n,
            k,
            which,
            tol,
            b,
            ncv,
            max_matvecs,
            B0,
            gen,
            X0=X0[:b] if X0 is not None and B0 is None else None,
            AX0=AX0[:b] if AX0 is not None and B0 is None else None,
            AB0=AB0,
            keep_products=keep_products,
        )
