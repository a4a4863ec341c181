"""The graphs HessianOperator keeps between products: used while valid, dropped on any change.

Every product is checked against a dense float64 Hessian of the current model and data
(tests/reference.py), and the forward passes are counted through the loss function.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hessian_spectra.operators import HessianOperator
from reference import dense_loss_hessian, tol

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class CountingLoss:
    """Cross-entropy that counts its calls (one per batch forward)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, m: nn.Module, b) -> torch.Tensor:
        self.calls += 1
        return F.cross_entropy(m(b[0]), b[1])


def _problem(dropout: float = 0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    model = nn.Sequential(*layers, nn.Linear(8, 3)).double()
    g = _gen(1)
    data = [
        (torch.randn(12, 5, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)),
        (torch.randn(7, 5, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)),
    ]
    return model, data


def _dense(model, data):
    return dense_loss_hessian(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def test_graphs_are_kept_and_later_products_skip_the_forward():
    model, data = _problem()
    before = copy.deepcopy(model.state_dict())
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    H = _dense(model, data)
    V = torch.randn(4, op.size, generator=_gen(2), dtype=F64)
    assert _rel(op @ V, V @ H) <= tol(F64)
    assert loss.calls == 2  # one forward per batch
    assert len(op._graph_cache.graphs) == 2 and op._graph_cache.nbytes > 0
    for _ in range(3):
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert _rel(op @ V[1], H @ V[1]) <= tol(F64)
    assert loss.calls == 2  # the kept graphs served every later product
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    op.clear_graphs()
    assert _rel(op @ V, V @ H) <= tol(F64) and loss.calls == 4


@pytest.mark.parametrize("how", ["optimizer", "data", "load_state_dict"])
def test_a_changed_parameter_drops_the_graphs(how):
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    V = torch.randn(3, op.size, generator=_gen(3), dtype=F64)
    op @ V
    if how == "optimizer":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elif how == "data":  # bypasses autograd's version counters
        model[0].weight.data.mul_(1.5)
    else:
        state = copy.deepcopy(model.state_dict())
        state["2.bias"] += 1.0
        model.load_state_dict(state)
    H = _dense(model, data)
    calls = loss.calls
    assert _rel(op @ V, V @ H) <= tol(F64)
    assert loss.calls == calls + 2  # rebuilt from the new parameters


def test_seed_and_mode_changes_drop_the_graphs():
    model, data = _problem(dropout=0.3)
    model.train()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss, seed=1)
    V = torch.randn(3, op.size, generator=_gen(4), dtype=F64)
    first = op @ V
    assert torch.equal(op @ V, first) and loss.calls == 2
    op.seed = 2  # other dropout masks: another matrix
    other = op @ V
    assert loss.calls == 4 and not torch.allclose(other, first)
    fresh = HessianOperator(model, data, loss, seed=2)
    fresh.graph_cache_bytes = 0
    assert _rel(other, fresh @ V) <= tol(F64)
    model.eval()  # no dropout: the dense Hessian
    calls = loss.calls
    assert _rel(op @ V, V @ _dense(model, data)) <= tol(F64)
    assert loss.calls == calls + 2


def test_new_or_changed_batch_tensors_are_not_served_old_graphs():
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    V = torch.randn(2, op.size, generator=_gen(5), dtype=F64)
    op @ V
    data[0][0].mul_(2.0)  # in place: the tensor's version moves
    assert _rel(op @ V, V @ _dense(model, data)) <= tol(F64)
    assert loss.calls == 3  # only the changed batch was rebuilt


def test_microbatches_sliced_again_reuse_their_graphs_until_the_data_changes():
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss, microbatch_size=5)  # 12 + 7 samples: 3 + 2 chunks
    V = torch.randn(2, op.size, generator=_gen(7), dtype=F64)
    H = _dense(model, data)
    assert _rel(op @ V, V @ H) <= tol(F64) and loss.calls == 5
    assert _rel(op @ V, V @ H) <= tol(F64) and loss.calls == 5
    data[1][0].add_(0.5)  # the base tensor changes: its slices share its version
    assert _rel(op @ V, V @ _dense(model, data)) <= tol(F64)
    assert loss.calls == 7  # the two chunks of the changed batch were rebuilt


def test_budget_zero_or_too_small_keeps_nothing_and_stays_exact():
    model, data = _problem()
    H = _dense(model, data)
    V = torch.randn(3, H.shape[0], generator=_gen(6), dtype=F64)
    for budget in (0, 1000):  # 1000 bytes: less than the parameters' copy
        loss = CountingLoss()
        op = HessianOperator(model, data, loss)
        op.graph_cache_bytes = budget
        for i in range(3):
            assert _rel(op @ V, V @ H) <= tol(F64)
            assert loss.calls == 2 * (i + 1)
        assert op._graph_cache.graphs == {}
        op.graph_cache_bytes = 2**20  # a budget that fits: kept from the next product
        op @ V
        op @ V
        assert loss.calls == 8


def test_block_row_cost_is_known_only_over_kept_graphs():
    """``block_row_cost``: 1.0 after a product whose batches all came from kept graphs and
    whose rows looped; ``None`` while graphs are built, when none are kept, or for vmapped
    rows (their measured ratio leaves out what a block shares per call)."""
    model, data = _problem()
    H = _dense(model, data)
    looped = HessianOperator(model, data, CountingLoss())
    V = torch.randn(3, looped.size, generator=_gen(3), dtype=F64)
    looped.block_mechanism = "loop"
    assert looped.block_row_cost is None  # no product yet
    assert _rel(looped @ V, V @ H) <= tol(F64)
    assert looped.block_row_cost is None  # this product built the graphs
    assert _rel(looped @ V, V @ H) <= tol(F64)
    assert looped.block_row_cost == 1.0  # every batch from its kept graph
    with torch.no_grad():
        model[0].weight.add_(0.1)
    H2 = _dense(model, data)
    assert _rel(looped @ V, V @ H2) <= tol(F64)
    assert looped.block_row_cost is None  # the change rebuilt the graphs

    vmapped = HessianOperator(model, data, CountingLoss())
    vmapped.block_mechanism = "vmap"
    unkept = HessianOperator(model, data, CountingLoss())
    unkept.block_mechanism, unkept.graph_cache_bytes = "loop", 0
    for op in (vmapped, unkept):
        for _ in range(2):
            assert _rel(op @ V, V @ H2) <= tol(F64)
        assert op.block_row_cost is None


def test_rows_per_pass_follow_the_memory_budget_and_stay_exact():
    """``block_bytes``: a chunk holds ``block_bytes // (2 s + 16 v)`` rows (``s`` the bytes
    the batch's graph saves, ``v`` a parameter vector), at least 1, at most ``max_block``;
    every chunking gives the dense Hessian."""
    from hessian_spectra.operators._chunks import HESSIAN_ROW_FACTOR, ROW_VECTORS

    model, data = _problem()
    data = data[:1]
    H = _dense(model, data)
    op = HessianOperator(model, data, CountingLoss())
    V = torch.randn(7, op.size, generator=_gen(4), dtype=F64)
    assert _rel(op @ V, V @ H) <= tol(F64)
    (saved,) = [entry[2] for entry in op._graph_cache.graphs.values()]
    assert saved > 0
    per_row = HESSIAN_ROW_FACTOR * saved + ROW_VECTORS * op.size * 8
    for budget, rows in ((1, 1), (int(3 * per_row) + 1, 3), (10**15, op.max_block)):
        op.block_bytes = budget
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert op.block_rows == rows
    op.block_bytes = None  # half the free memory: this tiny model fits max_block rows
    assert _rel(op @ V, V @ H) <= tol(F64) and op.block_rows == op.max_block
    for bad in (0, -5, 1.5, True):
        op.block_bytes = bad
        with pytest.raises(ValueError, match="block_bytes must be a positive number of bytes"):
            op @ V
