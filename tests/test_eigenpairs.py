"""eigenpairs (auto choice between lanczos and block_lanczos) and warm starts of every solver."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from hessian_spectra.algorithms import (
    ConvergenceWarning,
    block_lanczos,
    deflated_power_iteration,
    eigenpairs,
    lanczos,
    power_iteration,
)
from hessian_spectra.algorithms.eigenpairs import blocks_cannot_pay, choose
from hessian_spectra.operators.base import DenseOperator, LambdaOperator
from reference import sym_matrix_with_spectrum

RTOL = 1e-6


def _matrix(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat(
        [
            torch.tensor([30.0, 20.0, 20.0, 12.0, -25.0], dtype=torch.float64),
            torch.randn(n - 5, generator=g, dtype=torch.float64),
        ]
    )
    return sym_matrix_with_spectrum(eigs, seed=seed + 1)


def _top(A: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(A).flip(0)[:k]


class _Stated(LambdaOperator):
    """A product whose blocks state their cost: each row adds ``block_row_cost`` of a
    product on its own (a stand-in for an operator whose blocks share a data pass)."""

    def __init__(self, A: torch.Tensor, row_cost: float | None) -> None:
        super().__init__(matmat=lambda V: V @ A, size=A.shape[0], dtype=A.dtype)
        self._row_cost = row_cost

    @property
    def block_row_cost(self) -> float | None:
        return self._row_cost


def _garbage_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every clock the library could read returns random values."""
    g = torch.Generator().manual_seed(123)

    def noise() -> float:
        return float(torch.rand((), generator=g)) * 1e6

    for name in ("perf_counter", "monotonic", "time", "process_time", "thread_time"):
        monkeypatch.setattr(time, name, noise)


def test_choose_from_the_stated_row_cost():
    # k=10: gamma = 0.92, 1.31, 1.98 for b = 2, 4, 8; estimate gamma (1 + r (b - 1)) / b
    unknown = choose(None, k=10, n=1000)
    assert unknown["chosen"] == "lanczos" and unknown["block_size"] is None
    assert unknown["estimated_time_ratio"] == {}
    flat = choose(1.0, k=10, n=1000)  # rows share nothing: a block costs b products
    assert flat["chosen"] == "lanczos" and flat["block_size"] is None
    assert flat["estimated_time_ratio"] == pytest.approx({"2": 0.92, "4": 1.31, "8": 1.98})
    shared = choose(0.0, k=10, n=1000)  # a block costs one product: the widest block
    assert shared["chosen"] == "block" and shared["block_size"] == 8
    assert shared["estimated_time_ratio"]["8"] == pytest.approx(1.98 / 8)
    half = choose(0.5, k=10, n=1000)  # 0.92 * 1.5 / 2 = 0.69; 1.31 * 2.5 / 4 = 0.82
    assert half["chosen"] == "block" and half["block_size"] == 2
    assert choose(0.0, k=1, n=1)["chosen"] == "lanczos"  # no block fits
    assert choose(0.0, k=3, n=5)["block_size"] == 4  # at most n


def test_auto_picks_blocks_when_the_operator_states_they_share_the_cost():
    A = _matrix()
    op = _Stated(A, row_cost=0.0)
    res = eigenpairs(op, k=3, which="LA", seed=0)
    assert res.info["chosen"] == "block" and res.method == "block_lanczos"
    assert res.info["block_size"] == 8 and res.info["block_row_cost"] == 0.0
    assert res.converged and res.num_matvecs == op.num_matvecs
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    assert torch.allclose(res.eigenvalues, _top(A, 3), rtol=0, atol=RTOL * scale)
    # exactly the solver it names, with the same arguments
    same = block_lanczos(_Stated(A, 0.0), k=3, which="LA", block_size=8, seed=0)
    assert torch.equal(res.eigenvalues, same.eigenvalues)
    assert res.num_matvecs == same.num_matvecs


@pytest.mark.parametrize("row_cost", [None, 1.0, 0.9])
def test_auto_stays_single_when_blocks_are_not_known_to_be_cheaper(row_cost):
    A = _matrix()
    op = _Stated(A, row_cost=row_cost)
    res = eigenpairs(op, k=3, which="LA", seed=0)
    assert res.info["chosen"] == "lanczos" and res.method == "lanczos"
    assert res.converged and res.num_matvecs == op.num_matvecs
    same = lanczos(_Stated(A, row_cost), k=3, which="LA", seed=0)
    assert torch.equal(res.eigenvalues, same.eigenvalues)
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    assert torch.allclose(res.eigenvalues, _top(A, 3), rtol=0, atol=RTOL * scale)


def test_a_bad_stated_row_cost_is_refused():
    A = _matrix(n=30)
    with pytest.raises(ValueError, match="block_row_cost must be a finite number >= 0"):
        eigenpairs(_Stated(A, float("nan")), k=2)
    with pytest.raises(TypeError, match="block_row_cost must be a number or None, got str"):
        eigenpairs(_Stated(A, "cheap"), k=2)  # type: ignore[arg-type]


def test_the_choice_does_not_depend_on_any_clock(monkeypatch):
    """The same operator and arguments give the same solver, block size and bits while
    every clock returns garbage."""
    A = _matrix(seed=2)
    calm = [eigenpairs(_Stated(A, r), k=3, seed=0) for r in (0.0, 0.5, None)]
    _garbage_clock(monkeypatch)
    for r, before in zip((0.0, 0.5, None), calm, strict=True):
        for _ in range(2):
            again = eigenpairs(_Stated(A, r), k=3, seed=0)
            assert again.info["chosen"] == before.info["chosen"]
            assert again.info["block_size"] == before.info["block_size"]
            assert again.num_matvecs == before.num_matvecs
            assert torch.equal(again.eigenvalues, before.eigenvalues)
    assert [c.info["block_size"] for c in calm] == [8, 2, None]


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_auto_on_a_dense_operator_matches_the_reference(which):
    A = _matrix(seed=3)
    res = eigenpairs(DenseOperator(A), k=4, which=which, seed=0)
    assert res.info["chosen"] == "lanczos" and res.converged  # no stated block cost
    ev = torch.linalg.eigvalsh(A)
    ref = {"LA": ev.flip(0)[:4], "SA": ev[:4], "LM": ev[ev.abs().argsort(descending=True)][:4]}
    scale = float(ev.abs().max())
    got = res.eigenvalues.sort().values
    assert torch.allclose(got, ref[which].sort().values, rtol=0, atol=RTOL * scale)


def test_explicit_methods_are_the_solvers_themselves():
    A = _matrix(seed=4)
    a, b = eigenpairs(A, k=3, method="lanczos", seed=7), lanczos(A, k=3, seed=7)
    assert a.method == "lanczos" and torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.num_matvecs == b.num_matvecs and "chosen" not in a.info
    c, d = eigenpairs(A, k=3, method="block", seed=7), block_lanczos(A, k=3, seed=7)
    assert c.method == "block_lanczos" and torch.equal(c.eigenvalues, d.eigenvalues)


def test_the_budget_goes_to_the_solver_chosen():
    A = _matrix(seed=5)
    op = DenseOperator(A)
    res = eigenpairs(op, k=2, max_matvecs=200, seed=0)
    assert res.num_matvecs <= 200 and res.num_matvecs == op.num_matvecs
    short = eigenpairs(A, k=2, max_matvecs=13, seed=0)  # no products spent on a probe
    same = lanczos(A, k=2, max_matvecs=13, seed=0)
    assert short.num_matvecs == same.num_matvecs <= 13
    assert torch.equal(short.eigenvalues, same.eigenvalues)


def test_bad_inputs():
    A = _matrix(n=30)
    with pytest.raises(ValueError, match="method must be 'auto', 'lanczos' or 'block'"):
        eigenpairs(A, method="arpack")
    with pytest.raises(ValueError, match="k=31 exceeds operator size n=30"):
        eigenpairs(A, k=31)
    with pytest.raises(ValueError, match="which must be 'LA'"):
        eigenpairs(A, which="la-ish")
    with pytest.raises(TypeError, match="init must be a tensor"):
        eigenpairs(A, init=[1.0] * 30)  # type: ignore[arg-type]


# -- warm starts ----------------------------------------------------------------------


def test_every_eigensolver_restarts_from_exact_eigenvectors_almost_for_free():
    n, k = 300, 4
    g = torch.Generator().manual_seed(6)
    eigs = torch.cat(
        [
            torch.tensor([5.0, 4.6, 4.6, 4.3], dtype=torch.float64),
            torch.randn(n - k, generator=g, dtype=torch.float64),
        ]
    )
    A = sym_matrix_with_spectrum(eigs, seed=7)
    ev, V = torch.linalg.eigh(A)
    scale = float(ev.abs().max())
    top = V[:, -k:].flip(1).T.contiguous()  # exact top-k eigenvectors (also the largest |lambda|)
    with warnings.catch_warnings():  # the repeated 4.6 is slow for power iteration
        warnings.simplefilter("ignore", ConvergenceWarning)
        cold = deflated_power_iteration(A, k, seed=0, max_matvecs=4000)
    warm = deflated_power_iteration(A, k, init=top, seed=0)
    assert warm.converged and warm.num_matvecs == k  # one product per pair
    assert warm.num_matvecs < 0.05 * cold.num_matvecs
    single = power_iteration(A, init=top[0], seed=0)
    assert single.converged and single.num_matvecs == 1
    assert single.eigenvalues[0] == pytest.approx(5.0, abs=RTOL * scale)
    # block solvers: k products (the Rayleigh-Ritz step) and done. lanczos also runs its
    # multiplicity check (a fresh deflated run)
    for solve, at_most in (
        (lambda init: block_lanczos(A, k=k, init=init, seed=0), 0.1),
        (lambda init: eigenpairs(A, k=k, init=init, method="block", seed=0), 0.1),
        (lambda init: lanczos(A, k=k, init=init, seed=0), 0.5),
    ):
        cold, hot = solve(None), solve(top)
        assert hot.converged and cold.converged
        assert hot.num_matvecs <= at_most * cold.num_matvecs
        assert torch.allclose(hot.eigenvalues, ev.flip(0)[:k], rtol=0, atol=RTOL * scale)
    # auto passes the warm start to the solver it chose (lanczos: a matrix states no block
    # cost): compare with that solver's cold run
    hot = eigenpairs(A, k=k, init=top, seed=0)
    assert hot.info["chosen"] == "lanczos"
    cold = lanczos(A, k=k, seed=0)
    assert hot.converged and cold.converged
    assert hot.num_matvecs <= 0.5 * cold.num_matvecs
    assert torch.allclose(hot.eigenvalues, ev.flip(0)[:k], rtol=0, atol=RTOL * scale)


def test_warm_start_after_a_small_change_of_the_operator():
    """Curvature tracked during training: the operator moves a little between calls."""
    A = _matrix(n=300, seed=8)
    g = torch.Generator().manual_seed(9)
    E = torch.randn(300, 300, generator=g, dtype=torch.float64)
    B = A + 1e-3 * (E + E.T)
    first = block_lanczos(A, k=5, which="LA", seed=0)
    cold = block_lanczos(B, k=5, which="LA", seed=1)
    hot = block_lanczos(B, k=5, which="LA", init=first.eigenvectors, seed=1)
    assert hot.converged and hot.num_matvecs < cold.num_matvecs
    scale = float(torch.linalg.eigvalsh(B).abs().max())
    assert torch.allclose(hot.eigenvalues, _top(B, 5), rtol=0, atol=RTOL * scale)


def test_blocks_cannot_pay_from_the_row_cost():
    # k=10: a block pays when gamma (1 + r (b - 1)) / b < 0.8 for some b in 2, 4, 8
    assert blocks_cannot_pay(1.0, 10, 1000)
    assert blocks_cannot_pay(0.8, 10, 1000)  # b = 2: 0.92 * 1.8 / 2 = 0.83
    assert not blocks_cannot_pay(0.7, 10, 1000)  # b = 2: 0.92 * 1.7 / 2 = 0.78
    assert blocks_cannot_pay(None, 10, 1000)  # unknown: no block
    assert blocks_cannot_pay(0.0, 10, 1)  # no block size fits


def test_a_hessian_gets_lanczos_and_the_same_answer_whatever_the_clock(monkeypatch):
    """A Hessian operator states no block cost before its products: ``eigenpairs`` runs
    ``lanczos`` (the same bits as calling it), whatever the clocks read and whatever the
    operator's mechanism, and the answer is the dense Hessian's."""
    from torch import nn
    from torch.nn import functional as F

    from hessian_spectra.operators import HessianOperator
    from reference import check_pairs, dense_loss_hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,)))]

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    H = dense_loss_hessian(model, data, loss)
    plain = lanczos(HessianOperator(model, data, loss), k=3, which="LA", seed=0)
    _garbage_clock(monkeypatch)
    for mech in ("auto", "loop", "vmap"):
        op = HessianOperator(model, data, loss)
        op.block_mechanism = mech
        res = eigenpairs(op, k=3, which="LA", seed=0)
        assert res.info["chosen"] == "lanczos" and res.method == "lanczos"
        assert res.info["block_row_cost"] is None
        assert torch.equal(res.eigenvalues, plain.eigenvalues)
        assert res.num_matvecs == op.num_matvecs == plain.num_matvecs
        check_pairs(H, res, 3, "LA")
