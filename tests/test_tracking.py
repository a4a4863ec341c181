"""Curvature tracking during training: warm starts, history, saving."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hessian_spectra import CurvatureTracker, HessianOperator, lanczos


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
        dense = torch.linalg.eigvalsh(H.to_dense()).flip(0)
        # the tracking tolerance bounds each eigenvalue's error: the recorded estimate
        # (the residual, or the Kato-Temple r^2/gap of a warm refinement) is at most
        # tol * max|lambda|, and so is the distance to the dense eigenvalues
        got = torch.tensor(rec.eigenvalues, dtype=torch.float64)
        res = torch.tensor(rec.residuals, dtype=torch.float64)
        est = torch.tensor(rec.error_estimates, dtype=torch.float64)
        scale = float(dense.abs().max())
        assert rec.tol == 1e-3 and bool((est <= rec.tol * scale).all())
        assert bool((est <= res + 1e-15).all())
        assert bool(((got - dense[:2]).abs() <= rec.tol * scale).all())
        assert rec.converged and rec.warm_started == (step > 0)
        assert rec.checked == (step == 0)  # the check runs at the first of every 10
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


def test_mode_is_explicit_and_the_model_mode_comes_back():
    """mode="eval" (default) measures the eval-mode Hessian (dropout off) of a model training in
    train mode; mode="train" fixes dropout masks, a different matrix; modes are restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    X, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    data = [(X, y)]
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    model.train()
    H = HessianOperator(model, data, loss)
    ev = CurvatureTracker(H, k=1, tol=1e-8).measure(0)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    want = torch.linalg.eigvalsh(H.to_dense()).max()
    model.train()
    assert ev.eigenvalues[0] == pytest.approx(float(want), rel=1e-6)
    tr = CurvatureTracker(H, k=1, mode="train", tol=1e-8).measure(0)
    assert abs(tr.eigenvalues[0] - ev.eigenvalues[0]) > 1e-3 * abs(ev.eigenvalues[0])
    assert model.training
    with pytest.raises(ValueError, match="mode must be 'eval', 'train' or None"):
        CurvatureTracker(H, mode="test")


def test_records_carry_loss_learning_rate_and_thresholds(tmp_path):
    model, data, loss = _setup()
    tracker = CurvatureTracker(HessianOperator(model, data, loss), k=1, every=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        sgd.zero_grad()
        value = loss(model, data[0])
        value.backward()
        sgd.step()
        tracker.maybe_measure(step, loss=value, optimizer=sgd)
    rec = tracker.history[-1]
    assert rec.extra["loss"] == pytest.approx(float(value))
    assert rec.extra["lr"] == 0.05
    assert rec.extra["threshold_gd"] == pytest.approx(40.0)
    assert rec.extra["threshold"] == pytest.approx((2 + 2 * 0.9) / (0.1 * 0.05))
    back = CurvatureTracker.load(tracker.save(tmp_path / "t.json"), tracker._operator)
    assert back.history[-1].extra == rec.extra and back.mode == "eval"


def test_bottom_eigenvalues_ggn_top_and_curvature_along_directions():
    from hessian_spectra import GGNOperator, params_to_vector
    from hessian_spectra.losses import supervised_forward, supervised_loss_of_output

    model, data, loss = _setup()
    H = HessianOperator(model, data, loss)
    G = GGNOperator(model, data, supervised_forward, supervised_loss_of_output(F.mse_loss))
    tracker = CurvatureTracker(H, k=1, bottom_k=2, ggn=G)
    assert tracker.tol == 1e-3
    for p in model.parameters():
        p.grad = None
    loss(model, data[0]).backward()
    g = params_to_vector([p.grad for p in model.parameters()])
    e = torch.zeros_like(g)
    e[3] = 1.0
    rec = tracker.measure(0, directions={"gradient": g, "coordinate": e})
    A = H.to_dense()
    evals = torch.linalg.eigvalsh(A)
    # within the tracking tolerance's bound (1e-3 of the largest |eigenvalue|)
    bound = 1e-3 * float(evals.abs().max())
    assert rec.extra["bottom"] == pytest.approx(evals[:2].tolist(), abs=bound)
    ggn = torch.linalg.eigvalsh(G.to_dense())
    assert rec.extra["ggn_lambda_1"] == pytest.approx(float(ggn[-1]), abs=1e-3 * float(ggn[-1]))
    assert rec.extra["curvature_gradient"] == pytest.approx(float(g @ A @ g / (g @ g)))
    assert rec.extra["curvature_coordinate"] == pytest.approx(float(A[3, 3]))
    with pytest.raises(ValueError, match="bottom_k must be an int >= 0"):
        CurvatureTracker(H, bottom_k=-1)


def test_warm_unchecked_measurements_cost_a_fraction_of_cold_ones_at_the_same_tolerance():
    """Small steps move the top eigenvectors little: a warm measurement without the
    multiplicity check spends at most half the products of a cold, checked start at the
    same tracking tolerance, and stays within that tolerance's bound of the dense answer;
    every ``check_every``-th measurement runs the check again."""
    model, data, loss = _setup()
    H = HessianOperator(model, data, loss)
    tracker = CurvatureTracker(H, k=2, check_every=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    warm, cold = [], []
    for step in range(6):
        rec = tracker.measure(step)
        dense = torch.linalg.eigvalsh(H.to_dense()).flip(0)
        got = torch.tensor(rec.eigenvalues, dtype=torch.float64)
        assert bool(((got - dense[:2]).abs() <= 1e-3 * dense.abs().max()).all())
        assert rec.checked == (step % 3 == 0)
        if not rec.checked:
            warm.append(rec.num_matvecs)
        cold.append(lanczos(H, k=2, which="LA", tol=1e-3, seed=step).num_matvecs)
        opt.zero_grad()
        loss(model, data[0]).backward()
        opt.step()
    assert len(warm) == 4 and sum(warm) / len(warm) <= 0.5 * sum(cold) / len(cold)
