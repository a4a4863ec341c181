"""Empirical and Monte-Carlo Fisher operators against dense float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra.losses import (
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
)
from hessian_spectra.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from hessian_spectra.operators.ggn import GGNOperator
from hessian_spectra.operators.hessian import HessianOperator
from reference import tol
from test_ggn import _data, _mlp, dense_ggn

D = torch.float64


def dense_empirical_fisher(model, data):
    """(1/N) sum_i g_i g_i^T with g_i from torch.func.grad of each sample's loss, one at a time."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    gs = []
    for x, y in data:
        for i in range(x.shape[0]):
            g = torch.func.grad(
                lambda p, x=x, y=y, i=i: F.cross_entropy(
                    torch.func.functional_call(model, p, (x[i : i + 1],)), y[i : i + 1]
                )
            )(params)
            gs.append(torch.cat([g[n].reshape(-1) for n in names]))
    G = torch.stack(gs)
    return G.T @ G / G.shape[0]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=tol(D) * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_empirical_fisher_vmap_equals_dense_mean_of_outer_products(chunk_size):
    model, data = _mlp(), _data()
    F_op = EmpiricalFisherOperator(
        model, data, supervised_loss(F.cross_entropy), chunk_size=chunk_size
    )
    ref = dense_empirical_fisher(model, data)
    dense = F_op.to_dense()
    _close(dense, ref)
    ev = torch.linalg.eigvalsh(dense)
    assert ev.min() >= -tol(D) * ev.max()
    if chunk_size < 64:
        return
    # per-sample losses ((1,) vectors on one-sample batches) work the same way
    F2 = EmpiricalFisherOperator(
        model, data, supervised_per_sample_loss(F.cross_entropy), chunk_size=chunk_size
    )
    _close(F2.to_dense(), ref)


def test_empirical_fisher_loop_equals_vmap():
    model, data = _mlp(), _data()
    ref = dense_empirical_fisher(model, data)
    loop = EmpiricalFisherOperator(
        model, data, supervised_per_sample_loss(F.cross_entropy), per_sample="loop"
    )
    _close(loop.to_dense(), ref)


def test_empirical_fisher_dict_batches():
    model, data = _mlp(), _data()
    dict_data = [{"x": x, "y": y} for x, y in data]

    def loss_fn(m, b):
        return F.cross_entropy(m(b["x"]), b["y"])

    _close(
        EmpiricalFisherOperator(model, dict_data, loss_fn=loss_fn, chunk_size=3).to_dense(),
        dense_empirical_fisher(model, data),
    )


def test_empirical_fisher_loop_handles_batchnorm_in_train_mode_and_leaves_the_model():
    model = (
        nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        .double()
        .train()
    )
    before = copy.deepcopy(model.state_dict())
    data = _data()
    op = EmpiricalFisherOperator(
        model, data, supervised_per_sample_loss(F.cross_entropy), per_sample="loop"
    )
    dense = op.to_dense()
    # reference: jacobian of the per-sample losses of each full batch (batch statistics couple)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for x, y in data:

        def losses(p, x=x, y=y):
            m = copy.deepcopy(model)
            m[1].track_running_stats = False
            return F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")

        J = torch.func.jacrev(losses)(params)
        rows.append(torch.cat([J[n].reshape(x.shape[0], -1) for n in names], 1))
    G = torch.cat(rows)
    _close(dense, G.T @ G / G.shape[0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mc_fisher_mean_over_seeds_approaches_the_ggn():
    """Entrywise, the mean of 80 seeds' products is within 5 standard errors of the GGN's."""
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    V = torch.randn(3, 43, generator=torch.Generator().manual_seed(0), dtype=D)
    ggn = V @ dense_ggn(model, data, loss)
    mats = torch.stack(
        [MCFisherOperator(model, data, supervised_forward(), loss, seed=s) @ V for s in range(80)]
    )
    mean, se = mats.mean(0), mats.std(0) / 80**0.5
    assert ((mean - ggn).abs() <= 5 * se + 1e-12).all()
    # and the error shrinks: far closer than a single draw
    assert (mean - ggn).norm() < 0.35 * (mats[0] - ggn).norm()


def test_mc_fisher_is_one_psd_matrix_per_seed():
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    op = MCFisherOperator(model, data, supervised_forward(), loss, seed=3, mc_samples=2)
    a = op.to_dense()
    assert torch.equal(op.to_dense(), a)
    _close(a, a.T)
    ev = torch.linalg.eigvalsh(a)
    assert ev.min() >= -tol(D) * ev.max()
    b = MCFisherOperator(model, data, supervised_forward(), loss, seed=4, mc_samples=2).to_dense()
    assert not torch.allclose(a, b)


def test_mc_fisher_of_mse_equals_ggn_in_expectation():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, 2, generator=g, dtype=D))]
    loss = supervised_loss_of_output(F.mse_loss)
    ggn = GGNOperator(model, data, supervised_forward(), loss).to_dense()
    op = MCFisherOperator(model, data, supervised_forward(), loss, mc_samples=20000)
    torch.testing.assert_close(op.to_dense(), ggn, rtol=0, atol=0.05 * ggn.abs().max().item())


def test_errors():
    model, data = _mlp(), _data()
    with pytest.raises(TypeError, match="needs one loss: per_sample_loss_fn"):
        EmpiricalFisherOperator(model, data, None)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        EmpiricalFisherOperator(model, data, 3)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        EmpiricalFisherOperator(model, data, supervised_loss(F.cross_entropy), chunk_size=0)
    with pytest.raises(ValueError, match="per_sample must be 'vmap' or 'loop'"):
        EmpiricalFisherOperator(model, data, supervised_loss(F.cross_entropy), per_sample="jac")
    op = EmpiricalFisherOperator(model, data, supervised_loss(F.cross_entropy), per_sample="loop")
    with pytest.raises(ValueError, match="needs loss_fn to return the"):
        op @ torch.ones(op.size, dtype=D)
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double().train()
    op = EmpiricalFisherOperator(bn, data, loss_fn=supervised_loss(F.cross_entropy))
    with pytest.raises(RuntimeError, match="pass per_sample='loop'"):
        op @ torch.ones(op.size, dtype=D)
    with pytest.raises(TypeError, match="needs a loss whose likelihood it can sample"):
        MCFisherOperator(model, data, supervised_forward(), lambda o, b: F.cross_entropy(o, b[1]))
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        MCFisherOperator(
            model,
            data,
            supervised_forward(),
            supervised_loss_of_output(F.cross_entropy),
            mc_samples=0,
        )


def _model_operators(model, data):
    ce = F.cross_entropy
    fwd, lof = supervised_forward(), supervised_loss_of_output(ce)
    return {
        "hessian": HessianOperator(model, data, supervised_loss(ce)),
        "ggn": GGNOperator(model, data, fwd, lof),
        "empirical_fisher": EmpiricalFisherOperator(model, data, loss_fn=supervised_loss(ce)),
        "mc_fisher": MCFisherOperator(model, data, fwd, lof),
    }


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher", "mc_fisher"])
def test_model_operators_share_attributes_and_read_the_seed_at_product_time(kind):
    """Every model operator exposes model/params/names/layout/batches/seed; a seed set after
    construction changes the dropout masks from the next product on."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))
    model = model.double().train()
    data = _data()
    op = _model_operators(model, data)[kind]
    names = [n for n, _ in model.named_parameters()]
    assert op.model is model and op.names == tuple(names)
    assert [p is q for p, q in zip(op.params, model.parameters(), strict=True)] == [True] * 4
    assert op.layout.names == tuple(names) and op.layout.size == op.size
    assert op.batches.total_samples == 10 and op.seed == 0
    V = torch.randn(2, op.size, generator=torch.Generator().manual_seed(0), dtype=D)
    first = op @ V
    op.seed = 1
    assert not torch.equal(op @ V, first)  # other masks (other MC targets), another matrix
    op.seed = 0
    assert torch.equal(op @ V, first)
    op.seed = None  # a fresh draw from the OS
    assert isinstance(op.seed, int) and op.seed >= 0
    with pytest.raises(TypeError, match="seed must be an int or None"):
        op.seed = 1.5
