"""block_lanczos against dense float64 eigendecompositions."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from hessian_spectra.algorithms import ConvergenceWarning, block_lanczos
from hessian_spectra.algorithms._block_run import cluster_edge
from hessian_spectra.algorithms.block import default_block_size_for
from hessian_spectra.operators.base import DenseOperator, LambdaOperator
from hessian_spectra.operators.hessian import HessianOperator
from reference import (
    check_pairs,
    dense_loss_hessian,
    extreme_eigenvalues,
    matrix_operator,
    sym_matrix_with_spectrum,
    tol,
)


def _spectrum(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rand = torch.rand(n, generator=g, dtype=torch.float64)
    if kind == "indefinite":
        return torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "psd_outliers":
        return torch.cat([torch.tensor([50.0, 40, 30, 20, 15, 12, 11, 10.5]), rand[8:]])
    if kind == "negative_dominant":
        return torch.cat([torch.tensor([-20.0, -15, -9]), 2 * rand[3:] - 1])
    if kind == "clustered":  # a tight cluster at each end, repeated values inside
        top = [9.0, 9.0, 9.0, 8.0, 8.0, 8.0, 8.0, 8.0] + [7.0 - 1e-4 * i for i in range(6)]
        bottom = [-6.0] * 4 + [-5.0 + 1e-4 * i for i in range(4)]
        return torch.cat([torch.tensor(top + bottom), 6 * rand[len(top) + len(bottom) :] - 3])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["indefinite", "psd_outliers", "negative_dominant", "clustered"])
@pytest.mark.parametrize(("which", "k"), [("LA", 10), ("SA", 5), ("LM", 10)])
def test_default_arguments_match_eigvalsh(kind, which, k):
    A = sym_matrix_with_spectrum(_spectrum(kind, 240), seed=1)
    op = matrix_operator(A)
    res = block_lanczos(op, k=k, which=which)  # default tol, block size, budget; random seed
    assert res.converged and bool(res.converged_mask.all())
    check_pairs(A, res, k, which)
    assert res.num_matvecs == op.num_matvecs
    assert res.method == "block_lanczos" and res.which == which


@pytest.mark.parametrize(
    ("top", "block_size"),
    [
        ([5.0] * 3, None),  # multiplicity 3 at the top, inside the block
        ([5.0, 4.0, 4.0, 4.0, 4.0, 3.0], None),  # multiplicity 4 = block size, inside the top 10
        ([5.0] * 5 + [4.5] * 3, None),  # multiplicity 5 > block size 4
        ([5.0] * 12, None),  # more copies than asked for
        ([5.0, 5.0, 5.0, 4.0, 4.0], 2),  # multiplicity 3 with blocks of 2
        ([5.0, 5.0, 4.0, 4.0, 4.0], 1),  # single vectors: every value is checked
    ],
)
def test_repeated_eigenvalues_beyond_the_block(top, block_size):
    n, k = 240, 10
    g = torch.Generator().manual_seed(3)
    eigs = torch.cat(
        [
            torch.tensor(top, dtype=torch.float64),
            torch.rand(n - len(top), generator=g, dtype=torch.float64) * 3,
        ]
    )
    A = sym_matrix_with_spectrum(eigs, seed=4)
    for seed in range(2):
        res = block_lanczos(matrix_operator(A), k=k, block_size=block_size, seed=seed)
        assert res.converged and res.info["verified"]
        check_pairs(A, res, k, "LA")
        b = res.info["block_size"]
        copies = max(top.count(v) for v in set(top))
        if b <= copies < k:  # as many copies as vectors in a block, all wanted: checked
            assert res.info["verification_rounds"] >= 1


def test_cluster_edge():
    theta = torch.tensor([5.0, 5.0, 5.0, 4.0, 1.0], dtype=torch.float64)
    assert cluster_edge(theta, 3, 0.01, "LA", kth=1.0) == pytest.approx(4.99)
    assert cluster_edge(theta, 4, 0.01, "LA", kth=1.0) is None  # no 4 copies
    assert cluster_edge(theta, 3, 0.01, "LA", kth=5.0) is None  # the copies tie with the k-th
    assert cluster_edge(theta, 1, 0.01, "LA", kth=1.0) == pytest.approx(3.99)  # single vectors
    assert cluster_edge(-theta, 3, 0.01, "SA", kth=-1.0) == pytest.approx(-4.99)
    assert cluster_edge(-theta, 3, 0.01, "LM", kth=-1.0) == pytest.approx(4.99)
    assert default_block_size_for(1, 100) == 2 and default_block_size_for(10, 100) == 4
    assert default_block_size_for(21, 100) == 8 and default_block_size_for(20, 3) == 3


@pytest.mark.parametrize("keep_products", [True, False])
def test_reported_residuals_are_true_residuals(keep_products):
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 200), seed=2)
    res = block_lanczos(A, k=6, seed=0, keep_products=keep_products)
    X = res.eigenvectors
    true = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-12)
    assert bool((true <= res.tol * float(res.eigenvalues.abs().max())).all())
    if keep_products:  # A x from the stored products of the basis: no more products
        assert res.info["matvecs"]["residuals"] == 0
    else:  # the true residuals' products count
        assert res.info["matvecs"]["residuals"] >= 6


def test_too_small_budget_warns_and_reports_not_converged():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 300), seed=1)
    op = matrix_operator(A)
    with pytest.warns(ConvergenceWarning, match="did not reach tol"):
        res = block_lanczos(op, k=10, max_matvecs=60, seed=0)
    assert not res.converged and not bool(res.converged_mask.all())
    assert res.num_matvecs <= 60 and op.num_matvecs == res.num_matvecs
    X = res.eigenvectors
    true = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_operators(dtype):
    A = sym_matrix_with_spectrum(_spectrum("psd_outliers", 240), seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = block_lanczos(matrix_operator(A, dtype), k=5, seed=0)
    assert res.converged
    assert res.eigenvectors.dtype == dtype and res.eigenvalues.dtype == torch.float64
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    assert (res.eigenvalues - extreme_eigenvalues(A, 5, "LA")).abs().max() <= tol(dtype) * scale
    low = block_lanczos(matrix_operator(A, dtype), k=3, which="SA", seed=0)
    assert low.converged
    assert (low.eigenvalues - extreme_eigenvalues(A, 3, "SA")).abs().max() <= tol(dtype) * scale


def test_noise_floor_above_tol_stops_early_and_says_so():
    """Products with a relative error of ~1e-4 cannot give residuals of 1e-6."""
    A = sym_matrix_with_spectrum(_spectrum("psd_outliers", 200), seed=15)
    op = LambdaOperator(
        matmat=lambda V: V @ A + 1e-3 * torch.sin(1e3 * V), size=200, dtype=torch.float64
    )
    with pytest.warns(ConvergenceWarning, match="stopped decreasing"):
        res = block_lanczos(op, k=3, seed=0)
    assert not res.converged and res.info["stagnated"]
    assert res.num_matvecs < 400  # far below the default budget of 2000
    assert torch.allclose(res.eigenvalues, extreme_eigenvalues(A, 3, "LA"), atol=1e-2)


@pytest.mark.parametrize("keep_products", [True, False])
def test_blocks_are_used(keep_products):
    """Products arrive as blocks: far fewer matmat calls than products."""
    A = sym_matrix_with_spectrum(_spectrum("psd_outliers", 300), seed=5)
    calls = []

    def mm(V: torch.Tensor) -> torch.Tensor:
        calls.append(V.shape[0])
        return V @ A

    op = LambdaOperator(matmat=mm, size=300, dtype=torch.float64)
    res = block_lanczos(op, k=10, block_size=8, seed=0, keep_products=keep_products)
    assert res.converged
    assert sum(calls) == res.num_matvecs and len(calls) == res.info["blocks"]
    assert len(calls) <= res.num_matvecs / 6
    if keep_products:
        assert set(calls) == {8}
    else:
        assert max(calls) == 10 and calls.count(8) >= len(calls) - 3  # final residuals: k rows


def test_hessian_of_a_small_mlp_matches_its_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(20, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (20,), generator=g),
        ),
        (
            torch.randn(9, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (9,), generator=g),
        ),
    ]

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    op = HessianOperator(model, data, loss_fn)
    H = dense_loss_hessian(model, data, loss_fn)  # torch.func, independent of the operator
    assert torch.allclose(op.to_dense(), H, atol=1e-10)
    op.reset_counter()
    for which, k in (("LA", 5), ("SA", 3), ("LM", 4)):
        res = block_lanczos(op, k=k, which=which, seed=0)
        assert res.converged
        check_pairs(H, res, k, which)


def test_warm_start_with_previous_eigenvectors_is_much_cheaper():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 300), seed=7)
    cold = block_lanczos(matrix_operator(A), k=10, which="LA", seed=0)
    warm = block_lanczos(matrix_operator(A), k=10, which="LA", seed=1, init=cold.eigenvectors)
    assert warm.converged
    check_pairs(A, warm, 10, "LA")
    assert warm.num_matvecs <= 0.25 * cold.num_matvecs
    part = block_lanczos(
        matrix_operator(A), k=10, which="LA", seed=1, init=cold.eigenvectors[:4]
    )  # 4 of 10 known
    assert part.converged
    check_pairs(A, part, 10, "LA")
    single = block_lanczos(matrix_operator(A), k=1, which="LA", seed=1, init=cold.eigenvectors[0])
    assert single.converged and single.num_matvecs <= 2
    check_pairs(A, single, 1, "LA")


@pytest.mark.parametrize("n", [4, 12])
def test_small_operator_is_exact(n):
    eigs = torch.tensor(
        [2.0, 2.0, -1.0, 0.5] + [0.1 * i for i in range(n - 4)], dtype=torch.float64
    )
    A = sym_matrix_with_spectrum(eigs, seed=9)
    for which in ("LA", "SA", "LM"):
        res = block_lanczos(A, k=n, which=which, seed=0)
        assert res.converged
        check_pairs(A, res, n, which, rtol=1e-12)
    res = block_lanczos(A, k=2, block_size=3, seed=0)
    assert torch.allclose(res.eigenvalues, extreme_eigenvalues(A, 2, "LA"), atol=1e-12)


def test_zero_and_identity_operators():
    for A, value in [
        (torch.zeros(40, 40, dtype=torch.float64), 0.0),
        (torch.eye(40, dtype=torch.float64), 1.0),
    ]:
        res = block_lanczos(A, k=3, seed=0)
        assert res.converged
        assert torch.allclose(res.eigenvalues, torch.full((3,), value, dtype=torch.float64))


def test_seed_reproducible_and_global_rng_untouched():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 150), seed=10)
    state = torch.get_rng_state()
    a = block_lanczos(A, k=3, seed=123)
    b = block_lanczos(A, k=3, seed=torch.Generator().manual_seed(123))
    block_lanczos(A, k=3)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)


def test_result_serializes_and_dense_operator_accepted():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 80), seed=11)
    res = block_lanczos(A, k=2, seed=0, progress=True)
    d = res.to_dict()
    json.dumps(d)
    assert d["method"] == "block_lanczos" and d["info"]["block_size"] == 4
    r2 = block_lanczos(DenseOperator(A), k=2, seed=0)
    assert torch.equal(res.eigenvalues, r2.eigenvalues)


def test_bad_inputs():
    A = sym_matrix_with_spectrum(_spectrum("indefinite", 20), seed=14)
    with pytest.raises(ValueError, match="k=21 exceeds operator size n=20"):
        block_lanczos(A, k=21)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        block_lanczos(A, block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        block_lanczos(A, block_size=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="which must be 'LA'"):
        block_lanczos(A, which="BE")
    with pytest.raises(ValueError, match=r"ncv=6 must be at least k \+ 2 \* block_size = 10"):
        block_lanczos(A, k=2, block_size=4, ncv=6)
    with pytest.raises(ValueError, match="max_matvecs=5 is too small"):
        block_lanczos(A, k=3, max_matvecs=5)
    with pytest.raises(ValueError, match=r"init must have shape \(20,\) or \(j, 20\)"):
        block_lanczos(A, init=torch.ones(3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        block_lanczos(LambdaOperator(matvec=lambda v: v, size=5, symmetric=False))
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        block_lanczos(A, tol=0.0)
