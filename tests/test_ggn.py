"""GGNOperator against independent dense references (torch.func, float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra.losses import (
    LossCurvatureWarning,
    LossOfOutput,
    supervised_forward,
    supervised_loss_of_output,
)
from hessian_spectra.operators.ggn import GGNOperator
from hessian_spectra.params import match_names
from hessian_spectra.state import differentiable_mode
from reference import tol

D = torch.float64


def _data(sizes=(7, 3), d_in=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def dense_ggn(model, data, loss_of_output):
    """sum_b n_b/N J_b^T H_b J_b: J from jacrev, H from torch.func.hessian of the output loss."""
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(vec, x):
        parts = torch.split(vec, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(model, params, (x,))

    N = sum(b[0].shape[0] for b in data)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=D)
    for x, y in data:
        out = f(theta, x)
        J = torch.func.jacrev(f)(theta, x).reshape(out.numel(), -1)
        H = torch.func.hessian(lambda o, x=x, y=y: loss_of_output(o, (x, y)))(out).reshape(
            out.numel(), out.numel()
        )
        total += x.shape[0] / N * J.T @ H @ J
    return total


def dense_ggn_products(model, batch, forward_fn, loss_of_output, V):
    """J^T H J V with J from jacrev over functional_call and H from torch.func.hessian (float64)."""
    named = dict(model.named_parameters())  # tied weights appear once
    names = list(named)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(vec):
        parts = torch.split(vec, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        m = _Bound(model, params)
        return forward_fn(m, batch)

    with differentiable_mode():
        out = f(theta)
        J = torch.func.jacrev(f)(theta).reshape(out.numel(), -1)
        H = torch.func.hessian(lambda o: loss_of_output(o, batch))(out.detach()).reshape(
            out.numel(), -1
        )
    return (J.T @ H @ J @ V.T).T


class _Bound(torch.nn.Module):
    """The model called through functional_call with ``params``; other attributes from the model."""

    def __init__(self, model, params):
        super().__init__()
        object.__setattr__(self, "_m", model)
        object.__setattr__(self, "_p", params)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self._m, self._p, args, kwargs)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_m"), name)


def _close(a, b, factor=None):
    torch.testing.assert_close(a, b, rtol=0, atol=tol(D, factor) * max(1.0, b.abs().max().item()))


def test_ggn_equals_hessian_for_linear_model_with_mse():
    g = torch.Generator().manual_seed(1)
    model = nn.Linear(4, 2).double()
    data = [
        (torch.randn(n, 4, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D))
        for n in (6, 2)
    ]
    # analytic: the loss is quadratic in theta = (W, b): sum_b n_b/N mean((xW^T + b - y)^2)
    N = sum(x.shape[0] for x, _ in data)

    def L(theta):
        W, b = theta[:8].reshape(2, 4), theta[8:]
        return sum(x.shape[0] / N * ((x @ W.T + b - y) ** 2).mean() for x, y in data)

    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = torch.autograd.functional.hessian(L, theta)
    for loss_hvp in ("analytical", "autograd"):
        G = GGNOperator(
            model,
            data,
            supervised_forward(),
            supervised_loss_of_output(F.mse_loss),
            loss_hvp=loss_hvp,
        )
        _close(G.to_dense(), H)


@pytest.mark.parametrize("loss_hvp", ["analytical", "autograd"])
def test_ggn_equals_dense_jt_h_j_for_mlp_with_cross_entropy(loss_hvp):
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    G = GGNOperator(model, data, supervised_forward(), loss, loss_hvp=loss_hvp)
    ref = dense_ggn(model, data, loss)
    dense = G.to_dense()
    _close(dense, ref)
    assert G.num_matvecs == G.size
    # positive semi-definite
    ev = torch.linalg.eigvalsh(dense)
    assert ev.min() >= -tol(D) * ev.max()


def test_block_mechanisms_follow_the_rows_per_pass_and_each_gives_the_ggn(monkeypatch):
    """No timing: by default a pass takes one row (``J v`` and ``Jᵀ u`` per row); with a
    raised ``block_bytes``, ``"auto"`` vmaps the chunk; every setting gives the dense GGN,
    also while every clock returns garbage."""
    import time

    from hessian_spectra.operators import _chunks

    monkeypatch.setattr(_chunks, "SMALL_STEP_BYTES", 0)  # the rule for models of real size
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    ref = dense_ggn(model, data, loss)
    V = torch.randn(5, ref.shape[0], generator=torch.Generator().manual_seed(3), dtype=D)
    g = torch.Generator().manual_seed(4)
    for name in ("perf_counter", "monotonic", "time", "process_time", "thread_time"):
        monkeypatch.setattr(time, name, lambda: float(torch.rand((), generator=g)) * 1e6)
    vmaps = []
    real_vmap = torch.func.vmap

    def counting_vmap(*args, **kwargs):
        vmaps.append(1)
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", counting_vmap)
    G = GGNOperator(model, data, supervised_forward(), loss)
    first = G @ V
    _close(first, V @ ref)
    assert G.block_rows == 1 and not vmaps  # one row a pass: no vmapped J V or Jᵀ U
    assert (G.block_mechanisms.jvp, G.block_mechanisms.vjp) == ("auto", "auto")
    assert torch.equal(G @ V, first)
    G.block_bytes = 2**40
    _close(G @ V, V @ ref)
    assert G.block_rows == G.max_block and len(vmaps) == 2 * len(data)  # J V and Jᵀ U
    assert G.num_matvecs == 15
    for jvp in ("vmap", "loop"):
        for vjp in ("vmap", "loop"):
            forced = GGNOperator(model, data, supervised_forward(), loss)
            forced.block_mechanisms.jvp, forced.block_mechanisms.vjp = jvp, vjp
            forced.block_bytes = 2**40
            vmaps.clear()
            _close(forced @ V, V @ ref)
            assert len(vmaps) == len(data) * ((jvp == "vmap") + (vjp == "vmap"))


def test_finite_difference_jvp_is_close():
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    G = GGNOperator(model, data, supervised_forward(), loss, jvp="finite_difference")
    ref = dense_ggn(model, data, loss)
    # central differences: O(eps^2) truncation with eps = 6e-6 in float64
    torch.testing.assert_close(G.to_dense(), ref, rtol=0, atol=1e-8 * ref.abs().max().item())


def test_block_equals_loop_and_is_deterministic_and_symmetric():
    model, data = _mlp(), _data()
    G = GGNOperator(model, data, supervised_forward(), supervised_loss_of_output(F.cross_entropy))
    V = torch.randn(4, G.size, generator=torch.Generator().manual_seed(2), dtype=D)
    block = G @ V
    loop = torch.stack([G @ v for v in V])
    _close(block, loop)
    assert torch.equal(G @ V, block)
    _close(V @ block.T, (V @ block.T).T)


def test_loss_without_hvp_needs_autograd_as_the_seed_documents():
    """loss_hvp="analytical" (the default) requires ``.hvp``, as hessian-eigenthings documents."""
    model, data = _mlp(), _data()

    def plain(out, batch):
        return F.cross_entropy(out, batch[1])

    with pytest.raises(ValueError, match=r"has none\. Use a helper that carries one"):
        GGNOperator(model, data, supervised_forward(), plain)
    G = GGNOperator(model, data, supervised_forward(), plain, loss_hvp="autograd")
    _close(G.to_dense(), dense_ggn(model, data, plain))


def test_a_seed_style_hvp_gets_one_direction_at_a_time():
    """An object with a ``.hvp(output, batch, u)`` written for one direction (as in
    hessian-eigenthings) gives the same GGN as the block helper."""
    model, data = _mlp(), _data()

    class OneAtATime:
        def __call__(self, out, batch):
            return F.cross_entropy(out, batch[1])

        def hvp(self, out, batch, u):
            assert u.shape == out.shape  # one direction, never a block
            p = torch.softmax(out, dim=-1)
            return (p * u - p * (p * u).sum(-1, keepdim=True)) / out.shape[0]

    G = GGNOperator(model, data, supervised_forward, OneAtATime())
    _close(G.to_dense(), dense_ggn(model, data, OneAtATime()))


def test_custom_loss_with_hvp_is_used():
    model, data = _mlp(), _data()
    calls = []

    def hvp(out, batch, U):
        calls.append(U.shape)
        return 2 * U / out.numel()

    loss = LossOfOutput(lambda o, b: (o**2).mean(), hvp=hvp)
    G = GGNOperator(model, data, supervised_forward(), loss)
    G.block_bytes = 2**40  # chunks of many rows (the default budget is one row)
    _close(G.to_dense(), dense_ggn(model, data, loss))
    assert calls and calls[0][0] > 1  # called on blocks


def test_param_filter_gives_the_diagonal_block():
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    full = GGNOperator(model, data, supervised_forward(), loss).to_dense()
    sub = GGNOperator(model, data, supervised_forward(), loss, param_filter=match_names("2.*"))
    start = sum(p.numel() for p in model[0].parameters())
    _close(sub.to_dense(), full[start:, start:])


def test_unused_parameter_gives_zero_rows():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model, data = WithSpare().double(), _data()
    G = GGNOperator(
        model, data, supervised_forward(), supervised_loss_of_output(F.cross_entropy)
    ).to_dense()
    assert torch.count_nonzero(G[15:]) == 0 and torch.count_nonzero(G[:, 15:]) == 0
    assert torch.count_nonzero(G[:15, :15]) > 0


def test_microbatches_give_the_same_matrix():
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    a = GGNOperator(model, data, supervised_forward(), loss).to_dense()
    b = GGNOperator(model, data, supervised_forward(), loss, microbatch_size=2).to_dense()
    _close(a, b)


def test_model_is_untouched_and_dropout_batchnorm_give_one_symmetric_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    model.train()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    data = _data()
    G = GGNOperator(model, data, supervised_forward(), supervised_loss_of_output(F.cross_entropy))
    with torch.no_grad():
        dense = G.to_dense()
    _close(dense, dense.T)
    assert torch.equal(G.to_dense(), dense)
    ev = torch.linalg.eigvalsh((dense + dense.T) / 2)
    assert ev.min() >= -tol(D) * ev.max()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model[4].weight.grad, torch.ones_like(model[4].weight))
    assert model.training and all(m.training for m in model.modules())
    assert model[1].track_running_stats
    assert torch.equal(torch.get_rng_state(), rng)


def test_nll_ggn_is_zero():
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(-1)).double()
    with pytest.warns(LossCurvatureWarning):
        loss = supervised_loss_of_output(F.nll_loss)
    G = GGNOperator(model, _data(), supervised_forward(), loss)
    assert torch.count_nonzero(G.to_dense()) == 0


def test_errors():
    model, data = _mlp(), _data()
    loss = supervised_loss_of_output(F.cross_entropy)
    fwd = supervised_forward()
    with pytest.raises(TypeError, match="forward_fn must be a callable"):
        GGNOperator(model, data, None, loss)
    with pytest.raises(TypeError, match="loss_of_output_fn must be a callable"):
        GGNOperator(model, data, fwd, "ce")
    with pytest.raises(ValueError, match="loss_hvp must be 'analytical' or 'autograd'"):
        GGNOperator(model, data, fwd, loss, loss_hvp="exact")
    with pytest.raises(ValueError, match="jvp must be 'exact' or 'finite_difference'"):
        GGNOperator(model, data, fwd, loss, jvp="fd")
    with pytest.raises(ValueError, match="fd_eps must be a positive float"):
        GGNOperator(model, data, fwd, loss, fd_eps=-1.0)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        GGNOperator(model, data, fwd, loss, seed="a")
    mixed = _mlp()
    mixed[2].float()
    with pytest.raises(ValueError, match="mixed dtypes"):
        GGNOperator(mixed, data, fwd, loss)
    G = GGNOperator(model, data, lambda m, b: (m(b[0]),), loss)
    with pytest.raises(TypeError, match="forward_fn must return one tensor"):
        G @ torch.ones(G.size, dtype=D)
    bad = LossOfOutput(lambda o, b: o.sum(), hvp=lambda o, b, U: U[0])
    G = GGNOperator(model, data, fwd, bad)
    with pytest.raises(RuntimeError, match="must return U's shape"):
        G @ torch.ones(2, G.size, dtype=D)
    G = GGNOperator(model, data, fwd, lambda o, b: o, loss_hvp="autograd")
    with pytest.raises(ValueError, match="must return a scalar loss"):
        G @ torch.ones(G.size, dtype=D)


class _Square(torch.autograd.Function):
    """x * x with a backward but no forward-mode rule."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquareNet(nn.Module):
    def __init__(self, custom):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.custom = custom

    def forward(self, x):
        h = self.lin(x)
        return _Square.apply(h) if self.custom else h * h


def test_model_without_forward_mode_rule_needs_finite_differences():
    custom = _SquareNet(True).double()
    plain = _SquareNet(False).double()
    plain.load_state_dict(custom.state_dict())
    data, loss = _data(), supervised_loss_of_output(F.cross_entropy)
    G = GGNOperator(custom, data, supervised_forward(), loss)
    with pytest.raises(NotImplementedError, match="pass jvp='finite_difference'"):
        G @ torch.ones(G.size, dtype=D)
    fd = GGNOperator(custom, data, supervised_forward(), loss, jvp="finite_difference").to_dense()
    ref = GGNOperator(plain, data, supervised_forward(), loss).to_dense()
    torch.testing.assert_close(fd, ref, rtol=0, atol=1e-8 * ref.abs().max().item())


def test_rows_per_pass_follow_the_memory_budget_and_stay_exact(monkeypatch):
    """A tiny ``block_bytes`` pushes one row at a time through ``J V`` and ``Jᵀ U``, and
    so does the default (two training steps, below one row) for a model of real size;
    a large one fits the whole block, and so does the default on a small model (64 MiB
    a pass); all give the dense GGN."""
    from hessian_spectra.operators import _chunks

    torch.manual_seed(0)
    model, data = _mlp(), _data()
    lo = supervised_loss_of_output(F.cross_entropy)
    G_ref = dense_ggn(model, data, lo)
    G = GGNOperator(model, data, supervised_forward(), lo)
    V = torch.randn(5, G.size, generator=torch.Generator().manual_seed(1), dtype=D)
    cases = ((1, 1, 16 * 2**20), (None, 1, 0), (2**40, G.max_block, 0))
    for budget, rows, small in (*cases, (None, G.max_block, 16 * 2**20)):
        monkeypatch.setattr(_chunks, "SMALL_STEP_BYTES", small)
        G.block_bytes = budget
        got = G @ V
        assert G.block_rows == rows
        assert (got - V @ G_ref).abs().max() <= tol(D) * G_ref.abs().max()
