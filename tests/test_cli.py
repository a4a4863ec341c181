"""The command line and the demo (small settings so the test stays quick)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from hessian_spectra import density_summary, format_eigen, spectral_density
from hessian_spectra.cli import app
from hessian_spectra.demo import run_demo
from hessian_spectra.operators import DenseOperator
from reference import sym_matrix_with_spectrum


def test_info_and_help() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["info"])
    assert (
        out.exit_code == 0 and "hessian-spectra" in out.stdout and torch.__version__ in out.stdout
    )
    out = runner.invoke(app, ["demo", "--help"])
    assert out.exit_code == 0 and "--seed" in out.stdout


def test_demo_reports_converged_verified_numbers(tmp_path) -> None:
    lines: list[str] = []
    rep = run_demo(
        tmp_path,
        k=3,
        train_steps=40,
        trace_matvecs=60,
        density_runs=4,
        density_steps=30,
        echo=lines.append,
    )
    assert (tmp_path / "density.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "report.json").read_text())
    eig = saved["top_eigenvalues"]
    assert eig["converged"] and len(eig["eigenvalues"]) == 3
    # reported residuals are true residuals below the tolerance the result states
    assert max(eig["residuals"]) <= eig["tol"] * max(abs(v) for v in eig["eigenvalues"])
    assert eig["eigenvalues"] == sorted(eig["eigenvalues"], reverse=True)
    tr = saved["trace"]
    assert tr["stderr"] > 0 and tr["estimate"] > eig["eigenvalues"][0]
    assert rep["density_summary"]["max"] >= eig["eigenvalues"][0] * (1 - 1e-3)
    assert any("top-3 Hessian eigenvalues" in line for line in lines)
    # the demo's own check: Lanczos and Hutch++ against eigvalsh of the dense Hessian
    assert saved["dense_check"]["max_rel_error_top_k"] < 1e-6
    assert abs(saved["dense_check"]["trace_z_score"]) < 5


def test_density_summary_quantiles_on_a_known_spectrum() -> None:
    eigs = torch.linspace(-1.0, 3.0, 200, dtype=torch.float64)
    op = DenseOperator(sym_matrix_with_spectrum(eigs, seed=3))
    d = spectral_density(op, num_runs=32, lanczos_steps=60, seed=0)
    s = density_summary(d)
    assert abs(s["min"] - (-1.0)) < 1e-6 and abs(s["max"] - 3.0) < 1e-6
    # a quarter of a uniform spectrum on [-1, 3] is negative; the median is near 1
    assert abs(s["negative_mass"] - 0.25) < 0.08
    assert abs(s["median"] - 1.0) < 0.3


def test_format_eigen_flags_unconverged_pairs() -> None:
    from hessian_spectra import lanczos

    op = DenseOperator(sym_matrix_with_spectrum(torch.linspace(1, 2, 300), seed=0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lanczos(op, k=3, max_matvecs=8, seed=0)
    text = format_eigen(res)
    assert "converged=False" in text and "NO" in text
