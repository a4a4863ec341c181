"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v`` and ``m`` Lanczos steps with tridiagonal ``T = S diag(theta) S^T``,
Gauss quadrature gives

.. math::

    v^T f(A) v \\approx \\sum_{j=1}^{m} \\tau_j^2 f(\\theta_j), \\qquad \\tau_j = S_{1j},

exactly for polynomials of degree ``< 2m``. With normalized Rademacher probes
``E[v^T f(A) v] = tr f(A) / n``, so averaging the quadratures of ``R`` runs
estimates the spectral measure ``(1/n) sum_i delta(t - lambda_i)`` (Ubaru, Chen &
Saad 2017; Ghorbani, Krishnan & Xiao 2019 for neural-network Hessians). The
density shown is that measure convolved with a Gaussian of width ``sigma``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import (
    BlockApply,
    positive_float,
    positive_int,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._lanczos_runs import lanczos_runs
from hessian_spectra.algorithms._random import Seed, make_generator, rademacher
from hessian_spectra.algorithms.results import SpectralDensityResult
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["gaussian_density", "spectral_density"]

_BULK = (0.05, 0.95)  # quantiles of the spectral measure that delimit the bulk


def _weighted_quantile(x: Tensor, w: Tensor, q: float) -> float:
    order = torch.argsort(x)
    cw = torch.cumsum(w[order], 0)
    idx = int(torch.searchsorted(cw, q * cw[-1]).clamp(max=x.numel() - 1))
    return float(x[order][idx])


def _default_sigma(nodes: Tensor, weights: Tensor, steps: int) -> tuple[float, float, float]:
    """``(sigma, lo, hi)``: ``sigma = 2 (q95 - q05) / steps`` of the weighted nodes.

    The bulk ``[q05, q95]`` holds 90% of the spectral measure, so a few large
    outliers (weight ``~1/n`` each) neither widen it nor blur the bulk. ``m`` steps
    resolve features of width about ``(q95 - q05) / m``; twice that smooths the
    ripple of the Ritz-value comb and of the probes' sampling noise.
    """
    lo, hi = (_weighted_quantile(nodes, weights, q) for q in _BULK)
    width = hi - lo
    if width <= 0:
        width = float(nodes.max() - nodes.min())
    if width <= 0:
        width = max(float(nodes.abs().max()), 1.0) * 1e-2
    return 2 * width / steps, lo, hi


def _grid(nodes: Tensor, weights: Tensor, sigma: float, points: int) -> Tensor:
    """Sorted grid on which every Gaussian kernel is resolved.

    The intervals ``[theta - 6 sigma, theta + 6 sigma]`` around the nodes are merged,
    and each merged interval gets a uniform grid of spacing at most
    ``min(sigma / 4, span / points)`` (uniform spacing keeps the trapezoidal rule
    exact to ~1e-8 for each kernel inside); ``points`` uniform points cover the gaps.
    """
    live = torch.sort(nodes[weights > 0]).values
    a, b = float(live[0]) - 6 * sigma, float(live[-1]) + 6 * sigma
    h = min(sigma / 4, (b - a) / points)
    parts, cover = [], []
    start, stop = float(live[0]) - 6 * sigma, float(live[0]) + 6 * sigma
    for x in live[1:].tolist():
        if x - 6 * sigma <= stop:
            stop = max(stop, x + 6 * sigma)
            continue
        cover.append((start, stop))
        start, stop = x - 6 * sigma, x + 6 * sigma
    cover.append((start, stop))
    for lo, hi in cover:
        parts.append(torch.linspace(lo, hi, math.ceil((hi - lo) / h) + 1, dtype=torch.float64))
    coarse = torch.linspace(a, b, points, dtype=torch.float64)
    inside = torch.zeros_like(coarse, dtype=torch.bool)
    for lo, hi in cover:
        inside |= (coarse >= lo) & (coarse <= hi)
    parts.append(coarse[~inside])
    return torch.sort(torch.cat(parts)).values


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``(1/R) sum_r sum_j w_rj N(t; theta_rj, sigma^2)`` on ``grid`` (float64, chunked)."""
    x = nodes.reshape(-1).double()
    w = weights.reshape(-1).double() / nodes.shape[0]
    keep = w > 0
    x, w = x[keep], w[keep]
    out = torch.empty_like(grid, dtype=torch.float64)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    step = max(1, 4_000_000 // max(1, x.numel()))
    for s in range(0, grid.numel(), step):
        t = grid[s : s + step, None]
        out[s : s + step] = (torch.exp(-0.5 * ((t - x[None]) / sigma) ** 2) * w[None]).sum(1) * norm
    return out


@keeping_graphs
def spectral_density(
    op: CurvatureOperator | Tensor,
    num_runs: int = 16,
    lanczos_steps: int = 50,
    *,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: Seed = None,
    reorthogonalize: bool = True,
) -> SpectralDensityResult:
    """Stochastic Lanczos quadrature estimate of the spectral density of ``op``.

    All ``num_runs`` runs advance together: each step multiplies one
    ``(num_runs, n)`` block (one ``matmat``, one data pass), and each run is fully
    reorthogonalized against its own basis. Each run's tridiagonal matrix is
    diagonalized in float64; its Ritz values are the quadrature nodes and the
    squared first components of its eigenvectors the weights (each row sums to 1).

    Smoothing: ``sigma`` defaults to ``2 (q95 - q05) / m``. The spread of the middle
    90% of the estimated spectral measure (the bulk) over the number of steps ``m``
    is about the spacing of Ritz values there; twice that smooths their comb and
    the probes' sampling noise (a ripple of about 10% on a flat bulk). It comes
    from the bulk, not the full range, so a few large outlier eigenvalues (weight
    ``~1/n`` each) do not blur the bulk away.

    Grid: non-uniform. Within ``6 sigma`` of any node it is uniform with spacing at
    most ``min(sigma / 4, support / grid_points)``; elsewhere ``grid_points`` points
    spread over the support cover the gaps (where the density is below ``1e-8``
    of its peak). So ``torch.trapezoid(density, grid)`` is 1 to within ~1e-8.

    Args:
        op: a symmetric operator or square tensor.
        num_runs: independent probes ``R``.
        lanczos_steps: steps per run ``m`` (capped at ``n``). Memory:
            ``m * R * n`` numbers in work precision for the bases.
        grid_points: points of the uniform parts of the grid.
        sigma: Gaussian width; default from the bulk as above.
        seed: ``int``, ``torch.Generator`` or ``None``.
        reorthogonalize: full reorthogonalization (default); ``False`` saves the
            memory of the bases at the price of spurious copies of outliers.

    Returns:
        :class:`SpectralDensityResult` with ``nodes``/``weights`` ``(R, m)`` (a run
        that found an invariant subspace early is padded with zero weights),
        ``grid``, ``density``, ``sigma`` and ``num_matvecs = R * m``.
    """
    op = symmetric_operator(op, "spectral_density")
    R = positive_int(num_runs, "num_runs", "spectral_density")
    m = positive_int(lanczos_steps, "lanczos_steps", "spectral_density")
    points = positive_int(grid_points, "grid_points", "spectral_density", minimum=2)
    if sigma is not None:
        sigma = positive_float(sigma, "sigma", "spectral_density")
    n = op.size
    m = min(m, n)
    wd, dev = work_dtype(op.dtype), op.device
    gen = make_generator(seed, dev)
    V0 = rademacher(R, n, gen, dtype=wd, device=dev) / math.sqrt(n)
    apply = BlockApply(op, wd)
    runs = lanczos_runs(apply, V0, m, reorthogonalize=reorthogonalize, keep_basis=False)
    width = runs.alphas.shape[1]
    nodes = torch.zeros(R, width, dtype=torch.float64)
    weights = torch.zeros(R, width, dtype=torch.float64)
    for r in range(R):
        theta, S = torch.linalg.eigh(runs.tridiagonal(r))
        mr = theta.numel()
        nodes[r, :mr], weights[r, :mr] = theta, S[0] ** 2
        nodes[r, mr:] = theta[-1]
    weights /= weights.sum(1, keepdim=True)
    auto_sigma, lo, hi = _default_sigma(nodes.reshape(-1), weights.reshape(-1), width)
    s = sigma if sigma is not None else auto_sigma
    grid = _grid(nodes.reshape(-1), weights.reshape(-1), s, points)
    density = gaussian_density(nodes, weights, grid, s)
    return SpectralDensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
        sigma=s,
        num_matvecs=apply.count,
        operator_size=n,
        info={
            "steps_per_run": runs.lengths.tolist(),
            "bulk_interval": [lo, hi],
            "integral": float(torch.trapezoid(density, grid)),
            "sigma_rule": "given" if sigma is not None else "2 (q95 - q05) / lanczos_steps",
        },
    )
