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
import warnings

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import (
    BlockApply,
    counts_progress,
    in_vector_space,
    positive_float,
    positive_int,
    symmetric_operator,
    work_dtype,
)
from hessian_spectra.algorithms._lanczos_runs import lanczos_runs
from hessian_spectra.algorithms._random import Seed, make_generator, rademacher
from hessian_spectra.algorithms.results import SpectralDensityResult
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["gaussian_density", "spectral_density"]

_BULK = (0.05, 0.95)  # quantiles of the spectral measure that delimit the bulk


def _weighted_quantile(x: Tensor, w: Tensor, q: float) -> float:
    order = torch.argsort(x)
    cw = torch.cumsum(w[order], 0)
    idx = int(torch.searchsorted(cw, q * cw[-1]).clamp(max=x.numel() - 1))
    return float(x[order][idx])


def _default_sigma(
    nodes: Tensor, weights: Tensor, steps: int, noise: float
) -> tuple[float, float, float]:
    """``(sigma, lo, hi)``: ``sigma = 2 (q95 - q05) / steps`` of the weighted nodes.

    The bulk ``[q05, q95]`` holds 90% of the spectral measure, so a few large
    outliers (weight ``~1/n`` each) neither widen it nor blur the bulk. ``m`` steps
    resolve features of width about ``(q95 - q05) / m``; twice that smooths the
    ripple of the Ritz-value comb and of the probes' sampling noise.

    A bulk no wider than ``noise`` (the rounding level of the Ritz values) is one
    value, e.g. the zero eigenvalue of a rank-deficient Hessian: the width is then
    that of all the nodes, or ``1e-2 max(|theta|, 1)`` when they are all one value.
    """
    lo, hi = (_weighted_quantile(nodes, weights, q) for q in _BULK)
    width = hi - lo
    if width <= noise:
        width = float(nodes.max() - nodes.min())
    if width <= noise:
        width = max(float(nodes.abs().max()), 1.0) * 1e-2
    return 2 * width / steps, lo, hi


def _resolvable_sigma(nodes: Tensor) -> float:
    """The smallest ``sigma`` a float64 grid resolves around the nodes: ``1e-13 max|theta|``
    (the grid spacing ``sigma / 4`` stays over 100 float64 ulps of the nodes)."""
    return 1e-13 * float(nodes.abs().max())


def _grid(nodes: Tensor, weights: Tensor, sigma: float, points: int) -> Tensor:
    """Sorted grid on which every Gaussian kernel is resolved.

    The intervals ``[theta - 6 sigma, theta + 6 sigma]`` around the nodes are merged,
    and each merged interval gets a uniform grid of spacing at most
    ``min(sigma / 4, span / points)`` (uniform spacing keeps the trapezoidal rule
    exact to ~1e-8 for each kernel inside); ``points`` uniform points cover the gaps,
    and a few points out to ``40 sigma`` beyond each interval keep a narrow kernel's
    tail from adding its ``6 sigma`` value across a wide gap.
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
    # tails: a few points out to 40 sigma (where a kernel is 0 in float64), so a gap of
    # the coarse grid next to a narrow kernel adds no trapezoid of its 6-sigma value
    tails = torch.tensor([7.0, 8.0, 9.0, 10.0, 12.0, 40.0], dtype=torch.float64) * sigma
    for lo, hi in cover:
        parts.append(torch.linspace(lo, hi, math.ceil((hi - lo) / h) + 1, dtype=torch.float64))
        parts += [lo - tails, hi + tails]
    coarse = torch.linspace(a, b, points, dtype=torch.float64)
    inside = torch.zeros_like(coarse, dtype=torch.bool)
    for lo, hi in cover:
        inside |= (coarse >= lo) & (coarse <= hi)
    parts.append(coarse[~inside])
    return torch.sort(torch.cat(parts)).values


def _pad_grid(grid: Tensor, nodes: Tensor, padding: float) -> Tensor:
    """``grid`` extended to ``padding`` times the nodes' range beyond the extreme nodes."""
    lo, hi = float(nodes.min()), float(nodes.max())
    pad = padding * (hi - lo)
    if pad <= 0:
        return grid
    h = float((grid[-1] - grid[0]) / max(grid.numel() - 1, 1))
    parts = [grid]
    if lo - pad < float(grid[0]):
        k = max(2, math.ceil((float(grid[0]) - (lo - pad)) / max(h, 1e-300)) + 1)
        parts.append(
            torch.linspace(lo - pad, float(grid[0]), min(k, 10_000), dtype=grid.dtype)[:-1]
        )
    if hi + pad > float(grid[-1]):
        k = max(2, math.ceil((hi + pad - float(grid[-1])) / max(h, 1e-300)) + 1)
        parts.append(
            torch.linspace(float(grid[-1]), hi + pad, min(k, 10_000), dtype=grid.dtype)[1:]
        )
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


@in_vector_space
@keeping_graphs
@counts_progress("spectral_density", lambda a, op: a["num_runs"] * min(a["lanczos_steps"], op.size))
def spectral_density(
    operator: CurvatureOperator | Tensor,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    num_grid_points: int = 10000,
    sigma: float | None = None,
    grid_padding: float = 0.1,
    seed: Seed = None,
    backend: LinAlgBackend | None = None,
    *,
    reorthogonalize: bool = True,
    return_eigenvectors: bool = False,
    grid_points: int | None = None,
    progress: bool = False,
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

    A bulk narrower than the Ritz values' rounding (``64 eps max|theta|``, eps of
    the operator dtype), as when nearly all eigenvalues are one value (the zeros of
    a rank-deficient Hessian), takes the width of all the nodes instead; ``sigma``
    (given or not) is at least ``1e-13 max|theta|``, which a float64 grid resolves.

    Grid: non-uniform. Within ``6 sigma`` of any node it is uniform with spacing at
    most ``min(sigma / 4, support / grid_points)``; elsewhere ``grid_points`` points
    spread over the support cover the gaps (where the density is below ``1e-8``
    of its peak). So ``torch.trapezoid(density, grid)`` is 1 to within ~1e-8.

    Args:
        operator: a symmetric operator or square tensor.
        num_runs: independent probes ``R``.
        lanczos_steps: steps per run ``m`` (capped at ``n``: ``n`` steps give each
            probe's exact quadrature). Memory:
            ``m * R * n`` numbers in work precision for the bases.
        num_grid_points: points of the uniform parts of the grid (the grid adds
            finer points around the nodes, so it can hold more).
        sigma: Gaussian width; default from the bulk as above.
        grid_padding: the grid reaches at least this fraction of the nodes' range
            beyond the extreme nodes on each side (besides the ``6 sigma`` it always
            covers).
        seed: ``int``, ``torch.Generator`` or ``None``.
        backend: ``None`` or the operator's own backend (:attr:`~CurvatureOperator.backend`).
        reorthogonalize: full reorthogonalization (default); ``False`` saves the
            memory of the bases at the price of spurious copies of outliers.
        return_eigenvectors: also return each run's Ritz vectors
            (``eigenvectors[r]`` is ``(m, n)``, row ``j`` the vector of node
            ``nodes[r, j]``); ``R m n`` numbers of memory.
        grid_points: former name of ``num_grid_points`` (deprecated).
        progress: a bar of the products (``HESSIAN_SPECTRA_PROGRESS=0`` turns bars off).

    Returns:
        :class:`SpectralDensityResult` with ``nodes``/``weights`` ``(R, m)`` (a run
        that found an invariant subspace early is padded with zero weights),
        ``grid``, ``density``, ``sigma`` and ``num_matvecs = R * m``.
    """
    check_backend(backend, "spectral_density", operator)
    if grid_points is not None:
        warnings.warn(
            "spectral_density: grid_points is deprecated; pass num_grid_points",
            DeprecationWarning,
            stacklevel=2,
        )
        num_grid_points = grid_points
    op = symmetric_operator(operator, "spectral_density")
    R = positive_int(num_runs, "num_runs", "spectral_density")
    m = positive_int(lanczos_steps, "lanczos_steps", "spectral_density")
    points = positive_int(num_grid_points, "num_grid_points", "spectral_density", minimum=2)
    if (
        isinstance(grid_padding, bool)
        or not isinstance(grid_padding, int | float)
        or not (math.isfinite(grid_padding) and grid_padding >= 0)
    ):
        raise ValueError(
            f"spectral_density: grid_padding must be a finite number >= 0, got {grid_padding!r}"
        )
    if sigma is not None:
        sigma = positive_float(sigma, "sigma", "spectral_density")
    n = op.size
    m = min(m, n)  # n steps already give each probe's exact quadrature
    wd, dev = work_dtype(op.dtype), op.device
    gen = make_generator(op.common_seed(seed), dev)
    V0 = rademacher(R, op.vector_length, gen, dtype=wd, device=dev) / math.sqrt(n)
    apply = BlockApply(op, wd, rescale=True)  # any scale: Ritz values in the operator's units
    runs = lanczos_runs(
        apply, V0, m, reorthogonalize=reorthogonalize, keep_basis=return_eigenvectors
    )
    width = runs.alphas.shape[1]
    nodes = torch.zeros(R, width, dtype=torch.float64)
    weights = torch.zeros(R, width, dtype=torch.float64)
    vectors: list[Tensor] = []
    for r in range(R):
        theta, S = torch.linalg.eigh(runs.tridiagonal(r))
        mr = theta.numel()
        nodes[r, :mr], weights[r, :mr] = apply.unscale(theta), S[0] ** 2
        nodes[r, mr:] = theta[-1]
        if return_eigenvectors:
            assert runs.basis is not None
            vectors.append((S.T.to(dev, wd) @ runs.basis[:mr, r]).to(op.dtype))
    weights /= weights.sum(1, keepdim=True)
    noise = 64 * torch.finfo(op.dtype).eps * float(nodes.abs().max())
    auto_sigma, lo, hi = _default_sigma(nodes.reshape(-1), weights.reshape(-1), width, noise)
    s = sigma if sigma is not None else auto_sigma
    floor = _resolvable_sigma(nodes)
    if s < floor:
        if sigma is not None:
            warnings.warn(
                f"spectral_density: sigma={sigma:g} is below what a float64 grid resolves at "
                f"eigenvalues of magnitude {float(nodes.abs().max()):.3g}; using sigma={floor:.3g}",
                UserWarning,
                stacklevel=2,
            )
        s = floor
    grid = _pad_grid(_grid(nodes.reshape(-1), weights.reshape(-1), s, points), nodes, grid_padding)
    density = gaussian_density(nodes, weights, grid, s)
    return SpectralDensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=density,
        sigma=s,
        num_matvecs=apply.count,
        operator_size=n,
        eigenvectors=vectors if return_eigenvectors else None,
        info={
            "steps_per_run": runs.lengths.tolist(),
            "bulk_interval": [lo, hi],
            "integral": float(torch.trapezoid(density, grid)),
            "sigma_rule": "given" if sigma is not None else "2 (q95 - q05) / lanczos_steps",
        },
    )
