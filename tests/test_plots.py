"""Plot functions write images headless (checked by size and pixel dimensions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra import (
    CurvatureRecord,
    block_spectra,
    lanczos,
    spectral_density,
    supervised_loss,
)
from hessian_spectra.landscape import loss_landscape
from hessian_spectra.plots import (
    plot_block_spectra,
    plot_density,
    plot_eigenvalues,
    plot_landscape,
    plot_tracking,
)
from reference import sym_matrix_with_spectrum

mpimg = pytest.importorskip("matplotlib.image")


def _check_png(path, width, height):
    assert path.exists() and path.stat().st_size > 5_000
    img = mpimg.imread(path)
    assert img.shape[:2] == (height, width)
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def test_result_plots(tmp_path):
    spec = torch.cat([torch.linspace(0.0, 1.0, 60), torch.tensor([20.0, 35.0])]).double()
    A = sym_matrix_with_spectrum(spec, seed=0)
    dens = spectral_density(A, num_runs=3, lanczos_steps=30, num_grid_points=400, seed=0)
    eig = lanczos(A, k=3, which="LA", seed=0)
    _check_png(plot_density(dens, tmp_path / "d.png", markers=eig.eigenvalues.tolist()), 1100, 420)
    _check_png(plot_eigenvalues(eig, tmp_path / "e.png"), 600, 400)
    hist = [
        CurvatureRecord(s, [3.0 - 0.1 * s, 1.0], [1e-9, 1e-9], True, 30, 0.1, s > 0, 10.0 + s, 0.1)
        for s in range(4)
    ]
    _check_png(plot_tracking(hist, tmp_path / "t.png"), 700, 400)


def test_block_and_landscape_plots(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = [(torch.randn(10, 4, generator=g, dtype=torch.float64), torch.arange(10) % 3)]
    loss = supervised_loss(F.cross_entropy)
    bs = block_spectra(model, data, loss, k=2, trace_matvecs=5)
    _check_png(plot_block_spectra(bs, tmp_path / "b.png"), 500, 420)
    one = loss_landscape(model, data, loss, dims=1, span=0.5, steps=9, progress=False)
    _check_png(plot_landscape(one, tmp_path / "l1.png"), 600, 450)
    two = loss_landscape(model, data, loss, dims=2, directions="random", steps=6, progress=False)
    _check_png(plot_landscape(two, tmp_path / "l2.png"), 600, 450)
