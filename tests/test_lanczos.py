"""lanczos / lanczos_tridiagonal against dense float64 eigendecompositions."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hessian_spectra.algorithms import (
    ConvergenceWarning,
    lanczos,
    lanczos_tridiagonal,
)
from hessian_spectra.operators.base import DenseOperator, LambdaOperator
from reference import (
    check_pairs,
    extreme_eigenvalues,
    matrix_operator,
    sym_matrix_with_spectrum,
    tol,
)


def _spectrum(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "indefinite":
        return torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "psd_outliers":
        bulk = torch.rand(n - 8, generator=g, dtype=torch.float64)
        return torch.cat([torch.tensor([50.0, 40, 30, 20, 15, 12, 11, 10.5]), bulk])
    if kind == "negative_dominant":
        return torch.cat(
            [torch.tensor([-20.0, -15, -9]), torch.randn(n - 3, generator=g, dtype=torch.float64)]
        )
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["indefinite", "psd_outliers", "negative_dominant"])
@pytest.mark.parametrize(("which", "k"), [("LA", 10), ("SA", 5), ("LM", 10)])
def test_default_arguments_match_eigvalsh(kind, which, k):
    A = sym_matrix_with_spectrum(_spectrum(kind, 300), seed=1)
    op = matrix_operator(A)
    res = lanczos(op, k=k, which=which)  # default tol, budget, ncv, random seed
    assert res.converged and bool(res.converged_mask.all())
    check_pairs(A, res, k, which)
    assert res.num_matvecs == op.num_matvecs
    assert res.method == "lanczos" and res.which == which


@pytest.mark.parametrize("keep_products", [True, False])
def test_reported_residuals_are_true_residuals(keep_products):
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 250), seed=2)
    op = DenseOperator(A)
    res = lanczos(op, k=6, seed=0, keep_products=keep_products)
    X = res.eigenvectors
    true = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-12)
    scale = float(res.eigenvalues.abs().max())
    assert bool((true <= res.tol * scale).all())
    assert res.num_matvecs == op.num_matvecs
    # stored products of the basis give A x for free; otherwise k more products
    assert res.info["matvecs"]["residuals"] == (0 if keep_products else 6)


@pytest.mark.parametrize(
    "top",
    [
        [5.0, 5.0, 5.0],  # multiplicity 3 at the top
        [5.0, 4.0, 4.0, 4.0, 4.0, 3.0],  # multiplicity 4 inside the wanted set
        [5.0] * 12,  # more copies than asked for
        [5.0, 5.0, 4.0, 4.0, 4.0] + [3.5 - 1e-4 * i for i in range(8)],  # repeats + a tight cluster
    ],
)
def test_repeated_and_clustered_eigenvalues(top):
    n, k = 300, 10
    g = torch.Generator().manual_seed(3)
    eigs = torch.cat(
        [
            torch.tensor(top, dtype=torch.float64),
            torch.rand(n - len(top), generator=g, dtype=torch.float64) * 3,
        ]
    )
    A = sym_matrix_with_spectrum(eigs, seed=4)
    for seed in range(3):
        res = lanczos(matrix_operator(A), k=k, seed=seed)
        assert res.converged
        check_pairs(A, res, k, "LA")


def test_clustered_top_of_a_500_dimensional_spectrum():
    g = torch.Generator().manual_seed(5)
    cluster = 10 - 0.01 * torch.rand(20, generator=g, dtype=torch.float64)
    A = sym_matrix_with_spectrum(
        torch.cat([cluster, torch.rand(480, generator=g, dtype=torch.float64)]), seed=6
    )
    res = lanczos(matrix_operator(A), k=10, seed=0)
    assert res.converged
    check_pairs(A, res, 10, "LA")


def test_too_small_budget_warns_and_reports_not_converged():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 300), seed=1)
    op = matrix_operator(A)
    with pytest.warns(ConvergenceWarning, match="did not reach tol"):
        res = lanczos(op, k=10, max_matvecs=40, seed=0)
    assert not res.converged
    assert not bool(res.converged_mask.all())
    assert res.num_matvecs <= 40 and op.num_matvecs == res.num_matvecs
    X = res.eigenvectors  # the residuals of unconverged pairs are still the true ones
    true = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-12)


def test_warm_start_with_previous_eigenvectors_is_much_cheaper():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 300), seed=7)
    cold = lanczos(matrix_operator(A), k=10, which="LA", seed=0)
    warm = lanczos(matrix_operator(A), k=10, which="LA", seed=1, init=cold.eigenvectors)
    assert warm.converged
    check_pairs(A, warm, 10, "LA")
    assert warm.num_matvecs < 0.5 * cold.num_matvecs
    single = lanczos(matrix_operator(A), k=1, which="LA", seed=1, init=cold.eigenvectors[0])
    assert single.converged
    check_pairs(A, single, 1, "LA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_operators(dtype):
    A = sym_matrix_with_spectrum(_spectrum("psd_outliers", 300), seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = lanczos(matrix_operator(A, dtype), k=5, seed=0)
    assert res.converged
    assert res.eigenvectors.dtype == dtype and res.eigenvalues.dtype == torch.float64
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    err = (res.eigenvalues.cpu() - extreme_eigenvalues(A, 5, "LA")).abs().max()
    assert err <= tol(dtype) * scale
    low = lanczos(
        matrix_operator(A, dtype), k=3, which="SA", seed=0
    )  # the bulk end, indefinite scale
    assert (low.eigenvalues - extreme_eigenvalues(A, 3, "SA")).abs().max() <= tol(dtype) * scale


def test_noise_floor_above_tol_stops_early_and_says_so():
    """Products with a relative error of ~1e-4 cannot give residuals of 1e-6."""
    A = sym_matrix_with_spectrum(_spectrum("psd_outliers", 200), seed=15)
    op = LambdaOperator(
        matmat=lambda V: V @ A + 1e-3 * torch.sin(1e3 * V), size=200, dtype=torch.float64
    )
    with pytest.warns(ConvergenceWarning, match="stopped decreasing"):
        res = lanczos(op, k=3, seed=0)
    assert not res.converged and res.info["stagnated"]
    assert res.num_matvecs < 300  # far below the default budget of 1000
    assert torch.allclose(res.eigenvalues, extreme_eigenvalues(A, 3, "LA"), atol=1e-2)


@pytest.mark.parametrize("n", [4, 12])
def test_small_operator_is_exact(n):
    eigs = torch.tensor(
        [2.0, 2.0, -1.0, 0.5] + [0.1 * i for i in range(n - 4)], dtype=torch.float64
    )
    A = sym_matrix_with_spectrum(eigs, seed=9)
    for which in ("LA", "SA", "LM"):
        res = lanczos(A, k=n, which=which, seed=0)
        assert res.converged
        check_pairs(A, res, n, which, rtol=1e-12)
    res = lanczos(A, k=3, seed=0)  # the default is which="LM", as in scipy's eigsh
    assert torch.allclose(res.eigenvalues.abs(), extreme_eigenvalues(A, 3, "LM").abs(), atol=1e-12)


def test_zero_and_identity_operators():
    for A, value in [
        (torch.zeros(40, 40, dtype=torch.float64), 0.0),
        (torch.eye(40, dtype=torch.float64), 1.0),
    ]:
        res = lanczos(A, k=3, seed=0)
        assert res.converged
        assert torch.allclose(
            res.eigenvalues, torch.full((3,), value, dtype=torch.float64), atol=1e-12
        )


def test_seed_reproducible_and_global_rng_untouched():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 200), seed=10)
    state = torch.get_rng_state()
    a = lanczos(A, k=3, seed=123)
    b = lanczos(A, k=3, seed=torch.Generator().manual_seed(123))
    lanczos(A, k=3)  # seed=None: fresh entropy, not the global generator
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)


def test_result_serializes_and_unpacks():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 100), seed=11)
    res = lanczos(A, k=2, seed=0, progress=True)
    d = res.to_dict()
    json.dumps(d)
    assert "eigenvectors" not in d and d["info"]["verified"] is True
    vals, vecs = res
    assert vals.shape == (2,) and vecs.shape == (2, 100)


def test_plain_tensor_and_dense_operator_accepted():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 80), seed=12)
    r1, r2 = lanczos(A, k=2, seed=0), lanczos(DenseOperator(A), k=2, seed=0)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)


def test_lanczos_tridiagonal():
    A = sym_matrix_with_spectrum(_spectrum("psd_outliers", 200), seed=13)
    v0 = torch.ones(200, dtype=torch.float64)
    out = lanczos_tridiagonal(A, v0, 40)
    assert out.iterations == 40 and out.alphas.shape == (40,) and out.betas.shape == (39,)
    assert out.num_matvecs == 40
    Q = out.basis
    assert torch.allclose(Q @ Q.T, torch.eye(40, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ A @ Q.T, out.matrix(), atol=1e-10)  # T = V A V^T
    assert torch.allclose(
        torch.linalg.eigvalsh(out.matrix())[-3:], torch.tensor([30.0, 40, 50], dtype=torch.float64)
    )
    # an invariant subspace ends the run early: 3 distinct eigenvalues give 3 steps
    D = torch.diag(torch.tensor([1.0, 2.0, 3.0] * 10, dtype=torch.float64))
    short = lanczos_tridiagonal(D, torch.ones(30, dtype=torch.float64), 10)
    assert short.iterations == 3 and short.last_beta < 1e-12
    assert torch.allclose(
        torch.linalg.eigvalsh(short.matrix()), torch.tensor([1.0, 2, 3], dtype=torch.float64)
    )


def test_bad_inputs():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 20), seed=14)
    with pytest.raises(ValueError, match="k=21 exceeds operator size n=20"):
        lanczos(A, k=21)
    with pytest.raises(ValueError, match="k must be >= 1"):
        lanczos(A, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        lanczos(A, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="which must be 'LA'"):
        lanczos(A, which="BE")
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        lanczos(torch.triu(A) + 1.0)
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        lanczos(LambdaOperator(matvec=lambda v: v, size=5, symmetric=False))
    with pytest.raises(ValueError, match="ncv=3 must exceed k=3"):
        lanczos(A, k=3, ncv=3)
    with pytest.raises(ValueError, match="max_matvecs=5 is too small"):
        lanczos(A, k=3, max_matvecs=5)
    with pytest.raises(ValueError, match=r"init must have shape \(20,\) or \(j, 20\)"):
        lanczos(A, init=torch.ones(3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        lanczos(A, tol=-1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        lanczos(A, seed="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"v0 must have shape \(20,\)"):
        lanczos_tridiagonal(A, torch.ones(3, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="v0 is zero"):
        lanczos_tridiagonal(A, torch.zeros(20, dtype=torch.float64), 5)
    with pytest.raises(TypeError, match=r"expected a CurvatureOperator, a square torch\.Tensor"):
        lanczos([[1.0]])  # type: ignore[arg-type]
