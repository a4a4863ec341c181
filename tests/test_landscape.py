"""Loss landscapes: the curve along the top eigenvector against the Taylor model; model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call, grad

from hessian_spectra.landscape import filter_normalized_directions, loss_landscape


def _setup():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    model.train()
    X = torch.randn(24, 3, generator=g, dtype=torch.float64)
    y = torch.randn(24, 1, generator=g, dtype=torch.float64)
    data = [(X[:16], y[:16]), (X[16:], y[16:])]  # unequal batches: weighted by sample count

    def loss(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    return model, data, loss


def _flat_loss(model, data, loss):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    n_total = sum(len(b[0]) for b in data)

    def f(theta):
        parts = torch.split(theta, numels)
        ps = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        out = 0.0
        for b in data:
            # BatchNorm in train mode: batch statistics, on copies of the buffers
            state = {**ps, **{k: v.clone() for k, v in bufs.items()}}
            out = (
                out
                + loss(lambda x, s=state: functional_call(model, s, (x,)), b) * len(b[0]) / n_total
            )
        return out

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.grad for p in model.parameters()],
    )


def _assert_same(model, before):
    sd, modes, grads = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


def test_curve_along_top_eigenvector_is_the_taylor_model():
    model, data, loss = _setup()
    before = _state(model)
    h = 0.02
    land = loss_landscape(model, data, loss, dims=1, span=h, steps=5, progress=False)
    _assert_same(model, before)
    f, theta = _flat_loss(model, data, loss)
    # double backward: torch.func.hessian (forward-over-reverse) differs through train-mode BatchNorm
    H = hessian(f, theta)
    evals, evecs = torch.linalg.eigh(H)
    lam, v_ref = float(evals[-1]), evecs[:, -1]
    v = land.directions[0]
    assert abs(float(v @ v_ref)) == pytest.approx(1.0, abs=1e-8)
    assert float(land.eigenvalues[0]) == pytest.approx(lam, rel=1e-8)
    L0 = float(f(theta))
    assert land.center_loss == pytest.approx(L0, rel=1e-12)
    slope = float(grad(f)(theta) @ v)
    t = land.coords
    model_q = L0 + slope * t + 0.5 * lam * t**2
    r = (land.losses - model_q).abs()
    # the remainder is third order: halving the step divides it by ~8 (4 at second order)
    ratio = float(torch.maximum(r[0], r[4]) / torch.maximum(r[1], r[3]))
    assert 6.0 < ratio < 10.5, ratio
    assert float(r.max()) < 0.05 * 0.5 * lam * h**2


def test_random_2d_surface_filter_normalized_and_model_untouched():
    model, data, loss = _setup()
    before = _state(model)
    land = loss_landscape(
        model,
        data,
        loss,
        dims=2,
        directions="random",
        span=0.5,
        steps=4,
        points_per_batch=5,
        progress=False,
    )
    _assert_same(model, before)
    assert land.losses.shape == (4, 4) and land.kind == "random"
    f, theta = _flat_loss(model, data, loss)
    i, j = 1, 3
    point = theta + land.coords[i] * land.directions[0] + land.coords[j] * land.directions[1]
    assert float(land.losses[i, j]) == pytest.approx(float(f(point)), rel=1e-12)
    assert land.center_loss == pytest.approx(float(f(theta)), rel=1e-12)  # even steps: computed
    D = filter_normalized_directions(model, 2, seed=0)
    off = 0
    for p in model.parameters():
        d = D[0, off : off + p.numel()].reshape(p.shape)
        off += p.numel()
        if p.dim() < 2:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.norm(dim=1), p.detach().norm(dim=1), rtol=1e-12, atol=0)


def test_bad_arguments():
    model, data, loss = _setup()
    with pytest.raises(ValueError, match="dims must be 1 or 2"):
        loss_landscape(model, data, loss, dims=3)
    with pytest.raises(
        ValueError, match=r"directions has shape \(1, 67\) for dims=2; pass a \(2, 43\)"
    ):
        loss_landscape(model, data, loss, dims=2, directions=torch.ones(1, 67, dtype=torch.float64))
    with pytest.raises(ValueError, match="directions must be 'eigen', 'random'"):
        loss_landscape(model, data, loss, directions="top")
