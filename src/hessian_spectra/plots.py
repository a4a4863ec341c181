"""Plots of results (Matplotlib, the ``plot`` extra; headless ``Agg`` backend).

Each function writes one figure to ``path`` (PNG or any Matplotlib format) and
returns the path:

- :func:`plot_density`: the SLQ density on a log scale, with a zoom on the bulk
  beside it (linear scale between the 1% and 99% quantiles of the quadrature
  measure), so the bulk shows next to the outliers rather than as a comb of spikes;
- :func:`plot_eigenvalues`: eigenvalues with their true residual norms as error bars;
- :func:`plot_block_spectra`: per-block (per-layer) top eigenvalues and traces;
- :func:`plot_tracking`: the tracker's eigenvalues (and trace) against the step;
- :func:`plot_landscape`: a 1-D loss curve (with the quadratic model for
  eigen-directions) or a 2-D contour plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hessian_spectra.algorithms.results import EigenResult, SpectralDensityResult

__all__ = [
    "plot_block_spectra",
    "plot_density",
    "plot_eigenvalues",
    "plot_landscape",
    "plot_tracking",
]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - plot extra
        raise ImportError("plotting needs matplotlib: pip install 'hessian-spectra[plot]'") from err
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _quantile(nodes: torch.Tensor, w: torch.Tensor, p: float) -> float:
    order = torch.argsort(nodes)
    cdf = torch.cumsum(w[order], 0)
    i = int(torch.searchsorted(cdf, torch.tensor(p, dtype=cdf.dtype)).clamp(max=len(nodes) - 1))
    return float(nodes[order][i])


def plot_density(
    result: SpectralDensityResult,
    path: str | Path,
    *,
    title: str = "Spectral density (SLQ)",
    markers: Sequence[float] = (),
    inset: bool = True,
) -> Path:
    """Log-scale density with a linear-scale zoom on the bulk beside it.

    Args:
        result: from :func:`~hessian_spectra.spectral_density`.
        path: the file to write.
        markers: x positions to mark (e.g. the top eigenvalues from Lanczos).
        inset: add the zoom on the bulk (1%-99% of the spectral mass) as a second panel.
    """
    plt = _pyplot()
    grid = result.grid.double().cpu()
    dens = result.density.double().cpu()
    floor = max(float(dens.max()) * 1e-8, 1e-300) if dens.numel() else 1e-300
    nodes = result.nodes.reshape(-1).double().cpu()
    w = result.weights.reshape(-1).double().cpu()
    zoom = None
    if inset and nodes.numel() > 1 and float(w.sum()) > 0:
        w = w / w.sum()
        lo, hi = _quantile(nodes, w, 0.01), _quantile(nodes, w, 0.99)
        pad = 0.1 * (hi - lo) if hi > lo else max(abs(lo), 1e-12) * 0.1
        keep = (grid >= lo - pad) & (grid <= hi + pad)
        if int(keep.sum()) > 1:
            zoom = keep
    if zoom is None:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    else:
        fig, (ax, sub) = plt.subplots(
            1, 2, figsize=(11, 4.2), dpi=100, gridspec_kw={"width_ratios": [3, 2]}
        )
        sub.plot(grid[zoom].numpy(), dens[zoom].numpy(), lw=1.2, color="tab:green")
        sub.set_title("bulk, 1%-99% of the mass (linear)", fontsize=10)
        sub.set_xlabel("eigenvalue")
        sub.grid(alpha=0.3)
    ax.semilogy(grid.numpy(), dens.clamp_min(floor).numpy(), lw=1.4)
    for m in markers:
        if math.isfinite(m):
            ax.axvline(m, color="tab:red", lw=0.8, alpha=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_eigenvalues(result: EigenResult, path: str | Path, *, title: str = "Eigenvalues") -> Path:
    """Eigenvalues with their residual norms ``||A v - lambda v||`` as error bars.

    Unconverged pairs are drawn as open markers.
    """
    plt = _pyplot()
    lam = result.eigenvalues.double().cpu()
    res = result.residuals.double().cpu()
    ok = result.converged_mask.cpu().bool()
    idx = torch.arange(1, lam.numel() + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.errorbar(idx.numpy(), lam.numpy(), yerr=res.numpy(), fmt="none", ecolor="gray", capsize=3)
    ax.plot(idx[ok].numpy(), lam[ok].numpy(), "o", color="tab:blue", label="converged")
    if bool((~ok).any()):
        ax.plot(
            idx[~ok].numpy(),
            lam[~ok].numpy(),
            "o",
            mfc="none",
            color="tab:red",
            label="not converged",
        )
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue (bars: residual norm)")
    ax.set_title(f"{title} ({result.method}, which={result.which})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_block_spectra(spectra: Any, path: str | Path, *, title: str = "Per-layer spectra") -> Path:
    """Top eigenvalues (dots) and traces (bars, when computed) of each block of a ``BlockSpectra``."""
    plt = _pyplot()
    names = [b.name for b in spectra.blocks]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2), 4.2), dpi=100)
    x = list(range(len(names)))
    for i, b in enumerate(spectra.blocks):
        ev = b.eigenvalues
        ax.plot(
            [i] * len(ev), ev, "o", color="tab:blue", ms=5, label="eigenvalues" if i == 0 else None
        )
    traces = [b.trace.estimate if b.trace is not None else math.nan for b in spectra.blocks]
    if any(math.isfinite(t) for t in traces):
        ax.bar(x, traces, alpha=0.3, color="tab:orange", label="trace")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("value")
    ax.set_title(f"{title} ({spectra.operator})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_tracking(
    history: Sequence[Any], path: str | Path, *, title: str = "Curvature during training"
) -> Path:
    """Eigenvalues (one line per index) of ``CurvatureRecord``s against the step, with the
    stability threshold (``2/lr`` or ``38/lr``, dashed) and Adam's preconditioned sharpness
    where the records carry them (``extra``), and the training loss on the right axis (log
    scale) where recorded, else the trace."""
    plt = _pyplot()
    steps = [r.step for r in history]
    k = max((len(r.eigenvalues) for r in history), default=0)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i in range(k):
        ys = [r.eigenvalues[i] if i < len(r.eigenvalues) else math.nan for r in history]
        ax.plot(steps, ys, "-o", ms=3, label=f"lambda_{i + 1}")

    def extra(key: str) -> list[float]:
        return [float(r.extra.get(key, math.nan)) for r in history]

    if any("preconditioned_lambda_1" in r.extra for r in history):
        ax.plot(steps, extra("preconditioned_lambda_1"), "-s", ms=3, label="lambda_max(P^-1 H)")
    if any("threshold" in r.extra for r in history):
        ax.plot(steps, extra("threshold"), "--", color="black", lw=1, label="stability threshold")
    if any("loss" in r.extra for r in history):
        ax2 = ax.twinx()
        ax2.plot(steps, extra("loss"), ":", color="gray")
        ax2.set_yscale("log")
        ax2.set_ylabel("training loss", color="gray")
    elif any(r.trace is not None for r in history):
        ax2 = ax.twinx()
        ax2.plot(
            steps,
            [r.trace if r.trace is not None else math.nan for r in history],
            "--",
            color="gray",
        )
        ax2.set_ylabel("trace", color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if k:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_landscape(landscape: Any, path: str | Path, *, title: str | None = None) -> Path:
    """A ``LossLandscape``: the 1-D curve (with ``L0 + 1/2 lambda a^2`` for an
    eigen-direction, the linear term left out) or 2-D filled contours."""
    plt = _pyplot()
    a = landscape.coords.double().cpu()
    L = landscape.losses.double().cpu()
    kind = landscape.kind
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    if L.dim() == 1:
        ax.plot(a.numpy(), L.numpy(), "-", lw=1.6, label="loss")
        if landscape.eigenvalues is not None:
            lam = float(landscape.eigenvalues[0])
            q = landscape.center_loss + 0.5 * lam * a**2
            ax.plot(a.numpy(), q.numpy(), ":", color="gray", label=f"quadratic, lambda={lam:.3g}")
        ax.set_xlabel(f"step along direction 1 ({kind})")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        cs = ax.contourf(a.numpy(), a.numpy(), L.T.numpy(), levels=30, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], "r+", ms=10)
        ax.set_xlabel(f"direction 1 ({kind})")
        ax.set_ylabel(f"direction 2 ({kind})")
    ax.set_title(title or f"Loss landscape ({kind} directions)")
    return _save(fig, path)
