"""Operators under abuse: odd models, odd inputs, and nothing of the caller's changed.

Every case runs over each operator built from a model and data: the Hessian
(autograd and finite differences), the GGN, the empirical Fisher and the
Monte-Carlo Fisher (``OPERATORS``). Products are compared with a fresh
operator built outside the abuse, or with a dense float64 Hessian; errors are
matched on our own messages.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from hessian_spectra import (
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MCFisherOperator,
    ZeroCurvatureWarning,
    assert_microbatch_safe,
    iterate_batches,
    loss_hessian_matrix,
    move_batch_to_device,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
)
from hessian_spectra.cli import app
from reference import tol

F64 = torch.float64
CE = supervised_loss(F.cross_entropy)
FORWARD = supervised_forward()
CE_OUT = supervised_loss_of_output(F.cross_entropy)
FD_RTOL = 1e-7  # finite differences in float64: O(eps^2) truncation with eps = 6e-6

Make = Callable[..., Any]

OPERATORS: dict[str, Make] = {
    "hessian": lambda m, d, **kw: HessianOperator(m, d, CE, **kw),
    "hessian_fd": lambda m, d, **kw: HessianOperator(m, d, CE, method="finite_difference", **kw),
    "ggn": lambda m, d, **kw: GGNOperator(m, d, FORWARD, CE_OUT, **kw),
    "empirical_fisher": lambda m, d, **kw: EmpiricalFisherOperator(m, d, CE, **kw),
    "mc_fisher": lambda m, d, **kw: MCFisherOperator(m, d, FORWARD, CE_OUT, **kw),
}
MICROBATCHING = ["hessian", "hessian_fd", "ggn", "mc_fisher"]  # those with microbatch_size


def _rtol(kind: str) -> float:
    return FD_RTOL if kind == "hessian_fd" else tol(F64)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-300)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data(n: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(X[:8], y[:8]), (X[8:], y[8:])]


def _vectors(n: int, k: int = 2) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(1), dtype=F64)


# -- item 3: microbatching a model that couples the samples of a batch ---------------------


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.BatchNorm1d(4), nn.Tanh())
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.inp(x)))


@pytest.mark.parametrize("kind", MICROBATCHING)
def test_microbatching_train_mode_batchnorm_is_refused_naming_the_module(kind):
    torch.manual_seed(0)
    model, data = BNNet().double().train(), _data()
    with pytest.raises(ValueError, match=r"'block\.0' \(BatchNorm1d\).*microbatch_unsafe=True"):
        OPERATORS[kind](model, data, microbatch_size=4)
    # the user's opt-in builds it; batches no larger than the microbatch need no check
    OPERATORS[kind](model, data, microbatch_size=4, microbatch_unsafe=True)
    OPERATORS[kind](model, data, microbatch_size=8)
    # eval mode is safe and the microbatched matrix is the whole-batch one (the MC
    # Fisher's draws are seeded per microbatch: another sample of the same expectation)
    model.eval()
    V = _vectors(sum(p.numel() for p in model.parameters()))
    op = OPERATORS[kind](model, data, microbatch_size=4)
    if kind != "mc_fisher":
        ref = OPERATORS[kind](model, data) @ V
        assert _close(op @ V, ref, _rtol(kind))
    model.train()  # a later switch to train mode is caught at the next product
    with pytest.raises(ValueError, match=r"'block\.0' \(BatchNorm1d\)"):
        op @ V


def test_assert_microbatch_safe_lists_only_batch_statistics_layers():
    safe = nn.Sequential(
        nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4)
    ).train()
    assert_microbatch_safe(safe)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert_microbatch_safe(bn.eval())
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        assert_microbatch_safe(bn.train())
    # without running statistics BatchNorm uses batch statistics in eval mode too
    no_stats = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"'0' \(BatchNorm2d\)"):
        assert_microbatch_safe(no_stats)


def test_iterate_batches_and_move_batch_to_device():
    assert list(iterate_batches(iter(range(10)), num_batches=3)) == [0, 1, 2]
    assert list(iterate_batches([1, 2])) == [1, 2]
    with pytest.raises(ValueError, match="num_batches must be None or an int >= 0"):
        list(iterate_batches([1], num_batches=-1))
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    batch = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": Pair(torch.ones(1), "s")}
    moved = move_batch_to_device(batch, "meta")
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == 3 and isinstance(moved["b"], Pair) and moved["b"].y == "s"
    assert moved["b"].x.device.type == "meta"


# -- item 6: inference mode --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_inference_mode_batches_vectors_and_products(kind):
    model, data = _mlp(), _data()
    V = _vectors(sum(p.numel() for p in model.parameters()))
    ref = OPERATORS[kind](model, data) @ V
    with torch.inference_mode():
        inf_data = [(x.clone(), y.clone()) for x, y in data]
        inf_V = V.clone()
    assert inf_data[0][0].is_inference()
    op = OPERATORS[kind](model, inf_data)  # batches made under inference mode
    assert _close(op @ inf_V, ref, _rtol(kind))
    with torch.inference_mode():  # the product called under inference mode
        op2 = OPERATORS[kind](model, inf_data)
        out = op2 @ inf_V
    assert _close(out, ref, _rtol(kind))
    with torch.no_grad():
        assert _close(op2 @ V, ref, _rtol(kind))


# -- item 7: the caller's random states ----------------------------------------------------


class NoisyNet(nn.Module):
    """Draws from NumPy's, Python's and torch's global generators in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = np.random.rand() + random.random() + torch.rand(())
        return torch.tanh(self.lin(x)) * (1.0 + 0.0 * noise)


def _rng_states() -> tuple[Any, ...]:
    np_state = np.random.get_state()
    return (torch.get_rng_state(), np_state[1].copy(), np_state[2:], random.getstate())


def _same_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_building_over_a_dataloader_and_products_leave_every_rng_alone(kind):
    torch.manual_seed(0)
    model = NoisyNet().double()
    X, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 3, (12,))
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=False)
    np.random.seed(3)
    random.seed(4)
    before = _rng_states()
    op = OPERATORS[kind](model, loader)
    assert _same_states(before, _rng_states()), "construction changed a global RNG"
    op @ _vectors(op.size)
    op @ _vectors(op.size)[0]
    assert _same_states(before, _rng_states()), "a product changed a global RNG"


# -- item 8: parameters and buffers changed during a product ---------------------------------


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_a_parameter_changed_during_a_product_is_restored_and_reported(kind):
    model, data = _mlp(), _data()
    before = model[2].weight.detach().clone()

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        with torch.no_grad():
            module.weight.data.mul_(0.5)

    handle = model[2].register_forward_hook(hook)
    op = OPERATORS[kind](model, data)
    with pytest.raises(ValueError, match=r"parameter '2\.weight' \(of Linear\) changed during"):
        op @ _vectors(op.size)
    handle.remove()
    assert torch.equal(model[2].weight, before)


def test_above_the_copy_budget_a_changed_parameter_is_still_reported(monkeypatch):
    import hessian_spectra.state as state

    monkeypatch.setattr(state, "PARAM_COPY_BYTES", 0)  # no copy: a checksum per parameter
    model, data = _mlp(), _data()

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        module.bias.data.add_(1.0)

    handle = model[0].register_forward_hook(hook)
    op = HessianOperator(model, data, CE)
    with pytest.raises(ValueError, match=r"'0\.bias' \(of Linear\).*no copy was kept"):
        op @ _vectors(op.size)
    handle.remove()


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_a_buffer_registered_by_a_hook_during_a_product_is_removed(kind):
    model, data = _mlp(), _data()
    V = _vectors(sum(p.numel() for p in model.parameters()))
    ref = OPERATORS[kind](model, data) @ V

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        module.register_buffer("seen", torch.ones(1))

    handle = model[0].register_forward_hook(hook)
    out = OPERATORS[kind](model, data) @ V
    handle.remove()
    assert "seen" not in dict(model[0].named_buffers())
    assert _close(out, ref, _rtol(kind))


# -- item 11: zero curvature from the set-up -----------------------------------------------


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.spare = nn.Linear(3, 3)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_a_filter_selecting_only_unused_parameters_warns_once(kind):
    torch.manual_seed(0)
    model, data = WithUnused().double(), _data()
    op = OPERATORS[kind](model, data, param_filter=lambda n, p: n.startswith("spare"))
    V = _vectors(op.size)
    with pytest.warns(ZeroCurvatureWarning, match=r"'spare\.weight', 'spare\.bias'.*param_filter"):
        out = op @ V
    assert float(out.abs().max()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroCurvatureWarning)
        op @ V  # once per operator
        # an operator over used parameters never warns
        OPERATORS[kind](model, data, param_filter=lambda n, p: n.startswith("lin")) @ V


@pytest.mark.parametrize("cls", [GGNOperator, MCFisherOperator])
def test_a_detached_forward_output_warns(cls):
    model, data = _mlp(), _data()
    op = cls(model, data, lambda m, b: m(b[0]).detach(), CE_OUT)
    with pytest.warns(ZeroCurvatureWarning, match="without an autograd graph"):
        out = op @ _vectors(op.size)
    assert float(out.abs().max()) == 0.0


# -- item 12: our messages instead of torch's -----------------------------------------------


class CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("kind", ["ggn", "mc_fisher"])
def test_a_buffer_updated_in_forward_is_named(kind):
    model = CountingNet().double()
    op = OPERATORS[kind](model, _data())
    with pytest.raises(ValueError, match=r"updates buffer\(s\) 'calls' in place.*HessianOperator"):
        op @ _vectors(op.size)
    assert float(model.calls) == 0.0


def test_loss_hessian_matrix_of_a_train_mode_batchnorm_model():
    torch.manual_seed(0)
    model, data = BNNet().double().train(), _data()
    X, y = data[0]
    H = loss_hessian_matrix(model, nn.CrossEntropyLoss(), X, y, eval_mode=False)
    # reference: plain double backward (torch.autograd.functional) on a copy in train mode
    copy = BNNet().double().train()
    copy.load_state_dict(model.state_dict())
    named = dict(copy.named_parameters())
    shapes = {n: p.shape for n, p in named.items()}
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(
            zip(shapes, torch.split(flat, [s.numel() for s in shapes.values()]), strict=True)
        )
        params = {n: parts[n].reshape(shapes[n]) for n in shapes}
        return F.cross_entropy(torch.func.functional_call(copy, params, (X,)), y)

    ref = torch.autograd.functional.hessian(loss, theta)
    assert _close(H, ref, tol(F64))
    assert float(model.block[0].running_mean.abs().max()) == 0.0  # untouched
    with pytest.raises(ValueError, match=r"updates buffer\(s\) 'calls' in place"):
        loss_hessian_matrix(CountingNet().double(), nn.CrossEntropyLoss(), X, y)


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.lin(x)}


@pytest.mark.parametrize("make", [supervised_loss, supervised_forward])
def test_a_model_returning_a_dict(make):
    model, data = DictNet().double(), _data()
    if make is supervised_loss:
        op = HessianOperator(model, data, make(F.cross_entropy))
        match = r"returned a dict with keys \['logits'\].*\['logits'\]"
    else:
        op = GGNOperator(model, data, make(), CE_OUT)
        match = "forward_fn must return one tensor"
    with pytest.raises(TypeError, match=match):
        op @ _vectors(op.size)


def test_integer_forward_output_is_refused():
    op = GGNOperator(_mlp(), _data(), lambda m, b: m(b[0]).argmax(1), CE_OUT)
    with pytest.raises(TypeError, match=r"floating-point output.*got dtype torch\.int64"):
        op @ _vectors(op.size)


def test_dense_and_lambda_operator_arguments():
    with pytest.raises(ValueError, match=r"non-empty \(n, n\) matrix"):
        DenseOperator(torch.zeros(0, 0))
    op = DenseOperator(torch.eye(3, dtype=F64))
    with pytest.raises(TypeError, match=r"dense \(strided\) tensor.*to_dense"):
        op @ torch.eye(3, dtype=F64)[0].to_sparse()
    lam = LambdaOperator(matvec=lambda v: 2 * v, size=3, dtype="float64")
    assert lam.dtype == F64 and torch.equal(
        lam @ torch.ones(3, dtype=F64), torch.full((3,), 2.0, dtype=F64)
    )
    assert LambdaOperator(matvec=lambda v: v, size=3, dtype="torch.float16").dtype == torch.float16
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        LambdaOperator(matvec=lambda v: v, size=3, dtype="double64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'cuda' needs CUDA.*device='cpu'"):
            LambdaOperator(matvec=lambda v: v, size=3, device="cuda")


@pytest.mark.parametrize(
    ("loss_fn", "shown"),
    [
        (nn.CrossEntropyLoss(), r"nn\.CrossEntropyLoss\(\)"),
        (F.cross_entropy, r"F\.cross_entropy"),
    ],
)
@pytest.mark.parametrize("cls", [HessianOperator, EmpiricalFisherOperator])
def test_a_criterion_passed_as_loss_fn(cls, loss_fn, shown):
    with pytest.raises(TypeError, match=rf"criterion {shown}.*supervised_loss\({shown}\)"):
        cls(_mlp(), _data(), loss_fn)


def test_a_function_of_output_and_target_passed_as_loss_fn():
    op = HessianOperator(_mlp(), _data(), lambda out, target: F.cross_entropy(out, target))
    with pytest.raises(
        TypeError, match=r"treating the model \(Sequential\) as a tensor.*supervised_loss"
    ):
        op @ _vectors(op.size)


def test_an_xy_tuple_passed_as_the_dataloader():
    X, y = _data()[0]
    for kind in OPERATORS:
        with pytest.raises(TypeError, match=r"one \(X, y\) batch.*\[\(X, y\)\]"):
            OPERATORS[kind](_mlp(), (X, y))
        # the list [X, y] too (features and 1-d labels), with the way out for real batches
        with pytest.raises(TypeError, match=r"a list of 2 tensors.*\(b for b in batches\)"):
            OPERATORS[kind](_mlp(), [X, y])


def test_a_list_of_tensor_batches_of_one_rank_is_read_as_batches():
    """Token batches of different lengths are a real list of batches: two batches read."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(0), nn.Linear(3, 1)).double()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, 5, (4, 2), generator=g)
    loss = lambda m, ids: m[0](ids).pow(2).mean()  # noqa: E731
    op = HessianOperator(model, [a, b], loss)
    assert op.batches.num_batches == 2


def test_dict_batches_with_a_tuple_style_loss():
    data = [{"x": x, "y": y} for x, y in _data()]
    with pytest.raises(TypeError, match=r"keys \['x', 'y'\].*batch\['x'\]"):
        HessianOperator(_mlp(), data, CE) @ _vectors(31)
    own = HessianOperator(_mlp(), data, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(TypeError, match=r"indexed a dict batch by position \(batch\[0\]\)"):
        own @ _vectors(31)
    ggn = GGNOperator(_mlp(), data, lambda m, b: m(b[0]), CE_OUT)
    with pytest.raises(TypeError, match=r"forward_fn indexed a dict batch by position"):
        ggn @ _vectors(31)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--out", "{file}"], "exists and is not a directory"),
        (["--seed", str(2**70)], r"seed must be an int in \[0, 2\*\*63\)"),
        (["--k", "100000"], "k must be an int from 1 to 2410"),
    ],
)
def test_cli_user_mistakes_give_one_line_and_exit_code_2(tmp_path, args, match):
    file = tmp_path / "taken"
    file.write_text("")
    args = [a.replace("{file}", str(file)) for a in args]
    res = CliRunner().invoke(app, ["demo", *args])
    assert res.exit_code == 2
    text = res.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1
    assert text.startswith("Error: ")
    import re

    assert re.search(match, text)
