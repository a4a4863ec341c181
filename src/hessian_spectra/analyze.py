"""One call for a user's model: spectra, trace, density, per-layer spectra, landscape, report.

:func:`analyze` is what ``hessian-spectra analyze`` runs: it builds the curvature
operator, computes what was asked for, and (with ``out_dir``) writes
``report.json`` (every result; :meth:`AnalysisReport.load` reads it back), PNG
plots and ``report.md``, the page to read first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hessian_spectra.algorithms._codec import Serializable
from hessian_spectra.algorithms.density import spectral_density
from hessian_spectra.algorithms.lanczos import lanczos
from hessian_spectra.algorithms.results import EigenResult, SpectralDensityResult, TraceResult
from hessian_spectra.algorithms.trace import trace as trace_fn
from hessian_spectra.blocks import BlockSpectra, block_spectra
from hessian_spectra.landscape import LossLandscape, loss_landscape
from hessian_spectra.operators.base import CurvatureOperator

__all__ = ["AnalysisReport", "analyze"]

logger = logging.getLogger("hessian_spectra")

OperatorKind = Literal["hessian", "ggn", "fisher"]


@dataclass(frozen=True, eq=False)
class AnalysisReport(Serializable):
    """What :func:`analyze` computed (``None`` where not asked for).

    Attributes:
        operator: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        num_params: the operator's dimension.
        top: the ``top_k`` largest (algebraic) eigenpairs.
        bottom: the ``bottom_k`` smallest (algebraic) eigenpairs.
        trace: the trace (exact when ``num_params <= trace_matvecs``, else Hutch++).
        density: the SLQ spectral density.
        per_layer: per-module top eigenvalues and traces.
        landscape: the 1-D loss curve along the top eigenvector.
        info: settings, timings, versions and the files written.
    """

    operator: str
    num_params: int
    top: EigenResult | None = None
    bottom: EigenResult | None = None
    trace: TraceResult | None = None
    density: SpectralDensityResult | None = None
    per_layer: BlockSpectra | None = None
    landscape: LossLandscape | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        parts = [self.top, self.bottom]
        ok = all(p.converged for p in parts if p is not None)
        return ok and (self.per_layer is None or self.per_layer.converged)


def _operator(
    kind: str,
    model: nn.Module,
    batches: list[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    forward_fn: Callable[[nn.Module, Any], Tensor] | None,
    loss_of_output_fn: Callable[[Tensor, Any], Tensor] | None,
    per_sample_loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    seed: int,
) -> CurvatureOperator:
    if kind == "hessian":
        from hessian_spectra.operators.hessian import HessianOperator

        return HessianOperator(model, batches, loss_fn, seed=seed)
    if kind == "ggn":
        if forward_fn is None or loss_of_output_fn is None:
            raise ValueError(
                "analyze(operator='ggn') needs forward_fn and loss_of_output_fn (e.g. "
                "supervised_forward and cross_entropy_loss_of_output())"
            )
        from hessian_spectra.operators.ggn import GGNOperator

        return GGNOperator(model, batches, forward_fn, loss_of_output_fn, seed=seed)
    if kind == "fisher":
        if per_sample_loss_fn is None:
            raise ValueError(
                "analyze(operator='fisher') needs per_sample_loss_fn (e.g. "
                "supervised_per_sample_loss(F.cross_entropy))"
            )
        from hessian_spectra.operators.fisher import EmpiricalFisherOperator

        return EmpiricalFisherOperator(model, batches, per_sample_loss_fn)
    raise ValueError(f"operator must be 'hessian', 'ggn' or 'fisher', got {kind!r}")


def analyze(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    out_dir: str | Path | None = None,
    *,
    operator: OperatorKind = "hessian",
    top_k: int = 5,
    bottom_k: int = 0,
    trace: bool = True,
    density: bool = False,
    per_layer: bool = False,
    landscape: bool = False,
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    loss_of_output_fn: Callable[[Tensor, Any], Tensor] | None = None,
    per_sample_loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    trace_matvecs: int = 100,
    max_batches: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    plots: bool = True,
) -> AnalysisReport:
    """Analyse the curvature of ``loss_fn`` over ``data`` at ``model``'s parameters.

    Args:
        model: the network (left bit-identical).
        data: iterable of batches (the loss over all of them, weighted by sample count).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        out_dir: where to write ``report.json``, ``report.md`` and the plots
            (nothing is written when ``None``).
        operator: ``"hessian"``, ``"ggn"`` (needs ``forward_fn`` and
            ``loss_of_output_fn``) or ``"fisher"`` (empirical; needs ``per_sample_loss_fn``).
        top_k: largest eigenpairs (0: none).
        bottom_k: smallest eigenpairs (0: none).
        trace: estimate the trace (exact when there are at most ``trace_matvecs`` parameters).
        density: SLQ spectral density.
        per_layer: top eigenvalues and trace of each module's block (Hessian or GGN).
        landscape: the loss along the top eigenvector (a 1-D curve).
        max_batches: use at most this many batches.
        seed: for every random start and probe.
        progress: progress bars (default: on unless ``HESSIAN_SPECTRA_PROGRESS=0``).
        plots: write PNG plots (needs matplotlib) when ``out_dir`` is given.

    Returns:
        An :class:`AnalysisReport`.
    """
    from hessian_spectra.progress import operator_progress, progress_enabled

    t0 = time.perf_counter()
    show = progress_enabled(progress)
    batches = list(islice(iter(data), max_batches)) if max_batches else list(data)
    if not batches:
        raise ValueError("analyze: data gave no batches; pass an iterable of batches")
    for name, v in (("top_k", top_k), ("bottom_k", bottom_k), ("trace_matvecs", trace_matvecs)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"analyze: {name} must be an int >= 0, got {v!r}")
    op = _operator(
        operator, model, batches, loss_fn, forward_fn, loss_of_output_fn, per_sample_loss_fn, seed
    )
    n = op.size
    logger.info("analyze: %s operator, %d parameters, %d batches", operator, n, len(batches))
    timings: dict[str, float] = {}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        timings[key] = time.perf_counter() - t
        return out

    top = bottom = tr = dens = blocks = land = None
    if top_k:
        top = timed(
            "top", lambda: lanczos(op, k=min(top_k, n), which="LA", seed=seed, progress=show)
        )
    if bottom_k:
        bottom = timed(
            "bottom",
            lambda: lanczos(op, k=min(bottom_k, n), which="SA", seed=seed + 1, progress=show),
        )
    if trace:
        method: Literal["exact", "hutch++"] = "exact" if n <= trace_matvecs else "hutch++"
        logger.info("analyze: trace by %s (%d parameters, budget %d)", method, n, trace_matvecs)
        budget = n if method == "exact" else max(trace_matvecs, 3)
        with operator_progress(op, show, total=budget, desc="trace"):
            tr = timed(
                "trace",
                lambda: trace_fn(op, num_matvecs=max(trace_matvecs, 3), method=method, seed=seed),
            )
    if density:
        steps = min(80, n)
        with operator_progress(op, show, total=10 * steps, desc="density"):
            dens = timed(
                "density",
                lambda: spectral_density(
                    op, num_runs=10, lanczos_steps=steps, num_grid_points=2000, seed=seed
                ),
            )
    if per_layer:
        if operator == "fisher":
            raise ValueError("analyze: per_layer supports operator='hessian' or 'ggn'")
        blocks = timed(
            "per_layer",
            lambda: block_spectra(
                model,
                batches,
                loss_fn if operator == "hessian" else None,
                k=min(3, max(top_k, 1)),
                operator=operator,
                forward_fn=forward_fn,
                loss_of_output_fn=loss_of_output_fn,
                seed=seed,
                progress=show,
            ),
        )
    if landscape:
        land = timed(
            "landscape",
            lambda: loss_landscape(
                model,
                batches,
                loss_fn,
                dims=1,
                directions=top.eigenvectors[:1] if top is not None else "eigen",
                span=_span(top),
                steps=41,
                seed=seed,
                progress=show,
            ),
        )
        if top is not None:
            land = LossLandscape(
                coords=land.coords,
                losses=land.losses,
                center_loss=land.center_loss,
                kind="eigen",
                eigenvalues=top.eigenvalues[:1].clone(),
                directions=land.directions,
                info=land.info,
            )
    info: dict[str, Any] = {
        "model": type(model).__name__,
        "num_batches": len(batches),
        "seed": seed,
        "dtype": str(op.dtype),
        "device": str(op.device),
        "seconds": time.perf_counter() - t0,
        "timings": timings,
        "torch": torch.__version__,
    }
    report = AnalysisReport(
        operator=operator,
        num_params=n,
        top=top,
        bottom=bottom,
        trace=tr,
        density=dens,
        per_layer=blocks,
        landscape=land,
        info=info,
    )
    if out_dir is not None:
        from hessian_spectra.report_md import write_report

        write_report(report, Path(out_dir), plots=plots)
    return report


def _span(top: EigenResult | None) -> float:
    """Coordinates where the quadratic term reaches ~1 loss unit: ``sqrt(2 / lambda_1)``, in [1e-3, 1]."""
    if top is None or top.eigenvalues.numel() == 0:
        return 1.0
    lam = float(top.eigenvalues[0])
    if not math.isfinite(lam) or lam <= 0:
        return 1.0
    return float(min(1.0, max(1e-3, math.sqrt(2.0 / lam))))
