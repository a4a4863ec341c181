"""Progress bars end at the products used (100%), one switch turns them off; decisions are logged."""

from __future__ import annotations

import logging
import re

import torch

from hessian_spectra import block_lanczos, eigenpairs, lanczos
from reference import sym_matrix_with_spectrum


def _A():
    return sym_matrix_with_spectrum(torch.linspace(-1.0, 5.0, 120, dtype=torch.float64), seed=4)


def _last_bar(err: str) -> str:
    return re.split(r"[\r\n]", err.strip())[-1]


def test_bar_total_is_the_products_used(capsys):
    res = lanczos(_A(), k=2, which="LA", seed=0, progress=True)
    line = _last_bar(capsys.readouterr().err)
    n = res.num_matvecs
    assert "100%" in line and f"{n}/{n}" in line, line
    res = block_lanczos(_A(), k=2, which="LA", seed=0, progress=True)
    line = _last_bar(capsys.readouterr().err)
    assert "100%" in line and f"{res.num_matvecs}/{res.num_matvecs}" in line, line


def test_environment_switch_turns_bars_off(capsys, monkeypatch):
    monkeypatch.setenv("HESSIAN_SPECTRA_PROGRESS", "0")
    lanczos(_A(), k=2, seed=0, progress=True)
    assert capsys.readouterr().err == ""


def test_decisions_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="hessian_spectra"):
        res = lanczos(_A(), k=2, which="LA", seed=0)
        eigenpairs(_A(), k=2, which="LA", seed=0)
    text = caplog.text
    assert "lanczos: k=2 which=LA ncv=20, budget=" in text
    assert f"{res.num_matvecs} products" in text and "converged=True" in text
    assert "eigenpairs: block row cost None; chose lanczos (block size None)" in text, text


def test_operator_progress_counts_products_and_restores(capsys):
    from hessian_spectra import DenseOperator, trace
    from hessian_spectra.progress import operator_progress

    op = DenseOperator(_A())
    with operator_progress(op, True, total=30, desc="trace"):
        res = trace(op, num_matvecs=30, method="hutch++", seed=0)
    line = _last_bar(capsys.readouterr().err)
    assert f"{res.num_matvecs}/{res.num_matvecs}" in line and "100%" in line, line
    assert "_matmat" not in op.__dict__
    torch.testing.assert_close(op.matvec(torch.ones(120, dtype=torch.float64)), _A().sum(1))


def test_block_spectra_bar_counts_blocks(capsys):
    import torch.nn.functional as F
    from torch import nn

    from hessian_spectra import block_spectra, supervised_loss

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2)]
    res = block_spectra(model, data, supervised_loss(F.cross_entropy), k=1, progress=True)
    line = _last_bar(capsys.readouterr().err)
    assert len(res) == 2 and "2/2" in line and "block spectra" in line, line


def test_trace_diagonal_density_and_to_dense_show_their_products(capsys, monkeypatch):
    from hessian_spectra import DenseOperator, diagonal, spectral_density, trace

    A = _A()
    for name, call, total in [
        ("trace", lambda: trace(A, 30, seed=0, progress=True), 30),
        ("trace", lambda: trace(A, method="exact", progress=True), 120),
        ("hutchinson", lambda: __import__("hessian_spectra").hutchinson(A, 12, progress=True), 12),
        ("diagonal", lambda: diagonal(A, 10, seed=0, progress=True), 10),
        ("spectral_density", lambda: spectral_density(A, 3, 20, seed=0, progress=True), 60),
        ("to_dense", lambda: DenseOperator(A).to_dense(progress=True), 120),
    ]:
        call()
        line = _last_bar(capsys.readouterr().err)
        if name != "to_dense":  # a DenseOperator forms nothing: its to_dense shows no bar
            assert line.startswith(name) and f"{total}/{total}" in line, (name, line)
    from hessian_spectra import CurvatureOperator

    CurvatureOperator.to_dense(DenseOperator(A), progress=True)  # the generic one, from products
    assert "120/120" in _last_bar(capsys.readouterr().err)
    trace(A, 30, seed=0)  # off by default
    monkeypatch.setenv("HESSIAN_SPECTRA_PROGRESS", "0")
    trace(A, 30, seed=0, progress=True)
    assert capsys.readouterr().err == ""
