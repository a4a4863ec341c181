"""Curvature tracking during training: warm starts, history, saving."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hessian_spectra import CurvatureTracker, HessianOperator


def _setup():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    data = [(X[:40], y[:40]), (X[40:], y[40:])]
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    return model, data, loss


def test_tracker_matches_dense_eigenvalues_at_every_step_and_warm_starts(tmp_path) -> None:
    model, data, loss = _setup()
    H = HessianOperator(model, data, loss)  # reads the current parameters at each product
    tracker = CurvatureTracker(H, k=2, trace_matvecs=30, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(4):
        rec = tracker.measure(step)
        dense = torch.linalg.eigvalsh(H.to_dense())
        torch.testing.assert_close(
            torch.tensor(rec.eigenvalues, dtype=torch.float64), dense.flip(0)[:2], rtol=1e-6, atol=0
        )
        assert rec.converged and rec.warm_started == (step > 0)
        opt.zero_grad()
        loss(model, data[0]).backward()
        opt.step()
    hist = tracker.history
    # a small step moves the eigenvectors little: warm starts need fewer products than the cold one
    assert max(r.num_matvecs for r in hist[1:]) < hist[0].num_matvecs
    saved = json.loads(tracker.save(tmp_path / "c.json").read_text())
    assert [h["step"] for h in saved["history"]] == [0, 1, 2, 3]
    assert all(h["trace"] is not None and h["trace_stderr"] >= 0 for h in saved["history"])


def test_maybe_measure_every_and_factories() -> None:
    model, data, loss = _setup()
    tracker = CurvatureTracker(lambda: HessianOperator(model, data, loss), k=1, every=2)
    got = [tracker.maybe_measure(s) for s in range(5)]
    assert [r is not None for r in got] == [True, False, True, False, True]
    assert [r.step for r in tracker.history] == [0, 2, 4]


def test_tracker_argument_errors() -> None:
    with pytest.raises(TypeError, match="CurvatureOperator or a callable"):
        CurvatureTracker(42)  # type: ignore[arg-type]
    model, data, loss = _setup()
    H = HessianOperator(model, data, loss)
    with pytest.raises(ValueError, match="every must be a positive int"):
        CurvatureTracker(H, every=0)
    with pytest.raises(ValueError, match="trace_matvecs must be >= 0"):
        CurvatureTracker(H, trace_matvecs=-1)
    with pytest.raises(TypeError, match="factory returned"):
        CurvatureTracker(lambda: "not an operator").measure()
