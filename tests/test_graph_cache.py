"""The graphs HessianOperator keeps: only inside ``keep_graphs()`` (one algorithm call, or a
block the user opens), dropped on exit, so nothing changed between products or calls can be
served a stale graph.

Every product is checked against a dense float64 Hessian of the current model and data
(tests/reference.py) or a freshly built operator, and the forward passes are counted through
the loss function.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hessian_spectra import NonFiniteError
from hessian_spectra.algorithms import (
    ConvergenceWarning,
    block_lanczos,
    deflated_power_iteration,
    dense_eigh,
    diagonal,
    eigenpairs,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    lanczos_tridiagonal,
    power_iteration,
    spectral_density,
    trace,
)
from hessian_spectra.operators import HessianOperator
from reference import check_pairs, dense_loss_hessian, tol

F64 = torch.float64
F32 = torch.float32


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


def _offered(op: HessianOperator) -> list[weakref.ref]:
    """Weak references to every gradient graph the operator offers to keep."""
    refs: list[weakref.ref] = []
    offer = op._graph_cache.offer

    def spy(index, batch, grads, nbytes):
        refs.extend(weakref.ref(g) for g in grads if g is not None)
        offer(index, batch, grads, nbytes)

    op._graph_cache.offer = spy
    return refs


def _released(refs: list[weakref.ref]) -> bool:
    gc.collect()
    return bool(refs) and all(r() is None for r in refs)


# -- the scope -------------------------------------------------------------------------------
def test_graphs_are_kept_inside_keep_graphs_and_released_on_exit():
    model, data = _problem()
    before = copy.deepcopy(model.state_dict())
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    refs = _offered(op)
    H = _dense(model, data)
    V = torch.randn(4, op.size, generator=_gen(2), dtype=F64)
    for i in range(2):  # outside a block every product builds its graphs
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert loss.calls == 2 * (i + 1) and op._graph_cache.graphs == {}
    assert refs == []  # nothing was offered to be kept
    with op.keep_graphs():
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert loss.calls == 6  # one forward per batch
        assert len(op._graph_cache.graphs) == 2 and op._graph_cache.nbytes > 0
        for _ in range(3):
            assert _rel(op @ V, V @ H) <= tol(F64)
            assert _rel(op @ V[1], H @ V[1]) <= tol(F64)
        assert loss.calls == 6  # the kept graphs served every later product
    assert op._graph_cache.graphs == {} and op._graph_cache.nbytes == 0
    assert _released(refs)  # the graphs' memory is free
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert _rel(op @ V, V @ H) <= tol(F64) and loss.calls == 8


def _count_guards(op: HessianOperator) -> list[int]:
    """A one-element counter of the times a product enters the operator's model guard."""
    count = [0]
    guard = op._guard

    def counted(*args, **kwargs):
        count[0] += 1
        return guard(*args, **kwargs)

    op._guard = counted
    return count


def test_products_from_kept_graphs_skip_the_guard_and_leave_the_model_as_it_was():
    """Over kept graphs no forward runs, so a product is only the second backward: the
    guard (parameter copy and comparison, RNG states) runs for the product that builds the
    graphs and not again; the products stay the dense Hessian's and the model, its
    gradients and the global RNG are untouched."""
    model, data = _problem(dropout=0.2)
    model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = copy.deepcopy(model.state_dict())
    op = HessianOperator(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    guards = _count_guards(op)
    H = _dense(model, data)
    V = torch.randn(3, op.size, generator=_gen(2), dtype=F64)
    rng = torch.get_rng_state()
    with op.keep_graphs():
        for _ in range(4):
            assert _rel(op @ V, V @ H) <= tol(F64)
            assert _rel(op @ V[0], H @ V[0]) <= tol(F64)
        assert guards[0] == 1
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    check_pairs(H, lanczos(op, k=2, which="LA", tol=1e-8, seed=0), 2, "LA", rtol=1e-8)
    assert guards[0] == 2  # one guarded product per algorithm call


def test_a_parameter_written_in_place_inside_the_scope_gets_new_graphs():
    """Inside a user's ``keep_graphs()`` block a selected parameter written in place (its
    autograd version moves) drops the kept graphs: the next product is the Hessian at the
    new values, not a stale one."""
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    V = torch.randn(2, op.size, generator=_gen(2), dtype=F64)
    with op.keep_graphs():
        op @ V
        op @ V
        assert loss.calls == 2
        with torch.no_grad():
            model[2].bias.add_(0.7)  # the bias is not saved by the graph: no autograd error
            model[0].weight.mul_(1.3)
        H = _dense(model, data)
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert loss.calls == 4


def test_a_non_finite_product_over_kept_graphs_is_reported_like_any_other():
    model, data = _problem()
    op = HessianOperator(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    V = torch.randn(op.size, generator=_gen(2), dtype=F64)
    with op.keep_graphs():
        op @ V
        bad = V.clone()
        bad[3] = float("inf")
        with pytest.raises(NonFiniteError, match=r"non-finite|NaN or inf"):
            op @ bad


def test_inner_block_keeps_the_outer_ones_graphs_and_errors_drop_them():
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    H = _dense(model, data)
    V = torch.randn(2, op.size, generator=_gen(3), dtype=F64)
    with op.keep_graphs():
        op @ V
        with op.keep_graphs():
            assert _rel(op @ V, V @ H) <= tol(F64)
        res = lanczos(op, k=2, seed=0)  # an algorithm inside the user's block
        assert len(op._graph_cache.graphs) == 2  # neither inner exit dropped them
        assert _rel(op @ V, V @ H) <= tol(F64)
    assert loss.calls == 2  # one forward per batch for everything in the block
    check_pairs(H, res, 2, "LA")
    assert op._graph_cache.graphs == {}
    for error in (KeyboardInterrupt, RuntimeError):
        refs = _offered(op)
        with pytest.raises(error), op.keep_graphs():
            op @ V
            raise error("stop")
        assert op._graph_cache.graphs == {} and _released(refs)


def test_an_interrupted_algorithm_keeps_nothing():
    """A ``KeyboardInterrupt`` raised inside the loss of the second batch ends the
    algorithm's block: the first batch's graph is dropped and the model is restored."""
    model, data = _problem()
    before = copy.deepcopy(model.state_dict())

    def interrupting(m, b):
        if b[0].shape[0] == 7:
            raise KeyboardInterrupt
        return F.cross_entropy(m(b[0]), b[1])

    op = HessianOperator(model, data, interrupting)
    refs = _offered(op)
    with pytest.raises(KeyboardInterrupt):
        lanczos(op, k=1, seed=0)
    assert op._graph_cache.graphs == {} and _released(refs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


ALGORITHMS = {
    "lanczos": lambda op: lanczos(op, k=2, seed=0),
    "block_lanczos": lambda op: block_lanczos(op, k=2, seed=0),
    "eigenpairs": lambda op: eigenpairs(op, k=2, seed=0),
    "power_iteration": lambda op: power_iteration(op, max_matvecs=30, tol=1e-3, seed=0),
    "deflated_power_iteration": lambda op: deflated_power_iteration(
        op, k=2, max_matvecs=40, tol=1e-3, seed=0
    ),
    "spectral_density": lambda op: spectral_density(op, num_runs=2, lanczos_steps=6, seed=0),
    "hutchinson": lambda op: hutchinson(op, num_matvecs=8, seed=0),
    "hutch_plus_plus": lambda op: hutch_plus_plus(op, num_matvecs=9, seed=0),
    "trace_exact": lambda op: trace(op, method="exact"),
    "diagonal": lambda op: diagonal(op, num_matvecs=8, seed=0),
    "dense_eigh": lambda op: dense_eigh(op),
    "to_dense": lambda op: op.to_dense(chunk_size=16),
    "lanczos_tridiagonal": lambda op: lanczos_tridiagonal(
        op, torch.ones(op.size, dtype=F64), max_iter=5
    ),
}


@pytest.mark.filterwarnings("ignore::hessian_spectra.algorithms.ConvergenceWarning")
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_builds_each_graph_once_and_keeps_nothing_after(name):
    """Inside a run the graphs are reused (one forward per batch for all its products);
    after it returns the operator holds no graph and their memory is free."""
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    refs = _offered(op)
    ALGORITHMS[name](op)
    assert op.num_matvecs >= 5
    assert loss.calls == len(data)
    assert op._graph_cache.graphs == {} and _released(refs)


def test_lanczos_result_over_kept_graphs_is_the_dense_hessians():
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    res = lanczos(op, k=3, seed=0)
    check_pairs(_dense(model, data), res, 3, "LA")
    assert res.num_matvecs > 3 * len(data) and loss.calls == len(data)


# -- every change between two products or two algorithm calls ------------------------------
class _Net(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(5, 8), nn.Dropout(dropout), nn.Linear(8, 3)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x)))) / self.temperature


def _change(kind: str, model: _Net, data, op: HessianOperator, coef: list[float]) -> None:
    if kind == "non_selected_parameter":
        with torch.no_grad():
            model.fc1.weight.mul_(1.5)
    elif kind == "model_attribute":
        model.temperature = 0.5
    elif kind == "dropout_p":
        model.drop.p = 0.6
    elif kind == "closure_coefficient":
        coef[0] = 2.0
    elif kind == "loss_fn":
        op.loss_fn = lambda m, b: 0.5 * (m(b[0]) ** 2).mean()
    elif kind == "numpy_view":
        x = data[0][0].numpy()  # shares memory; torch's version counter does not move
        x *= 1.7
    elif kind == "replaced_parameter":
        model.fc2.weight = nn.Parameter(model.fc2.weight.detach() * 1.5)
    else:
        assert kind == "autocast"  # the change is the autocast of the first call


CHANGES = [
    "non_selected_parameter",
    "model_attribute",
    "dropout_p",
    "closure_coefficient",
    "loss_fn",
    "numpy_view",
    "autocast",
    "replaced_parameter",
]


@pytest.mark.parametrize("between", ["products", "algorithm_calls"])
@pytest.mark.parametrize("kind", CHANGES)
def test_after_any_change_a_product_equals_a_fresh_operators(kind, between):
    """Made between two products or two algorithm calls, each change gives the product
    of a freshly built operator (and of the dense float64 Hessian where there is no
    dropout); the answer before the change, which a kept graph would have served, differs."""
    dtype = F32 if kind == "autocast" else F64
    torch.manual_seed(0)
    model = _Net(dropout=0.3 if kind == "dropout_p" else 0.0).to(dtype)
    model.train(kind == "dropout_p")
    g = _gen(1)
    data = [
        (torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
        for n in (12, 7)
    ]
    coef = [1.0]

    def loss(m, b):
        return F.cross_entropy(coef[0] * m(b[0]), b[1])

    def fc2(name, p):
        return name.startswith("fc2.")

    op = HessianOperator(model, data, loss, param_filter=fc2)
    V = torch.randn(3, op.size, generator=_gen(2), dtype=dtype)
    first = torch.autocast("cpu", dtype=torch.bfloat16) if kind == "autocast" else None
    with first or contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # bf16 products stagnate early
        stale = HessianOperator(model, data, loss, param_filter=fc2) @ V
        if between == "products":
            op @ V
        else:
            lanczos(op, k=1, seed=0)
    _change(kind, model, data, op, coef)
    fresh = HessianOperator(model, data, op.loss_fn, param_filter=fc2)
    want = fresh @ V
    assert _rel(stale, want) > 1e-4  # the change changed the matrix
    assert _rel(op @ V, want) <= tol(dtype)
    if kind != "dropout_p":
        H = dense_loss_hessian(model, data, op.loss_fn, names=op.names).detach()
        assert _rel(op @ V, V.double() @ H) <= tol(dtype)
        if between == "algorithm_calls":
            eps = 1e-6 if dtype == F64 else 1e-4
            check_pairs(H, lanczos(op, k=2, tol=eps, seed=0), 2, "LA", rtol=eps)
    elif between == "algorithm_calls":
        ours, theirs = lanczos(op, k=2, seed=0), lanczos(fresh, k=2, seed=0)
        assert torch.allclose(ours.eigenvalues, theirs.eigenvalues, rtol=1e-8, atol=0)


def test_a_replaced_parameter_of_another_shape_is_refused():
    model, data = _problem()
    op = HessianOperator(model, data, CountingLoss())
    model[2].weight = nn.Parameter(torch.zeros(3, 9, dtype=F64))
    with pytest.raises(ValueError, match=r"parameter '2.weight' was \(3, 8\).*build a new"):
        op @ torch.ones(op.size, dtype=F64)


# -- inside a block: the guards that remain, the budget, the row cost -----------------------
def test_new_or_changed_batch_tensors_are_not_served_old_graphs():
    """Inside a block a graph serves only the batch tensors it was built from (memory,
    shape, autograd version), e.g. for a loader that yields new tensors on every pass."""
    model, data = _problem()
    loss = CountingLoss()
    op = HessianOperator(model, data, loss)
    V = torch.randn(2, op.size, generator=_gen(5), dtype=F64)
    with op.keep_graphs():
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
    with op.keep_graphs():
        assert _rel(op @ V, V @ H) <= tol(F64) and loss.calls == 5
        assert _rel(op @ V, V @ H) <= tol(F64) and loss.calls == 5
        data[1][0].add_(0.5)  # the base tensor changes: its slices share its version
        assert _rel(op @ V, V @ _dense(model, data)) <= tol(F64)
        assert loss.calls == 7  # the two chunks of the changed batch were rebuilt


def test_budget_zero_or_too_small_keeps_nothing_and_stays_exact():
    model, data = _problem()
    H = _dense(model, data)
    V = torch.randn(3, H.shape[0], generator=_gen(6), dtype=F64)
    for budget in (0, 1000):  # 1000 bytes: less than one batch's graph
        loss = CountingLoss()
        op = HessianOperator(model, data, loss)
        op.graph_cache_bytes = budget
        with op.keep_graphs():
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
    with looped.keep_graphs():
        assert _rel(looped @ V, V @ H) <= tol(F64)
        assert looped.block_row_cost is None  # this product built the graphs
        assert _rel(looped @ V, V @ H) <= tol(F64)
        assert looped.block_row_cost == 1.0  # every batch from its kept graph
    assert _rel(looped @ V, V @ H) <= tol(F64)
    assert looped.block_row_cost is None  # outside a block: built again

    vmapped = HessianOperator(model, data, CountingLoss())
    vmapped.block_mechanism, vmapped.block_bytes = "vmap", 2**40  # rows vmapped together
    unkept = HessianOperator(model, data, CountingLoss())
    unkept.block_mechanism, unkept.graph_cache_bytes = "loop", 0
    for op in (vmapped, unkept):
        with op.keep_graphs():
            for _ in range(2):
                assert _rel(op @ V, V @ H) <= tol(F64)
            assert op.block_row_cost is None


def test_rows_per_pass_follow_the_memory_budget_and_stay_exact(monkeypatch):
    """``block_bytes``: a chunk holds ``block_bytes // (2 s + 16 v)`` rows (``s`` the bytes
    the batch's graph saves, ``v`` a parameter vector), at least 1, at most ``max_block``;
    every chunking gives the dense Hessian."""
    from hessian_spectra.operators import _chunks
    from hessian_spectra.operators._chunks import HESSIAN_ROW_FACTOR, ROW_VECTORS

    model, data = _problem()
    data = data[:1]
    H = _dense(model, data)
    op = HessianOperator(model, data, CountingLoss())
    V = torch.randn(7, op.size, generator=_gen(4), dtype=F64)
    with op.keep_graphs():
        assert _rel(op @ V, V @ H) <= tol(F64)
        (saved,) = [entry[2] for entry in op._graph_cache.graphs.values()]
    assert saved > 0
    per_row = HESSIAN_ROW_FACTOR * saved + ROW_VECTORS * op.size * 8
    for budget, rows in ((1, 1), (int(3 * per_row) + 1, 3), (10**15, op.max_block)):
        op.block_bytes = budget
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert op.block_rows == rows
    op.block_bytes = None  # two training steps, 2 (s + 4 v): below one row's budget
    monkeypatch.setattr(_chunks, "SMALL_STEP_BYTES", 0)  # the rule for models of real size
    assert 2 * (saved + 4 * op.size * 8) < per_row
    assert _rel(op @ V, V @ H) <= tol(F64) and op.block_rows == 1
    for bad in (0, -5, 1.5, True):
        op.block_bytes = bad
        with pytest.raises(ValueError, match="block_bytes must be a positive number of bytes"):
            op @ V


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor alive (after a collection)."""
    import gc

    gc.collect()
    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and not o.is_meta:
                st = o.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
    return total


def test_no_memory_is_retained_between_products_or_algorithm_calls():
    """Graphs (and their activations) are freed after each product outside a block and after
    each algorithm call: what stays alive does not grow."""
    from hessian_spectra.losses import supervised_forward, supervised_loss_of_output
    from hessian_spectra.operators.ggn import GGNOperator

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    model = model.double()
    x, y = torch.randn(256, 20, dtype=F64), torch.randint(0, 5, (256,))
    ops = [
        HessianOperator(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1])),
        GGNOperator(
            model, [(x, y)], supervised_forward, supervised_loss_of_output(F.cross_entropy)
        ),
    ]
    for op in ops:
        v = torch.randn(op.size, dtype=F64)
        op @ v
        lanczos(op, k=2, which="LA", seed=0)
        base = _live_tensor_bytes()
        for _ in range(3):
            op @ v
        lanczos(op, k=2, which="LA", seed=1)
        # one graph of this model saves about 256 * 64 * 8 * 4 bytes = 0.5 MiB
        assert _live_tensor_bytes() - base < 64 * 1024, type(op).__name__
