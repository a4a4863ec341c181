"""Never touch the model: every HessianOperator product leaves it bit-identical.

A snapshot records parameters, buffers (BatchNorm running statistics and
``num_batches_tracked``), ``.grad`` values and identities, train/eval modes,
``requires_grad`` flags and the global RNG state; after products (and a product
whose loss raises) the snapshot is compared bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hessian_spectra.operators import HessianOperator
from hessian_spectra.state import batch_rng, preserved_model
from reference import dense_loss_hessian, tol

F64 = torch.float64
METHODS = ["autograd", "finite_difference"]


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: (id(p), _bits(p), p._version) for n, p in model.named_parameters()},
        "buffers": {n: (id(b), _bits(b)) for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else (id(p.grad), _bits(p.grad))
            for n, p in model.named_parameters()
        },
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "rng": _bits(torch.get_rng_state()),
        "grad_enabled": torch.is_grad_enabled(),
    }


class StateNet(nn.Module):
    """BatchNorm and dropout in train mode, a submodule in eval mode, a frozen
    layer, an unused parameter and a buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.count_calls = True
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.frozen = nn.Linear(27, 27).requires_grad_(False)
        self.quiet = nn.Dropout(0.5).eval()
        self.head = nn.Linear(27, 3)
        self.unused = nn.Parameter(torch.randn(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count_calls:  # a buffer the forward writes (off for the torch.func reference)
            self.calls += 1
        h = torch.tanh(self.bn(self.conv(x))).flatten(1)
        h = self.drop(h) + 0.1 * self.frozen(h)
        return self.head(self.quiet(h))


def _problem():
    model = StateNet().double().train()
    model.quiet.eval()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(6, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)),
        (torch.randn(4, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)),
    ]
    for p in (model.conv.weight, model.frozen.weight, model.unused):
        p.grad = torch.randn(p.shape, generator=g, dtype=F64)  # .grad present beforehand
    return model, data


def _ce(m, b):
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize("method", METHODS)
def test_products_and_a_raising_product_leave_the_model_bit_identical(method):
    model, data = _problem()
    before = snapshot(model)
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if calls["n"] == calls.get("raise"):
            raise RuntimeError("loss raised mid-product")
        return _ce(m, b)

    op = HessianOperator(model, data, loss_fn, method=method)
    V = torch.randn(3, op.size, generator=torch.Generator().manual_seed(1), dtype=F64)
    op.matvec(V[0])
    op.matmat(V)
    calls["raise"] = calls["n"] + 2  # the second batch of the next product
    with pytest.raises(RuntimeError, match="loss raised mid-product"):
        op.matmat(V)
    after = snapshot(model)
    for key in before:
        assert after[key] == before[key], key


def test_dropout_in_train_mode_gives_one_fixed_symmetric_matrix():
    model, data = _problem()
    op = HessianOperator(model, data, _ce, seed=3)
    H = op.to_dense()
    assert torch.equal(op.to_dense(), H)  # the same masks in every product
    assert float((H - H.T).abs().max()) <= tol(F64) * float(H.abs().max())
    V = torch.randn(2, op.size, generator=torch.Generator().manual_seed(9), dtype=F64)
    HV = V @ H
    other = HessianOperator(model, data, _ce, seed=4) @ V
    assert float((other - HV).abs().max()) > 1e-3 * float(HV.abs().max())  # the masks do matter
    model.drop.eval()
    no_dropout = HessianOperator(model, data, _ce) @ V
    assert float((no_dropout - HV).abs().max()) > 1e-3 * float(HV.abs().max())


def _transformer():
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.2, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 2)).double()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (5,), generator=g))]
    return model, data


@pytest.mark.parametrize("train", [True, False])
def test_products_under_no_grad_and_inference_mode_equal_the_plain_ones(train):
    # eval mode under inference_mode is where nn.MultiheadAttention takes its fast path
    model, data = _transformer()
    model.train(train)
    op = HessianOperator(model, data, _ce)
    V = torch.randn(2, op.size, generator=torch.Generator().manual_seed(6), dtype=F64)
    plain = op @ V
    with torch.no_grad():
        under_no_grad = op @ V
        assert not torch.is_grad_enabled()
    before = snapshot(model)
    with torch.inference_mode():
        W = V.clone()  # an inference tensor
        under_inference = op @ W
        fd = HessianOperator(model, data, _ce, method="finite_difference") @ W
        assert torch.is_inference_mode_enabled()
    assert snapshot(model) == before
    assert torch.equal(under_no_grad, plain) and torch.equal(under_inference, plain)
    assert not plain.requires_grad and not under_no_grad.requires_grad
    assert float((fd - plain).abs().max()) <= 1e-6 * float(plain.abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_an_unused_parameter_gives_zero_rows_and_columns(method):
    model, data = _problem()
    model.drop.eval()
    op = HessianOperator(model, data, _ce, method=method)
    sl = op.layout.slices()["unused"]
    assert sl.stop - sl.start == 4
    used = torch.ones(op.size, dtype=torch.bool)
    used[sl] = False
    V = torch.cat(
        [
            torch.randn(3, op.size, generator=torch.Generator().manual_seed(8), dtype=F64),
            torch.eye(op.size, dtype=F64)[sl],  # H e_i: the unused columns
        ]
    )
    out = op @ V
    assert torch.equal(out[:, sl], torch.zeros(7, 4, dtype=F64))  # rows
    assert torch.equal(out[3:], torch.zeros(4, op.size, dtype=F64))  # columns
    assert float(out[:3].abs().max()) > 0
    if method == "autograd":
        ref_model = copy.deepcopy(model)
        torch.func.replace_all_batch_norm_modules_(ref_model)
        ref_model.count_calls = False
        H_ref = dense_loss_hessian(ref_model, data, _ce, [n for n in op.names if n != "unused"])
        want = V[:3, used] @ H_ref
        assert float((out[:3, used] - want).abs().max()) <= tol(F64) * float(want.abs().max())


def test_a_loss_fn_that_misbehaves_is_undone():
    model, data = _problem()
    before = snapshot(model)

    def rude(m, b):
        m.eval()  # flips modes
        m.frozen.weight.requires_grad_(True)  # flips a flag
        torch.rand(3)  # draws from the global RNG
        with torch.no_grad():
            m.bn.running_mean.add_(1.0)
            m.calls = torch.zeros((), dtype=torch.long)  # re-assigns a buffer
        loss = _ce(m, b)
        loss.backward(retain_graph=True)  # accumulates into .grad (and creates some)
        return loss

    op = HessianOperator(model, data, rude)
    op.matvec(torch.ones(op.size, dtype=F64))
    assert snapshot(model) == before


@pytest.mark.parametrize("method", METHODS)
def test_a_graph_built_before_still_backpropagates_after_products(method):
    model, data = _problem()
    model.drop.eval()
    for p in model.parameters():
        p.grad = None
    pending = _ce(model, data[0])  # saves the weights for its backward
    op = HessianOperator(model, data, _ce, method=method)
    op.matmat(torch.randn(2, op.size, generator=torch.Generator().manual_seed(7), dtype=F64))
    pending.backward()  # no "modified by an inplace operation"
    got = model.head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    _ce(model, data[0]).backward()
    assert torch.equal(got, model.head.weight.grad)


def test_the_global_rng_stream_is_not_consumed():
    model, data = _problem()
    op = HessianOperator(model, data, _ce)
    torch.manual_seed(42)
    expected = torch.rand(5)
    torch.manual_seed(42)
    op.matvec(torch.ones(op.size, dtype=F64))
    assert torch.equal(torch.rand(5), expected)


# -- the guards themselves ---------------------------------------------------------------------
def test_preserved_model_restores_everything_when_the_body_raises():
    model, _ = _problem()
    params = [model.conv.weight, model.head.bias]
    before = snapshot(model)
    with pytest.raises(ValueError, match="boom"), preserved_model(model, params) as snap:
        assert torch.is_grad_enabled()
        assert len(snap.params) == 2 and torch.equal(snap.params[0], model.conv.weight)
        with torch.no_grad():
            model.conv.weight.data.add_(1.0)
            model.head.bias.data.mul_(-3.0)
            model.bn.running_var.mul_(2.0)
            model.bn.num_batches_tracked += 5
            model.conv.weight.grad.add_(1.0)
        model.head.weight.grad = torch.ones_like(model.head.weight)
        model.conv.weight.grad = torch.zeros_like(model.conv.weight)
        model.train(False)
        model.head.weight.requires_grad_(False)
        torch.randn(10)
        snap.reset_buffers()
        assert torch.equal(model.bn.num_batches_tracked, torch.tensor(0))
        raise ValueError("boom")
    assert snapshot(model) == before


def test_batch_rng_repeats_draws_per_index_and_restores_the_global_rng():
    state = torch.get_rng_state()
    with batch_rng((2, 0), seed=7):
        a = torch.rand(4)
    with batch_rng((2, 0), seed=7):
        b = torch.rand(4)
    with batch_rng((2, 1), seed=7):
        c = torch.rand(4)
    with batch_rng((2, 0), seed=8):
        d = torch.rand(4)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_products_match_the_cpu_and_leave_the_cuda_rng_alone():
    model, data = _transformer()
    model.eval()
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=F64)
    cpu = HessianOperator(model, data, _ce) @ V
    model.cuda()
    op = HessianOperator(model, data, _ce)  # batches follow the parameters' device
    assert op.device.type == "cuda"
    got = op @ V.cuda()
    assert float((got.cpu() - cpu).abs().max()) <= tol(F64) * float(cpu.abs().max())
    model.train()  # dropout on the CUDA generator
    op = HessianOperator(model, data, _ce)
    state = torch.cuda.get_rng_state()
    first = op @ V.cuda()
    assert torch.equal(op @ V.cuda(), first)
    assert torch.equal(torch.cuda.get_rng_state(), state)
