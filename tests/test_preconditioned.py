"""Preconditioned sharpness: P^{-1/2} H P^{-1/2} from an Adam optimizer's state, against a
dense float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra import HessianOperator, lanczos
from hessian_spectra.operators.preconditioned import (
    PreconditionedOperator,
    adam_preconditioner,
    stability_threshold,
)

D = torch.float64


def _setup(amsgrad: bool, opt_cls=torch.optim.Adam):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=D), torch.randint(0, 3, (40,))
    opt = opt_cls(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6, amsgrad=amsgrad)
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, opt


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    return torch.func.hessian(loss)(flat)


@pytest.mark.parametrize(
    ("amsgrad", "opt_cls"), [(False, torch.optim.Adam), (True, torch.optim.AdamW)]
)
def test_preconditioned_sharpness_against_the_dense_reference(amsgrad, opt_cls):
    model, x, y, opt = _setup(amsgrad, opt_cls)
    H = _dense_hessian(model, x, y)
    # the optimizer's own denominator, written out from its state
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
        parts.append((v / (1 - 0.95 ** float(st["step"]))).sqrt().reshape(-1) + 1e-6)
    P = torch.cat(parts)
    want = torch.linalg.eigvals(torch.diag(1 / P) @ H).real.max()  # lambda_max(P^-1 H)
    op = HessianOperator(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    diag = adam_preconditioner(opt, op.params)
    torch.testing.assert_close(diag, P)
    res = lanczos(PreconditionedOperator(op, diag), k=1, which="LA", seed=0)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues[0], want, rtol=1e-6, atol=0)


def test_errors_and_thresholds():
    model = nn.Linear(2, 1).double()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="no second-moment estimate yet"):
        adam_preconditioner(opt, list(model.parameters()))
    with pytest.raises(ValueError, match="not in the optimizer"):
        adam_preconditioner(opt, [torch.zeros(2, requires_grad=True)])
    A = torch.eye(3, dtype=D)
    with pytest.raises(ValueError, match="finite and positive"):
        PreconditionedOperator(A, torch.tensor([1.0, 0.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match=r"must be a \(3,\) tensor"):
        PreconditionedOperator(A, torch.ones(2, dtype=D))
    assert stability_threshold(0.5) == 4.0
    assert stability_threshold(2.0, beta1=0.9) == pytest.approx(19.0)
    with pytest.raises(ValueError, match="beta1 must lie in"):
        stability_threshold(0.1, beta1=1.0)


def test_tracker_measures_preconditioned_sharpness_warm_within_its_tolerance(tmp_path):
    """``CurvatureTracker(preconditioned=True)`` reads P from the Adam state at each
    measurement; warm measurements meet the tracking tolerance against the dense
    ``lambda_max(P^-1 H)`` of the moment, and the setting survives a save and load."""
    from hessian_spectra import CurvatureTracker

    model, x, y, opt = _setup(False)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    op = HessianOperator(model, [(x, y)], loss)
    tracker = CurvatureTracker(op, k=1, preconditioned=True, check_every=3)
    for step in range(5):
        rec = tracker.measure(step, optimizer=opt)
        parts = []
        for p in model.parameters():
            st = opt.state[p]
            parts.append((st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))).sqrt().reshape(-1))
        P = torch.cat(parts) + 1e-6
        H = _dense_hessian(model, x, y)
        want = float(torch.linalg.eigvals(torch.diag(1 / P) @ H).real.max())
        got = rec.extra["preconditioned_lambda_1"]
        assert abs(got - want) <= 1e-3 * abs(want)
        assert rec.extra["threshold"] == pytest.approx(stability_threshold(1e-2, 0.9))
        opt.zero_grad()
        loss(model, (x, y)).backward()
        opt.step()
    # products: the warm ones spend less than the checked first one
    assert max(r.num_matvecs for r in tracker.history[1:3]) < tracker.history[0].num_matvecs
    back = CurvatureTracker.load(tracker.save(tmp_path / "t.json"), op)
    assert back.preconditioned and len(back.history) == 5


def test_tracker_says_when_preconditioned_sharpness_has_no_adam_to_read():
    from hessian_spectra import CurvatureTracker

    model, x, y, _ = _setup(False)
    op = HessianOperator(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    tracker = CurvatureTracker(op, k=1, preconditioned=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"measured with SGD.*optimizer=opt"):
        rec = tracker.measure(0, optimizer=sgd)
    assert "preconditioned_lambda_1" not in rec.extra
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per tracker
        tracker.measure(1)
