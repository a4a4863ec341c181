"""Warm refinement to an eigenvalue-error tolerance (what the tracker runs between checks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hessian_spectra.tracking as tracking
from hessian_spectra import CurvatureTracker, HessianOperator, lanczos
from hessian_spectra.algorithms._refine import refine, temple_estimates

D = torch.float64


def test_temple_estimate_is_the_exact_error_of_a_two_dimensional_rotation():
    # x = cos(t) e1 + sin(t) e2 for diag(a, b): theta = a cos^2 + b sin^2, residual
    # (a - b) |cos t sin t|, error (a - b) sin^2 t = r^2 / (theta - b), far below r
    a, b = 5.0, 2.0
    for t in (1e-3, 1e-2, 0.1):
        theta = a * math.cos(t) ** 2 + b * math.sin(t) ** 2
        r = (a - b) * abs(math.cos(t) * math.sin(t))
        est = temple_estimates(torch.tensor([theta, b], dtype=D), torch.tensor([r, 0.0], dtype=D))
        assert float(est[0]) == pytest.approx((a - b) * math.sin(t) ** 2, rel=1e-9)
        assert float(est[0]) < r and float(est[1]) == 0.0
    # no neighbour: the residual; a neighbour whose interval reaches the value: the residual
    one = temple_estimates(torch.tensor([3.0], dtype=D), torch.tensor([0.1], dtype=D))
    assert float(one[0]) == pytest.approx(0.1)
    near = temple_estimates(torch.tensor([3.0, 2.95], dtype=D), torch.tensor([0.01, 0.1], dtype=D))
    assert float(near[0]) == pytest.approx(0.01)


def _moved_operators(n=300, seed=0):
    """A spectrum with a top cluster (10, 9.9, 9.7, 9.6) over a bulk in [-1, 6], and the same
    operator rotated a little with its top two eigenvalues crossing."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.tensor([10.0, 9.9, 9.7, 9.6]), torch.rand(n - 4, generator=g) * 7 - 1])
    lam = lam.to(D)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A1 = Q @ torch.diag(lam) @ Q.T
    skew = torch.randn(n, n, generator=g, dtype=D) * 2e-3
    R = torch.linalg.matrix_exp(skew - skew.T)
    lam2 = lam.clone()
    lam2[0], lam2[1] = 9.85, 10.05  # the second rises above the first
    A2 = (R @ Q) @ torch.diag(lam2) @ (R @ Q).T
    return A1, A2, torch.sort(lam2, descending=True).values


def test_refine_meets_an_eigenvalue_error_tolerance_for_fewer_products_than_a_cold_start():
    A1, A2, lam2 = _moved_operators()
    block = torch.linalg.eigh(A1).eigenvectors.flip(1)[:, :4].T  # top 4 of the old operator
    tol = 1e-3
    res, nxt = refine(A2, block, 2, "LA", tol, keep=4)
    assert res.converged and nxt.shape == (4, 300)
    est = torch.tensor(res.info["error_estimates"], dtype=D)
    scale = float(res.eigenvalues.abs().max())
    assert bool((est <= tol * scale).all())
    # the eigenvalue errors against the known spectrum: within the estimates and the tolerance
    err = (res.eigenvalues - lam2[:2]).abs()
    assert bool((err <= est + 1e-12).all()) and bool((err <= tol * scale).all())
    # where the residual alone would not have stopped: r >> tol, r^2/gap <= tol
    assert float(res.residuals.max()) > tol * scale
    cold = lanczos(A2, k=2, which="LA", tol=tol, seed=0)
    assert res.num_matvecs <= cold.num_matvecs / 2
    # a single old vector follows its own branch through the crossing: the block does not
    lone, _ = refine(A2, block[:1], 1, "LA", 0.05, keep=1)
    assert float(lone.eigenvalues[0]) == pytest.approx(9.85, abs=0.05)


def test_refine_that_runs_out_of_budget_says_so():
    _, A2, _ = _moved_operators(seed=1)
    rand = torch.randn(4, 300, generator=torch.Generator().manual_seed(0), dtype=D)
    res, _ = refine(A2, rand, 1, "LA", 1e-6, keep=4, max_matvecs=6)
    assert not res.converged and res.num_matvecs <= 6 + 1
    assert float(res.info["error_estimates"][0]) > 1e-6 * float(res.eigenvalues.abs().max())


def test_tracker_falls_back_to_a_verified_lanczos_when_the_refinement_misses_tol(monkeypatch):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 5, generator=g, dtype=D), torch.randn(64, 1, generator=g, dtype=D)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    H = HessianOperator(model, [(X, y)], loss)

    def starved(*args, **kwargs):  # a budget of the block's own products: never converges
        return refine(*args, **{**kwargs, "max_matvecs": 1})

    monkeypatch.setattr(tracking, "refine", starved)
    tracker = CurvatureTracker(H, k=1, tol=1e-8, check_every=10)
    first = tracker.measure(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss(model, (X, y)).backward()
    opt.step()  # the Hessian moves: the old vector is no longer an eigenvector
    second = tracker.measure(1)
    dense = float(torch.linalg.eigvalsh(H.to_dense())[-1])
    assert first.checked and second.checked and second.converged
    assert second.eigenvalues[0] == pytest.approx(dense, rel=1e-7)
