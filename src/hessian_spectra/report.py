"""Human-readable summaries and plots of results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from hessian_spectra.algorithms.results import EigenResult, SpectralDensityResult, TraceResult

__all__ = ["density_summary", "format_eigen", "format_trace", "plot_density"]


def format_eigen(result: EigenResult, *, title: str = "eigenvalues") -> str:
    """A table of eigenvalues with their true residuals and convergence flags."""
    lines = [
        f"{title} ({result.method}, which={result.which}, tol={result.tol:.1e}, "
        f"{result.num_matvecs} products, converged={result.converged})",
        f"  {'#':>3}  {'eigenvalue':>14}  {'residual':>10}  ok",
    ]
    for i, (lam, res, ok) in enumerate(
        zip(
            result.eigenvalues.tolist(),
            result.residuals.tolist(),
            result.converged_mask.tolist(),
            strict=True,
        )
    ):
        lines.append(f"  {i + 1:>3}  {lam:>14.6e}  {res:>10.2e}  {'yes' if ok else 'NO'}")
    return "\n".join(lines)


def format_trace(result: TraceResult) -> str:
    """``trace = estimate ± stderr`` with the method and the product count."""
    return (
        f"trace ({result.method}, {result.num_matvecs} products): "
        f"{result.estimate:.6e} ± {result.stderr:.2e} (1 s.e.)"
    )


def density_summary(result: SpectralDensityResult) -> dict[str, Any]:
    """Where the spectral mass lies: range, negative mass, bulk quantiles.

    Quantiles are read off the quadrature measure ``sum_j w_j delta(theta_j)``
    averaged over runs, which estimates the eigenvalue distribution.
    """
    nodes = result.nodes.reshape(-1).double()
    w = result.weights.reshape(-1).double()
    w = w / w.sum()
    order = torch.argsort(nodes)
    nodes, w = nodes[order], w[order]
    cdf = torch.cumsum(w, 0)

    def q(p: float) -> float:
        idx = int(
            torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)).clamp(max=len(nodes) - 1)
        )
        return float(nodes[idx])

    return {
        "min": float(nodes[0]),
        "max": float(nodes[-1]),
        "negative_mass": float(w[nodes < 0].sum()),
        "q05": q(0.05),
        "median": q(0.5),
        "q95": q(0.95),
        "sigma": float(result.sigma),
        "num_runs": int(result.nodes.shape[0]),
        "num_matvecs": int(result.num_matvecs),
    }


def plot_density(
    result: SpectralDensityResult,
    path: str | Path,
    *,
    title: str = "Hessian spectral density (SLQ)",
    log_scale: bool = True,
    markers: list[float] | None = None,
) -> Path:
    """Plot the smoothed density (log scale by default, so the bulk and outliers both show).

    Args:
        result: from :func:`spectral_density`.
        path: the PNG (or any Matplotlib format) to write.
        markers: x positions to mark (e.g. top eigenvalues from Lanczos).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - plot extra
        raise ImportError("plotting needs matplotlib: pip install 'hessian-spectra[plot]'") from err
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    grid = result.grid.double().cpu().numpy()
    dens = result.density.double().cpu().numpy()
    if log_scale:
        floor = max(float(dens.max()) * 1e-8, 1e-300) if dens.size else 1e-300
        ax.semilogy(grid, [max(d, floor) for d in dens], lw=1.5)
    else:
        ax.plot(grid, dens, lw=1.5)
    for m in markers or []:
        if math.isfinite(m):
            ax.axvline(m, color="tab:red", lw=0.8, alpha=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
