"""HessianOperator against independent references.

Dense float64 Hessians come from ``torch.func.hessian`` over ``functional_call``
(tests/reference.py), analytic Hessians from closed forms; weighting is checked
against one batch holding the union of the data.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hessian_spectra.operators import HessianOperator, VmapFallbackWarning
from hessian_spectra.params import match_names
from reference import dense_loss_hessian, tol

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _ce(m: nn.Module, b) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _mse(m: nn.Module, b) -> torch.Tensor:
    return ((m(b[0]) - b[1]) ** 2).mean()


# -- models ------------------------------------------------------------------------------
def mlp_problem(dtype=F64):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    g = _gen(1)
    data = [
        (torch.randn(12, 5, generator=g, dtype=dtype), torch.randint(0, 3, (12,), generator=g)),
        (torch.randn(5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (5,), generator=g)),
    ]
    return model, data, _ce


def cnn_bn_problem():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
    ).double()
    model.train()
    g = _gen(2)
    data = [
        (torch.randn(8, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)),
        (torch.randn(6, 2, 5, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)),
    ]
    return model, data, _ce


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, 2, 8, dropout=dropout, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(dim=1))


def transformer_problem():
    model = TinyTransformer().double().eval()
    g = _gen(3)
    data = [
        (torch.randn(4, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (4,), generator=g)),
        (torch.randn(3, 3, 4, generator=g, dtype=F64), torch.randint(0, 2, (3,), generator=g)),
    ]
    return model, data, _ce


def _reference(model, data, loss_fn, names):
    ref_model = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(ref_model)  # train-mode BN: batch statistics only
    with sdpa_kernel([SDPBackend.MATH]):
        return dense_loss_hessian(ref_model, data, loss_fn, names)


# -- dense references --------------------------------------------------------------------
@pytest.mark.parametrize("make", [mlp_problem, cnn_bn_problem, transformer_problem])
def test_dense_and_products_match_the_float64_reference(make):
    model, data, loss_fn = make()
    op = HessianOperator(model, data, loss_fn)
    H_ref = _reference(model, data, loss_fn, op.names)
    assert op.size == H_ref.shape[0] and op.dtype == F64
    H = op.to_dense()
    assert _rel(H, H_ref) <= tol(F64)
    V = torch.randn(5, op.size, generator=_gen(4), dtype=F64)
    assert _rel(op @ V, V @ H_ref) <= tol(F64)
    assert _rel(op @ V[0], H_ref @ V[0]) <= tol(F64)


def test_param_filter_selects_the_matching_block():
    model, data, loss_fn = mlp_problem()
    full = _reference(model, data, loss_fn, None)
    op = HessianOperator(model, data, loss_fn, param_filter=match_names("2.*"))
    assert op.names == ("2.weight", "2.bias") and op.size == 24
    sl = slice(42, 66)  # 0.weight (35) and 0.bias (7) come first
    assert _rel(op.to_dense(), full[sl, sl]) <= tol(F64)
    assert [s.numel() for s in op.layout.shapes] == [21, 3] and op.params[0] is model[2].weight


# -- operator properties -----------------------------------------------------------------
def test_block_equals_a_loop_of_single_products_also_in_chunks():
    model, data, loss_fn = mlp_problem()
    op = HessianOperator(model, data, loss_fn)
    V = torch.randn(8, op.size, generator=_gen(5), dtype=F64)
    block = op.matmat(V)
    singles = torch.stack([op.matvec(v) for v in V])
    assert _rel(block, singles) <= tol(F64)
    op.max_block = 3  # chunks of 3, 3, 2 from one forward per batch
    assert _rel(op.matmat(V), singles) <= tol(F64)
    assert op.num_matvecs == 24


def _count_backwards(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts ``torch.autograd.grad`` calls: vmapped over rows, or one vector each."""
    calls = {"batched": 0, "single": 0}
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls["batched" if kwargs.get("is_grads_batched") else "single"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


def test_default_budget_is_one_row_a_pass_and_blocks_equal_single_products(monkeypatch):
    """By default a chunk's rows may take two training steps' memory, ``2 (s + 4 v)``,
    less than one row's ``2 s + 16 v``: every batch runs its rows one second backward
    at a time (no vmapped backward), sharing one forward and first backward, and a block
    gives the dense Hessian and the single products."""
    from hessian_spectra.operators import _chunks
    from hessian_spectra.operators._chunks import HESSIAN_ROW_FACTOR, ROW_VECTORS
    from hessian_spectra.operators._graph_cache import GraphCache

    monkeypatch.setattr(_chunks, "SMALL_STEP_BYTES", 0)  # the rule for models of real size
    model, data, loss_fn = cnn_bn_problem()
    op = HessianOperator(model, data, loss_fn)
    H = _reference(model, data, loss_fn, op.names)
    V = torch.randn(6, H.shape[0], generator=_gen(7), dtype=F64)
    singles = torch.stack([op @ v for v in V])
    calls = _count_backwards(monkeypatch)
    out = op @ V
    assert _rel(out, V @ H) <= tol(F64) and _rel(out, singles) <= tol(F64)
    # per batch: one first backward, then one second backward per row
    assert calls == {"batched": 0, "single": len(data) * (1 + 6)}
    assert op.block_rows == 1 and op.block_mechanism == "auto"
    # the rule, from the bytes each batch's graph saves (walked here on a fresh graph)
    v_bytes = op.size * 8
    for x, y in data:
        params = [p for p in model.parameters()]
        g = torch.autograd.grad(loss_fn(model, (x, y)), params, create_graph=True)
        s = GraphCache.saved_bytes(g, params)
        assert s > 0
        budget = 2 * (s + 4 * v_bytes)
        assert budget < HESSIAN_ROW_FACTOR * s + ROW_VECTORS * v_bytes  # below one row


def test_a_small_models_rows_share_vmapped_passes_within_64_mib(monkeypatch):
    """A model whose training step is under 16 MiB (its products cost mostly the fixed
    cost of a call) may take up to 64 MiB a pass: the rows that fit share one vmapped
    second backward, and the block is still the dense Hessian."""
    from hessian_spectra.operators._chunks import SMALL_PASS_BYTES, SMALL_STEP_BYTES

    model, data, loss_fn = cnn_bn_problem()
    op = HessianOperator(model, data, loss_fn)
    H = _reference(model, data, loss_fn, op.names)
    V = torch.randn(6, H.shape[0], generator=_gen(9), dtype=F64)
    with op.keep_graphs():
        op @ V[:1]
        saved = [entry[2] for entry in op._graph_cache.graphs.values()]
    v_bytes = op.size * 8
    assert max(saved) + 4 * v_bytes <= SMALL_STEP_BYTES
    per_row = 2 * max(saved) + 16 * v_bytes
    want = min(op.max_block, SMALL_PASS_BYTES // per_row)
    assert want >= 6  # the whole block fits in one pass on this model
    calls = _count_backwards(monkeypatch)
    assert _rel(op @ V, V @ H) <= tol(F64)
    assert op.block_rows == want and calls["batched"] == len(data)


def test_a_raised_block_bytes_vmaps_its_chunks_and_gives_the_hessian(monkeypatch):
    """``block_bytes`` is the override: a budget of three rows runs chunks of three rows
    through one vmapped backward each (``"auto"`` and ``"vmap"``), ``"loop"`` loops them;
    every choice gives the dense Hessian."""
    model, data, loss_fn = cnn_bn_problem()
    H = _reference(model, data, loss_fn, HessianOperator(model, data, loss_fn).names)
    V = torch.randn(6, H.shape[0], generator=_gen(8), dtype=F64)
    probe = HessianOperator(model, data, loss_fn)
    with probe.keep_graphs():
        probe @ V[:2]
        saved = [entry[2] for entry in probe._graph_cache.graphs.values()]
    per_row = max(2 * s + 16 * probe.size * 8 for s in saved)
    calls = _count_backwards(monkeypatch)
    for mech, batched in (("auto", 2 * len(data)), ("vmap", 2 * len(data)), ("loop", 0)):
        op = HessianOperator(model, data, loss_fn)
        op.block_mechanism, op.block_bytes = mech, 3 * per_row
        calls.update(batched=0, single=0)
        assert _rel(op @ V, V @ H) <= tol(F64)
        assert op.block_rows == 3 and op.block_mechanism == mech
        assert calls["batched"] == batched
        assert calls["single"] == len(data) * (1 + (6 if mech == "loop" else 0))
    op.block_mechanism = "fast"
    with pytest.raises(ValueError, match="block_mechanism must be one of"):
        op @ V


def test_the_mechanism_does_not_depend_on_any_clock(monkeypatch):
    """The same operator settings and vectors take the same path and give the same bits
    while every clock returns garbage."""
    import time

    from hessian_spectra.operators import _chunks

    monkeypatch.setattr(_chunks, "SMALL_STEP_BYTES", 0)  # the rule for models of real size
    model, data, loss_fn = mlp_problem()
    V = torch.randn(5, HessianOperator(model, data, loss_fn).size, generator=_gen(9), dtype=F64)

    def run(block_bytes):
        op = HessianOperator(model, data, loss_fn)
        op.block_bytes = block_bytes
        return op @ V, op.block_mechanism, op.block_rows

    calm = [run(b) for b in (None, 10**12)]
    g = _gen(10)
    for name in ("perf_counter", "monotonic", "time", "process_time", "thread_time"):
        monkeypatch.setattr(time, name, lambda: float(torch.rand((), generator=g)) * 1e6)
    calls = _count_backwards(monkeypatch)
    for (out, mech, rows), budget in zip(calm, (None, 10**12), strict=True):
        calls.update(batched=0)
        again, mech2, rows2 = run(budget)
        assert torch.equal(again, out) and (mech2, rows2) == (mech, rows)
        assert calls["batched"] == (0 if budget is None else len(data))
    assert [c[2] for c in calm] == [1, HessianOperator.max_block]  # default: a row a pass


def test_linear_symmetric_and_deterministic():
    model, data, loss_fn = mlp_problem()
    op = HessianOperator(model, data, loss_fn)
    g = _gen(6)
    u, v = torch.randn(2, op.size, generator=g, dtype=F64)
    a, b = 0.7, -2.5
    Hu, Hv = op @ u, op @ v
    assert _rel(op @ (a * u + b * v), a * Hu + b * Hv) <= tol(F64)
    assert abs(float(u @ Hv - v @ Hu)) <= tol(F64) * float(Hu.norm() * v.norm())
    assert torch.equal(op @ v, Hv)  # the same vector gives the same bits


def test_bad_vectors_are_refused_with_the_expected_shape_dtype_device():
    model, data, loss_fn = mlp_problem()
    op = HessianOperator(model, data, loss_fn)
    with pytest.raises(ValueError, match=r"expected dtype torch.float64, got torch.float32"):
        op.matvec(torch.ones(op.size))
    with pytest.raises(ValueError, match=r"expected a tensor on cpu, got one on meta"):
        op.matvec(torch.ones(op.size, dtype=F64, device="meta"))
    with pytest.raises(ValueError, match=r"expected a block of shape \(k, 66\), got \(66, 3\)"):
        op.matmat(torch.ones(op.size, 3, dtype=F64))


# -- weighting ---------------------------------------------------------------------------
def _regression_split(sizes, seed=7):
    g = _gen(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(sum(sizes), 3, generator=g, dtype=F64)
    y = torch.randn(sum(sizes), 1, generator=g, dtype=F64) + 3 * X[:, :1]
    parts = list(zip(torch.split(X, sizes), torch.split(y, sizes), strict=True))
    return model, parts, (X, y)


def test_unequal_batches_give_the_hessian_of_the_union():
    model, parts, whole = _regression_split([250, 6])
    H_union = HessianOperator(model, [whole], _mse).to_dense()
    H = HessianOperator(model, parts, _mse).to_dense()
    assert _rel(H, H_union) <= tol(F64)
    # equal weights per batch (the known bug elsewhere) would be far off here
    per_batch = [HessianOperator(model, [p], _mse).to_dense() for p in parts]
    assert _rel((per_batch[0] + per_batch[1]) / 2, H_union) > 0.05


def test_microbatches_change_nothing_beyond_rounding():
    model, parts, _ = _regression_split([250, 6])
    H = HessianOperator(model, parts, _mse).to_dense()
    for mb in (1, 7, 64):
        assert _rel(HessianOperator(model, parts, _mse, microbatch_size=mb).to_dense(), H) <= tol(
            F64
        )


def test_batch_size_fn_weighs_dict_batches_by_their_valid_tokens():
    g = _gen(8)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()

    def batch(n, valid):
        mask = (torch.arange(5).expand(n, 5) < torch.tensor(valid).unsqueeze(1)).double()
        return {
            "x": torch.randn(n, 5, 2, generator=g, dtype=F64),
            "y": torch.randn(n, 5, generator=g, dtype=F64),
            "mask": mask,
        }

    def token_mse(m, b):  # mean over the valid tokens of the batch
        err = (m(b["x"]).squeeze(-1) - b["y"]) ** 2
        return (err * b["mask"]).sum() / b["mask"].sum()

    tokens = lambda b: int(b["mask"].sum())  # noqa: E731
    batches = [batch(3, [5, 1, 2]), batch(2, [5, 5])]
    union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    H_union = HessianOperator(model, [union], token_mse).to_dense()
    H = HessianOperator(model, batches, token_mse, batch_size_fn=tokens).to_dense()
    assert _rel(H, H_union) <= tol(F64)
    H_mb = HessianOperator(
        model, batches, token_mse, batch_size_fn=tokens, microbatch_size=2
    ).to_dense()
    assert _rel(H_mb, H_union) <= tol(F64)
    assert (
        _rel(HessianOperator(model, batches, token_mse).to_dense(), H_union) > 0.01
    )  # rows, not tokens


# -- finite differences ------------------------------------------------------------------
def _fd_tol(dtype: torch.dtype) -> float:
    """Central differences with ε ≈ eps^(1/3) err by O(eps^(2/3)) relative."""
    return 20 * torch.finfo(dtype).eps ** (2 / 3)  # measured: below 2 eps^(2/3) on this MLP


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_difference_agrees_with_autograd(dtype):
    model, data, loss_fn = mlp_problem(dtype)
    exact = HessianOperator(model, data, loss_fn)
    fd = HessianOperator(model, data, loss_fn, method="finite_difference")
    assert fd.fd_eps == {torch.float64: 6e-6, torch.float32: 5e-3}[dtype]
    V = torch.randn(3, exact.size, generator=_gen(9), dtype=dtype)
    V[1] *= 1e3  # the step is scaled by ||v||: a long vector is no less accurate
    V[2] = 0.0
    got, want = fd @ V, exact @ V
    for r in range(2):
        assert float((got[r] - want[r]).norm() / want[r].norm()) <= _fd_tol(dtype)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_finite_difference_restores_parameters_bit_exactly_when_the_loss_raises():
    model, data, _ = mlp_problem()
    before = [p.detach().clone() for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        if calls["n"] == 3:  # after the +εv pass of batch 0 and the -εv pass
            raise RuntimeError("loss failed mid-product")
        return _ce(m, b)

    op = HessianOperator(model, data, flaky, method="finite_difference")
    with pytest.raises(RuntimeError, match="loss failed mid-product"):
        op.matmat(torch.randn(2, op.size, generator=_gen(10), dtype=F64))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.reshape(-1).view(torch.int64), b.reshape(-1).view(torch.int64))
    assert [p._version for p in model.parameters()] == versions
    assert calls["n"] == 3


# -- vmap fallback -----------------------------------------------------------------------
class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)


class _CubeGrad(torch.autograd.Function):
    """``3 x² g``, whose own backward has data-dependent Python (no vmap rule)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        if gg.abs().sum().item() == 0.0:
            return None, None
        return 6 * x * g * gg, 3 * x**2 * gg


class _CubeNet(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.a, self.b, self.custom = nn.Linear(3, 4), nn.Linear(4, 2), custom

    def forward(self, x):
        h = self.a(x)
        return self.b(_Cube.apply(h) if self.custom else h**3)


def test_ops_without_a_vmap_rule_fall_back_to_a_loop_once():
    net = _CubeNet(custom=True).double()
    ref_net = _CubeNet(custom=False).double()
    ref_net.load_state_dict(net.state_dict())
    g = _gen(11)
    data = [(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64))]
    H_ref = dense_loss_hessian(ref_net, data, _mse)
    op = HessianOperator(net, data, _mse)
    op.block_bytes = 2**40  # rows vmapped together (the default budget is one row)
    V = torch.randn(4, op.size, generator=g, dtype=F64)
    with pytest.warns(VmapFallbackWarning, match="loops over the vectors"):
        out = op @ V
    assert _rel(out, V @ H_ref) <= tol(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        assert _rel(op @ V, V @ H_ref) <= tol(F64)


# -- analytic Hessians -------------------------------------------------------------------
def test_linear_regression_hessian_is_two_over_n_xtx_with_a_prescribed_spectrum():
    N, d = 256, 5
    eigs = torch.tensor([10.0, 3.0, 1.0, 0.1, 0.01], dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(N, d, generator=_gen(12), dtype=F64))
    R, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(13), dtype=F64))
    X = math.sqrt(N / 2) * (Q * eigs.sqrt()) @ R.T  # 2/N X^T X = R diag(eigs) R^T
    y = torch.randn(N, generator=_gen(14), dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    loss = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()  # noqa: E731
    op = HessianOperator(model, [(X[:250], y[:250]), (X[250:], y[250:])], loss)
    H = op.to_dense()
    assert _rel(H, 2 / N * X.T @ X) <= tol(F64)
    assert _rel(torch.linalg.eigvalsh(H), eigs.flip(0)) <= tol(F64)


def test_two_layer_linear_network_at_the_origin_has_eigenvalues_plus_minus_sigma():
    # L = 1/(2N) Σ ||W2 W1 x - y||²; at W = 0 only the bilinear term -tr(W2 W1 C),
    # C = (1/N) Σ x yᵀ, has curvature: per hidden unit j the block [[0, -C], [-Cᵀ, 0]]
    # in (row j of W1, column j of W2), so the eigenvalues are ±σ_i(C), h times each,
    # and h(d + o - 2 min(d, o)) zeros.
    d, h, o, N = 4, 3, 2, 40
    g = _gen(15)
    X = torch.randn(N, d, generator=g, dtype=F64)
    Y = X @ torch.randn(d, o, generator=g, dtype=F64) + 0.1 * torch.randn(
        N, o, generator=g, dtype=F64
    )
    model = nn.Sequential(nn.Linear(d, h, bias=False), nn.Linear(h, o, bias=False)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    loss = lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).sum(dim=1).mean()  # noqa: E731
    op = HessianOperator(model, [(X[:25], Y[:25]), (X[25:], Y[25:])], loss)
    sigma = torch.linalg.svdvals(X.T @ Y / N)
    expected = torch.cat(
        [sigma.repeat(h), -sigma.repeat(h), torch.zeros(h * (d + o - 2 * o), dtype=F64)]
    )
    got = torch.linalg.eigvalsh(op.to_dense())
    assert got.min() < 0  # negative curvature is there
    assert _rel(got, expected.sort().values) <= tol(F64)


# -- construction and loss errors --------------------------------------------------------
def test_constructor_validation_messages():
    model, data, loss_fn = mlp_problem()
    with pytest.raises(ValueError, match=r"no trainable parameter selected .*0\.weight, 0\.bias"):
        HessianOperator(model, data, loss_fn, param_filter=match_names("nothing.*"))
    with pytest.raises(
        ValueError, match=r"method must be one of \('autograd', 'finite_difference'\), got 'fd'"
    ):
        HessianOperator(model, data, loss_fn, method="fd")
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fd_eps must be a positive finite step length"):
            HessianOperator(model, data, loss_fn, method="finite_difference", fd_eps=bad)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        HessianOperator("model", data, loss_fn)
    with pytest.raises(TypeError, match=r"loss_fn must be a callable loss_fn\(model, batch\)"):
        HessianOperator(model, data, "ce")
    with pytest.raises(TypeError, match="seed must be an int or None"):
        HessianOperator(model, data, loss_fn, seed=1.5)
    with pytest.raises(ValueError, match="batches hold 0 samples"):
        HessianOperator(model, [(torch.ones(0, 5, dtype=F64), torch.ones(0))], loss_fn)


def test_parameters_on_several_devices_or_of_mixed_dtype_are_refused():
    data = [(torch.randn(4, 2), torch.randn(4, 1))]
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).double())
    with pytest.raises(
        ValueError, match=r"mixed dtypes \(torch.float32, torch.float64\); expected one dtype"
    ):
        HessianOperator(mixed, data, _mse)
    split = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, device="meta"))
    with pytest.raises(ValueError, match=r"several devices \(cpu, meta\); expected one device"):
        HessianOperator(split, data, _mse)
    op = HessianOperator(
        split, data, _mse, param_filter=match_names("0.*")
    )  # the fix the message names
    assert op.device == torch.device("cpu") and op.size == 6


def test_loss_errors_are_raised_at_the_first_product():
    model, data, _ = mlp_problem()
    op = HessianOperator(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(
        ValueError,
        match=r"must return a scalar .* got a tensor of shape \(12,\) for batch \(0, 0\)",
    ):
        op.matvec(torch.ones(op.size, dtype=F64))
    op = HessianOperator(model, data, lambda m, b: _ce(m, b).item())
    with pytest.raises(TypeError, match=r"must return a scalar torch\.Tensor .* got float"):
        op.matvec(torch.ones(op.size, dtype=F64))
    op = HessianOperator(model, data, lambda m, b: _ce(m, b).detach())
    with pytest.raises(ValueError, match="has no autograd graph"):
        op.matvec(torch.ones(op.size, dtype=F64))
    fd = HessianOperator(model, data, _ce, method="finite_difference")
    with pytest.raises(ValueError, match="finite differences need finite vectors"):
        fd.matvec(torch.full((fd.size,), float("nan"), dtype=F64))


def test_seed_none_draws_a_seed_and_the_operator_stays_fixed():
    model, data, loss_fn = mlp_problem()
    a, b = (
        HessianOperator(model, data, loss_fn, seed=None),
        HessianOperator(model, data, loss_fn, seed=None),
    )
    assert a.seed != b.seed
    v = torch.randn(a.size, generator=_gen(16), dtype=F64)
    assert torch.equal(a @ v, a @ v)
    assert "HessianOperator(size=66" in repr(a) and "samples=17" in repr(a)
