"""power_iteration / deflated_power_iteration against dense float64 eigenvalues."""

from __future__ import annotations

import pytest
import torch

from hessian_spectra.algorithms import ConvergenceWarning, deflated_power_iteration, power_iteration
from hessian_spectra.operators.base import LambdaOperator
from reference import sym_matrix_with_spectrum


def _matrix(top, n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - len(top), generator=g, dtype=torch.float64)
    return sym_matrix_with_spectrum(
        torch.cat([torch.tensor(top, dtype=torch.float64), bulk]), seed=seed + 1
    )


def _op(A):
    return LambdaOperator(matmat=lambda V: V @ A, size=A.shape[0], dtype=A.dtype)


def test_top_eigenvalue_matches_eigvalsh():
    A = _matrix([10.0, 7.0, 5.0])
    op = _op(A)
    res = power_iteration(op, seed=0)
    assert res.converged and res.method == "power" and res.which == "LM"
    lam1 = float(torch.linalg.eigvalsh(A)[-1])
    assert abs(float(res.eigenvalues[0]) - lam1) <= 1e-6 * lam1
    v = res.eigenvectors[0]
    true = torch.linalg.vector_norm(A @ v - res.eigenvalues[0] * v)
    assert torch.allclose(res.residuals[0], true, rtol=1e-8) and true <= res.tol * lam1
    assert res.num_matvecs == op.num_matvecs


def test_negative_dominant_eigenvalue():
    A = _matrix([-10.0, 6.0])
    res = power_iteration(A, seed=1)
    assert res.converged and abs(float(res.eigenvalues[0]) + 10.0) <= 1e-5


def test_momentum_is_unbiased_and_faster():
    top = [10.0, 9.5, 9.0]
    A = _matrix(top, seed=2)
    plain = power_iteration(A, seed=0, max_matvecs=5000)
    beta = 9.5**2 / 4  # De Sa et al. 2018: beta = lambda_2^2 / 4
    fast = power_iteration(A, seed=0, max_matvecs=5000, momentum=beta)
    assert plain.converged and fast.converged
    # unbiased: the Rayleigh quotient, not the growth ratio (lambda + sqrt(lambda^2 - 4 beta)) / 2
    assert abs(float(fast.eigenvalues[0]) - 10.0) <= 1e-6 * 10
    assert fast.num_matvecs < 0.6 * plain.num_matvecs
    assert fast.info["momentum"] == beta


def test_deflated_power_iteration_top_k():
    A = _matrix([10.0, 8.0, 6.0, -5.0], seed=3)
    res = deflated_power_iteration(A, 4, seed=0, momentum=1.0)
    assert res.converged
    ev = torch.linalg.eigvalsh(A)
    ref = ev[torch.argsort(ev.abs(), descending=True)][:4]
    assert torch.allclose(res.eigenvalues, ref, atol=1e-5)
    X = res.eigenvectors
    assert torch.allclose(X @ X.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
    true = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-6)


def test_warm_start_and_budget():
    A = _matrix([10.0, 7.0], seed=4)
    v = torch.linalg.eigh(A).eigenvectors[:, -1]
    res = power_iteration(A, init=v, seed=0)
    assert res.converged and res.num_matvecs <= 2
    with pytest.warns(ConvergenceWarning, match="did not reach tol"):
        short = power_iteration(A, max_matvecs=3, seed=0)
    assert not short.converged and short.num_matvecs == 3


def test_float32_and_bf16_operators():
    A = _matrix([10.0, 6.0], seed=5)
    for dtype, rtol in [(torch.float32, 1e-5), (torch.bfloat16, 0.05)]:
        Ad = A.to(dtype)
        op = LambdaOperator(matmat=lambda V, Ad=Ad: V @ Ad, size=A.shape[0], dtype=dtype)
        res = power_iteration(op, seed=0)
        assert res.converged and res.eigenvectors.dtype == dtype
        assert abs(float(res.eigenvalues[0]) - 10.0) <= rtol * 10


def test_seed_reproducible_and_global_rng_untouched():
    A = _matrix([10.0, 7.0], seed=6)
    state = torch.get_rng_state()
    a, b = power_iteration(A, seed=3), power_iteration(A, seed=3)
    power_iteration(A)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.eigenvectors, b.eigenvectors)


def test_bad_inputs():
    A = _matrix([10.0], n=10)
    with pytest.raises(ValueError, match="momentum must be a finite number >= 0"):
        power_iteration(A, momentum=-1.0)
    with pytest.raises(ValueError, match="k=11 exceeds operator size n=10"):
        deflated_power_iteration(A, 11)
    with pytest.raises(ValueError, match="max_matvecs=2 is below k=3"):
        deflated_power_iteration(A, 3, max_matvecs=2)
    with pytest.raises(ValueError, match=r"init must have shape \(10,\) or \(2, 10\)"):
        deflated_power_iteration(A, 2, init=torch.ones(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        power_iteration(LambdaOperator(matvec=lambda v: v, size=4, symmetric=False))
    with pytest.raises(ValueError, match="max_matvecs must be >= 1"):
        power_iteration(A, max_matvecs=0)
