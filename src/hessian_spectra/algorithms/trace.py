"""Stochastic trace and diagonal estimation: Hutchinson, Hutch++, Bekas et al.

All products go through ``op.matmat`` in blocks of ``block_size`` probes, so a
Hessian operator makes one data pass per block rather than per probe. Probe
quadratic forms are accumulated in float32 or float64 (never in the operator's
bf16/fp16). The estimators are unbiased for any square matrix; symmetry is not
needed.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import (
    counts_progress,
    default_block_size,
    gram,
    in_vector_space,
    orthonormal_rows,
    positive_int,
    work_dtype,
)
from hessian_spectra.algorithms._literals import TraceMethod
from hessian_spectra.algorithms._random import Distribution, Seed, make_generator, random_block
from hessian_spectra.algorithms._space import allreduce_sum, sharded
from hessian_spectra.algorithms.results import DiagonalResult, TraceResult
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.operators.base import CurvatureOperator, as_operator, keeping_graphs

__all__ = ["diagonal", "hutch_plus_plus", "hutchinson", "trace"]

_DISTRIBUTIONS = ("rademacher", "gaussian")
_METHODS = ("hutch++", "hutchinson", "exact")


def _check_distribution(distribution: object, fn: str) -> Distribution:
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"{fn}: distribution must be 'rademacher' or 'gaussian', got {distribution!r}"
        )
    return cast(Distribution, str(distribution))


def _blocks(total: int, block_size: int) -> list[int]:
    return [min(block_size, total - s) for s in range(0, total, block_size)]


def _block_size(op: CurvatureOperator, block_size: int | None, total: int, fn: str) -> int:
    if block_size is None:
        return default_block_size(op.size, op.dtype, total)
    return positive_int(block_size, "block_size", fn)


def _matmat_chunks(op: CurvatureOperator, Z: Tensor, block_size: int) -> Tensor:
    """``A Z`` for a work-precision block, in chunks of ``block_size`` rows."""
    wd = Z.dtype
    return torch.cat(
        [
            op.matmat(Z[s : s + block_size].to(op.dtype)).to(wd)
            for s in range(0, Z.shape[0], block_size)
        ]
    )


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.nan
    return mean, se


@in_vector_space
@keeping_graphs
@counts_progress("hutchinson", lambda a, op: a["num_matvecs"] or a["num_samples"])
def hutchinson(
    operator: CurvatureOperator | Tensor,
    num_samples: int = 100,
    *,
    distribution: Distribution = "rademacher",
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
    block_size: int | None = None,
    num_matvecs: int | None = None,
    progress: bool = False,
) -> TraceResult:
    """Hutchinson's trace estimate (Hutchinson 1989).

    .. math::

        \\widehat{\\mathrm{tr}}(A) = \\frac{1}{m} \\sum_{i=1}^{m} z_i^T A z_i,
        \\qquad \\mathbb{E}[z z^T] = I,

    with Rademacher (``+-1``, variance ``2 sum_{i != j} A_ij^2`` per probe, the
    smallest possible) or Gaussian probes. The standard error is the sample
    standard deviation of the ``m`` quadratic forms over ``sqrt(m)``.

    Args:
        operator: an operator or square tensor.
        num_samples: number of probes ``m`` (one product each).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        seed: ``int``, ``torch.Generator`` or ``None``.
        backend: ``None`` or the operator's own backend (:attr:`~CurvatureOperator.backend`).
        block_size: probes per ``matmat`` call; default all that fit in 256 MiB.
        num_matvecs: the same as ``num_samples`` (the name :func:`trace` uses);
            give one of the two.
        progress: a bar of the products (``HESSIAN_SPECTRA_PROGRESS=0`` turns bars off);
            the same for :func:`hutch_plus_plus`, :func:`trace` and :func:`diagonal`.
    """
    check_backend(backend, "hutchinson", operator)
    if num_matvecs is not None:
        if num_samples != 100:
            raise ValueError(
                "hutchinson: num_samples and num_matvecs are the same count; give one of them"
            )
        num_samples = num_matvecs
    op = as_operator(operator)
    m = positive_int(num_samples, "num_samples", "hutchinson")
    distribution = _check_distribution(distribution, "hutchinson")
    b = _block_size(op, block_size, m, "hutchinson")
    gen = make_generator(op.common_seed(seed), op.device)
    wd = work_dtype(op.dtype)
    samples = []
    for size in _blocks(m, b):
        Z = random_block(
            distribution, size, op.vector_length, gen, dtype=op.dtype, device=op.device
        )
        AZ = op.matmat(Z)
        samples.append(allreduce_sum(torch.linalg.vecdot(Z.to(wd), AZ.to(wd)).double()))
    s = torch.cat(samples)
    est, se = _mean_stderr(s)
    return TraceResult(
        estimate=est,
        stderr=se,
        num_matvecs=m,
        operator_size=op.size,
        method="hutchinson",
        samples=s.cpu(),
        info={"distribution": distribution, "block_size": b},
    )


@in_vector_space
@keeping_graphs
@counts_progress("hutch++", lambda a, op: a["num_matvecs"])
def hutch_plus_plus(
    operator: CurvatureOperator | Tensor,
    num_matvecs: int = 99,
    *,
    distribution: Distribution = "rademacher",
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
    block_size: int | None = None,
    progress: bool = False,
) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1).

    With ``m`` products: a sketch ``S`` of ``s = m // 3`` probes gives
    ``Q = orth(A S)``; the trace on ``range(Q)`` is computed exactly with ``s``
    more products and Hutchinson with the remaining ``g = m - 2 s`` probes
    estimates the rest:

    .. math::

        \\widehat{\\mathrm{tr}}(A) = \\mathrm{tr}(Q^T A Q)
            + \\frac{1}{g} \\sum_{i=1}^{g} g_i^T (I - QQ^T) A (I - QQ^T) g_i .

    The error is ``O(1/m)`` instead of Hutchinson's ``O(1/sqrt(m))`` for matrices
    with decaying spectra. The standard error is that of the Hutchinson part
    (the deflated residual), the first term being exact given ``Q``.

    Args:
        operator: an operator or square tensor.
        num_matvecs: total products ``m >= 3``.
        distribution: probe distribution for ``S`` and the ``g_i``.
        seed, backend, block_size: as in :func:`hutchinson`.
    """
    check_backend(backend, "hutch_plus_plus", operator)
    op = as_operator(operator)
    m = positive_int(num_matvecs, "num_matvecs", "hutch_plus_plus")
    if m < 3:
        raise ValueError(
            f"hutch_plus_plus: num_matvecs must be >= 3 (a third for the sketch, a third for "
            f"its exact part, the rest for Hutchinson), got {m}; use hutchinson() for fewer"
        )
    distribution = _check_distribution(distribution, "hutch_plus_plus")
    s = m // 3
    g = m - 2 * s
    n = op.size
    b = _block_size(op, block_size, max(s, g), "hutch_plus_plus")
    gen = make_generator(op.common_seed(seed), op.device)
    wd = work_dtype(op.dtype)
    nl = op.vector_length  # n, or this rank's slice of vectors split across ranks
    S = random_block(distribution, s, nl, gen, dtype=wd, device=op.device)
    AS = _matmat_chunks(op, S, b)
    # (s, n) orthonormal rows
    Q = orthonormal_rows(AS, rtol=1e-12) if sharded() else torch.linalg.qr(AS.T)[0].T.contiguous()
    AQ = _matmat_chunks(op, Q, b)
    exact = float(allreduce_sum(torch.linalg.vecdot(Q, AQ).double()).sum())
    G = random_block(distribution, g, nl, gen, dtype=wd, device=op.device)
    G = G - gram(G, Q).to(wd) @ Q
    AG = _matmat_chunks(op, G, b)
    samples = allreduce_sum(torch.linalg.vecdot(G, AG).double())
    rest, se = _mean_stderr(samples)
    return TraceResult(
        estimate=exact + rest,
        stderr=se,
        num_matvecs=s + Q.shape[0] + g,
        operator_size=n,
        method="hutch++",
        samples=samples.cpu(),
        info={
            "sketch_size": s,
            "hutchinson_probes": g,
            "low_rank_part": exact,
            "distribution": distribution,
            "block_size": b,
        },
    )


def _exact_trace(op: CurvatureOperator, block_size: int | None) -> TraceResult:
    n = op.size
    if op.vector_length != n:
        raise ValueError(
            "trace(method='exact') needs every unit vector of the full space; the operator's "
            "vectors are split across ranks: use method='hutch++' (or the unsharded operator)"
        )
    b = _block_size(op, block_size, n, "trace")
    total = torch.zeros((), dtype=torch.float64, device=op.device)
    for start in range(0, n, b):
        stop = min(n, start + b)
        E = torch.zeros(stop - start, n, dtype=op.dtype, device=op.device)
        idx = torch.arange(stop - start, device=op.device)
        E[idx, idx + start] = 1
        total += op.matmat(E)[idx, idx + start].double().sum()
    return TraceResult(
        estimate=float(total),
        stderr=0.0,
        num_matvecs=n,
        operator_size=n,
        method="exact",
        info={"block_size": b},
    )


@in_vector_space
@keeping_graphs
@counts_progress("trace", lambda a, op: op.size if a["method"] == "exact" else a["num_matvecs"])
def trace(
    operator: CurvatureOperator | Tensor,
    num_matvecs: int = 100,
    *,
    method: TraceMethod = "hutch++",
    distribution: Distribution = "rademacher",
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
    block_size: int | None = None,
    progress: bool = False,
) -> TraceResult:
    """Trace of ``op`` by ``method``: ``"hutch++"`` (default), ``"hutchinson"`` or
    ``"exact"`` (``n`` products with unit vectors; ``num_matvecs`` is ignored).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> trace(A, method="exact").estimate
        55.0
    """
    check_backend(backend, "trace", operator)
    op = as_operator(operator)
    if method not in _METHODS:
        raise ValueError(f"trace: method must be one of {_METHODS}, got {method!r}")
    if method == "exact":
        return _exact_trace(op, block_size)
    if method == "hutchinson":
        return hutchinson(
            op, num_matvecs=num_matvecs, distribution=distribution, seed=seed, block_size=block_size
        )
    return hutch_plus_plus(
        op, num_matvecs, distribution=distribution, seed=seed, block_size=block_size
    )


@in_vector_space
@keeping_graphs
@counts_progress("diagonal", lambda a, op: a["num_matvecs"])
def diagonal(
    operator: CurvatureOperator | Tensor,
    num_matvecs: int = 100,
    *,
    distribution: Distribution = "rademacher",
    seed: Seed = None,
    block_size: int | None = None,
    progress: bool = False,
) -> DiagonalResult:
    """Stochastic estimate of ``diag(A)`` (Bekas, Kokiopoulou, Saad 2007).

    .. math::

        \\hat d = \\Big(\\sum_i z_i \\odot A z_i\\Big) \\oslash \\Big(\\sum_i z_i \\odot z_i\\Big)

    (for Rademacher probes the denominator is ``m``: a plain mean). The standard
    error of each entry is the delta-method one of this ratio,
    ``sqrt(m / (m - 1) * sum_i (a_i - d b_i)^2) / sum_i b_i`` with
    ``a_i = z_i A z_i`` and ``b_i = z_i^2`` entrywise; for Rademacher probes it is the
    sample standard deviation over ``sqrt(m)``.

    Args:
        operator: an operator or square tensor.
        num_matvecs: number of probes ``m`` (``>= 2`` for a standard error).
        distribution, seed, block_size: as in :func:`hutchinson`.
    """
    op = as_operator(operator)
    m = positive_int(num_matvecs, "num_matvecs", "diagonal")
    distribution = _check_distribution(distribution, "diagonal")
    b = _block_size(op, block_size, m, "diagonal")
    gen = make_generator(op.common_seed(seed), op.device)
    wd = work_dtype(op.dtype)
    n = op.vector_length  # this rank's slice of the diagonal for sharded vectors
    sa, sb, saa, sab, sbb = (torch.zeros(n, dtype=wd, device=op.device) for _ in range(5))
    for size in _blocks(m, b):
        Z = random_block(distribution, size, n, gen, dtype=op.dtype, device=op.device)
        a = Z.to(wd) * op.matmat(Z).to(wd)
        bz = Z.to(wd) ** 2
        sa += a.sum(0)
        sb += bz.sum(0)
        saa += (a * a).sum(0)
        sab += (a * bz).sum(0)
        sbb += (bz * bz).sum(0)
    d = sa / sb
    if m > 1:
        sse = (saa - 2 * d * sab + d * d * sbb).clamp_min(0)
        se = torch.sqrt(m / (m - 1) * sse) / sb
    else:
        se = torch.full_like(d, math.nan)
    return DiagonalResult(
        estimate=d,
        stderr=se,
        num_matvecs=m,
        method="hutchinson",
        info={"distribution": distribution, "block_size": b},
    )
