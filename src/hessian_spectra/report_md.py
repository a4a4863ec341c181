"""Write an :class:`~hessian_spectra.analyze.AnalysisReport` to a folder.

``report.json`` (every result, read back by ``AnalysisReport.load``), PNG plots
(with matplotlib) and ``report.md``: tables of the numbers, the pictures, what
each number means and whether it converged.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["render_markdown", "write_report"]

logger = logging.getLogger("hessian_spectra")


def _fmt(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


def _eigen_table(res: Any) -> list[str]:
    lines = ["| # | eigenvalue | residual ‖Av − λv‖ | converged |", "|---|---|---|---|"]
    for i, (lam, r, ok) in enumerate(
        zip(
            res.eigenvalues.tolist(),
            res.residuals.tolist(),
            res.converged_mask.tolist(),
            strict=True,
        )
    ):
        lines.append(f"| {i + 1} | {_fmt(lam)} | {r:.2e} | {'yes' if ok else '**no**'} |")
    lines.append("")
    lines.append(
        f"{res.method}, {res.num_matvecs} products, tolerance {res.tol:.1e} "
        f"(residual ≤ tol · max|λ|); converged: {'yes' if res.converged else '**no**'}."
    )
    return lines


def render_markdown(report: Any, images: dict[str, str]) -> str:
    """The text of ``report.md`` (``images`` maps a section to its PNG file name)."""
    op = report.operator
    name = {"hessian": "Hessian", "ggn": "generalized Gauss-Newton", "fisher": "empirical Fisher"}
    out = [
        f"# Curvature report: {name.get(op, op)}",
        "",
        f"Model `{report.info.get('model', '?')}`, {report.num_params} parameters, "
        f"{report.info.get('num_batches', '?')} batches, dtype {report.info.get('dtype')}, "
        f"device {report.info.get('device')}, seed {report.info.get('seed')}; "
        f"{report.info.get('seconds', math.nan):.1f} s.",
        "",
        f"**All eigenvalue solves converged: {'yes' if report.converged else 'NO'}.** "
        "Every number below comes with its error information; `report.json` holds them all "
        "(`hessian_spectra.AnalysisReport.load('report.json')`).",
        "",
    ]
    if report.top is not None:
        out += [
            "## Largest eigenvalues",
            "",
            "The sharpest directions of the loss: a large λ₁ means a small step along its "
            "eigenvector changes the loss by about ½λ₁t². The residual is the true "
            "‖Av − λv‖ of each returned pair.",
            "",
            *_eigen_table(report.top),
            "",
        ]
        if "eigenvalues" in images:
            out += [f"![eigenvalues]({images['eigenvalues']})", ""]
    if report.bottom is not None:
        out += [
            "## Smallest eigenvalues",
            "",
            "Negative values are directions of negative curvature (the parameters are not at "
            "a minimum along them).",
            "",
            *_eigen_table(report.bottom),
            "",
        ]
    if report.trace is not None:
        t = report.trace
        se = "exact" if t.method == "exact" else f"± {t.stderr:.2e} (one standard error)"
        out += [
            "## Trace",
            "",
            "The sum of all eigenvalues (the average curvature times the number of parameters).",
            "",
            "| trace | error | method | products |",
            "|---|---|---|---|",
            f"| {_fmt(t.estimate)} | {se} | {t.method} | {t.num_matvecs} |",
            "",
        ]
    if report.density is not None:
        out += [
            "## Spectral density",
            "",
            "Stochastic Lanczos quadrature: where the eigenvalues lie. Log scale, with the "
            "bulk (1%-99% of the mass) zoomed in on the right; red lines mark the top eigenvalues.",
            "",
        ]
        if "density" in images:
            out += [f"![density]({images['density']})", ""]
    if report.per_layer is not None:
        bs = report.per_layer
        out += [
            "## Per layer",
            "",
            "The curvature of each module's parameters alone (the diagonal block of the "
            "matrix), others held fixed.",
            "",
            "| block | size | λ₁ | trace | converged |",
            "|---|---|---|---|---|",
        ]
        for b in bs.blocks:
            lam = b.eigenvalues[0] if b.eigenvalues else math.nan
            tr = b.trace.estimate if b.trace is not None else math.nan
            ok = "yes" if b.eigen.converged else "**no**"
            out.append(f"| `{b.name}` | {b.size} | {_fmt(lam)} | {_fmt(tr)} | {ok} |")
        out.append("")
        if "per_layer" in images:
            out += [f"![per-layer spectra]({images['per_layer']})", ""]
    if report.landscape is not None:
        out += [
            "## Loss landscape",
            "",
            "The loss along the top eigenvector, L(θ + t·v₁); the dotted curve is the quadratic "
            "model L(θ) + ½λ₁t² (the gradient term left out).",
            "",
        ]
        if "landscape" in images:
            out += [f"![loss landscape]({images['landscape']})", ""]
    return "\n".join(out)


def write_report(report: Any, out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, the PNGs and ``report.md`` under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if plots:
        try:
            from hessian_spectra import plots as P

            P._pyplot()
        except ImportError:
            logger.warning("analyze: matplotlib is not installed; no plots written")
        else:
            if report.top is not None:
                P.plot_eigenvalues(report.top, out_dir / "eigenvalues.png")
                images["eigenvalues"] = "eigenvalues.png"
            if report.density is not None:
                marks = report.top.eigenvalues.tolist() if report.top is not None else []
                P.plot_density(report.density, out_dir / "density.png", markers=marks)
                images["density"] = "density.png"
            if report.per_layer is not None:
                P.plot_block_spectra(report.per_layer, out_dir / "per_layer.png")
                images["per_layer"] = "per_layer.png"
            if report.landscape is not None:
                P.plot_landscape(report.landscape, out_dir / "landscape.png")
                images["landscape"] = "landscape.png"
    paths = {"json": report.save(out_dir / "report.json")}
    (out_dir / "report.md").write_text(render_markdown(report, images))
    paths["md"] = out_dir / "report.md"
    paths.update({k: out_dir / v for k, v in images.items()})
    return paths
