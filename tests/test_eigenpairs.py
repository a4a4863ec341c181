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
from hessian_spectra.algorithms.eigenpairs import PROBE_BLOCK, blocks_cannot_pay, choose
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


def _slow(A: torch.Tensor, per_call: float, per_row: float) -> LambdaOperator:
    """A product that costs ``per_call + per_row * rows`` seconds (a stand-in for a
    Hessian whose blocks share, or do not share, a data pass)."""

    def mm(V: torch.Tensor) -> torch.Tensor:
        time.sleep(per_call + per_row * V.shape[0])
        return V @ A

    return LambdaOperator(matmat=mm, size=A.shape[0], dtype=A.dtype)


def test_choose_from_measured_costs():
    # a block of 8 costs as much as 8 single products: stay with single vectors
    flat = choose(1.0, 8.0, 8, k=10, n=1000)
    assert flat["chosen"] == "lanczos" and flat["block_size"] is None
    assert flat["cost_ratio"] == pytest.approx(1.0)
    # a block costs about one product: the widest block measured
    shared = choose(1.0, 1.0, 8, k=10, n=1000)
    assert shared["chosen"] == "block" and shared["block_size"] == 8
    # half the cost per vector (a = c): blocks of 2 or 4
    half = choose(2.0, 9.0, 8, k=10, n=1000)
    assert half["chosen"] == "block" and half["block_size"] in (2, 4)
    assert choose(1.0, 1.0, 8, k=1, n=1)["chosen"] == "lanczos"  # no block fits


def test_auto_picks_blocks_when_they_share_the_cost():
    A = _matrix()
    op = _slow(A, per_call=4e-3, per_row=0.0)
    res = eigenpairs(op, k=3, which="LA", seed=0)
    assert res.info["chosen"] == "block" and res.method == "block_lanczos"
    assert res.info["cost_ratio"] < 0.5
    assert res.converged
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    assert torch.allclose(res.eigenvalues, _top(A, 3), rtol=0, atol=RTOL * scale)
    # the probe's products are counted, and its block starts the Krylov space
    assert res.num_matvecs == op.num_matvecs
    assert res.info["probe_matvecs"] == min(PROBE_BLOCK, 2 * 3) + 2
    assert res.info["blocks"] < res.num_matvecs / 2


def test_a_block_that_measures_its_mechanism_is_timed_again():
    """An operator whose first block also chooses its product mechanism (slow once, as the
    Hessian operator's is) is judged by what its blocks cost afterwards."""
    A = _matrix()

    def mm(V: torch.Tensor) -> torch.Tensor:
        if V.shape[0] > 1 and op.block_mechanism == "auto":
            time.sleep(0.2)  # the measurement: far slower than any later block
            op.block_mechanism = "vmap"
        time.sleep(4e-3)
        return V @ A

    class Tuning(LambdaOperator):
        block_mechanism = "auto"

        @property
        def product_mechanisms(self) -> tuple[str, ...]:
            return (self.block_mechanism,)

    op = Tuning(matmat=mm, size=A.shape[0], dtype=A.dtype)
    res = eigenpairs(op, k=3, which="LA", seed=0)
    probe = min(PROBE_BLOCK, 2 * 3)
    assert res.info["probe_matvecs"] == 2 * probe + 2  # the block ran twice
    assert res.info["t_block_s"] < 0.1 and res.info["chosen"] == "block"
    assert res.converged and res.num_matvecs == op.num_matvecs
    again = eigenpairs(op, k=3, seed=1)  # chosen already: one timed block
    assert again.info["probe_matvecs"] == probe + 2


def test_auto_stays_single_when_blocks_cost_per_vector():
    A = _matrix()
    op = _slow(A, per_call=0.0, per_row=2e-3)
    res = eigenpairs(op, k=3, which="LA", seed=0)
    assert res.info["chosen"] == "lanczos" and res.method == "lanczos"
    assert res.info["cost_ratio"] > 0.7
    assert res.converged and res.num_matvecs == op.num_matvecs
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    assert torch.allclose(res.eigenvalues, _top(A, 3), rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_auto_on_a_dense_operator_matches_the_reference(which):
    A = _matrix(seed=3)
    res = eigenpairs(DenseOperator(A), k=4, which=which, seed=0)
    assert res.info["chosen"] in ("lanczos", "block") and res.converged
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


def test_budget_includes_the_probe():
    A = _matrix(seed=5)
    op = DenseOperator(A)
    res = eigenpairs(op, k=2, max_matvecs=200, seed=0)
    assert res.num_matvecs <= 200 and res.num_matvecs == op.num_matvecs


def test_bad_inputs():
    A = _matrix(n=30)
    with pytest.raises(ValueError, match="method must be 'auto', 'lanczos' or 'block'"):
        eigenpairs(A, method="arpack")
    with pytest.raises(
        ValueError, match="max_matvecs=13 is too small for method='auto', which spends 6 products"
    ):
        eigenpairs(A, k=2, max_matvecs=13)
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
    # auto times the warm start's products, then runs the solver it chose (its choice and
    # block size depend on timings): compare with that solver's cold run
    hot = eigenpairs(A, k=k, init=top, seed=0)
    b = hot.info["block_size"]
    cold = lanczos(A, k=k, seed=0) if b is None else block_lanczos(A, k=k, block_size=b, seed=0)
    assert hot.converged and cold.converged
    assert hot.num_matvecs - hot.info["probe_matvecs"] <= 0.5 * cold.num_matvecs
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
    # k=10: gamma = 0.92, 1.31, 1.98 for b = 2, 4, 8; a block needs gamma * cost < 0.8
    assert blocks_cannot_pay(1.0, 8, 10, 1000)
    assert blocks_cannot_pay(0.9, 8, 10, 1000)  # 0.92 * 0.9 = 0.83
    assert not blocks_cannot_pay(0.8, 8, 10, 1000)  # b = 2: 0.74
    assert not blocks_cannot_pay(None, 8, 10, 1000)  # unknown: time the block
    assert blocks_cannot_pay(0.1, 1, 10, 1)  # no block size fits


def test_rows_that_share_no_work_choose_lanczos_after_one_block():
    """A Hessian whose rows loop over kept graphs reports a row cost of 1: ``eigenpairs``
    then runs lanczos without timing the block again, and the answer is the dense
    Hessian's. Vmapped rows report no cost: the probe runs in full."""
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
    probe = min(PROBE_BLOCK, 2 * 3)
    for mech, cost in (("loop", 1.0), ("vmap", None)):
        op = HessianOperator(model, data, loss)
        op.block_mechanism = mech
        res = eigenpairs(op, k=3, which="LA", seed=0)
        assert res.info["block_row_cost"] == cost
        if cost is not None:  # one single product, one block; then lanczos
            assert res.info["chosen"] == "lanczos" and res.method == "lanczos"
            assert res.info["probe_matvecs"] == 1 + probe
        else:
            assert res.info["probe_matvecs"] == probe + 2
        assert res.num_matvecs == op.num_matvecs
        check_pairs(H, res, 3, "LA")
