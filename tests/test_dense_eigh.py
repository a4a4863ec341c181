"""dense_eigh: the full spectrum of small operators."""

from __future__ import annotations

import pytest
import torch

from hessian_spectra.algorithms import dense_eigh
from hessian_spectra.operators.base import LambdaOperator
from reference import sym_matrix_with_spectrum, tol


def _op(A, dtype=torch.float64):
    Ad = A.to(dtype)
    return LambdaOperator(matmat=lambda V: V @ Ad, size=A.shape[0], dtype=dtype)


def test_full_spectrum_matches_known_eigenvalues():
    eigs = torch.tensor(
        [3.0, 3.0, -2.0, 0.0, 1.5] + [0.1 * i for i in range(25)], dtype=torch.float64
    )
    A = sym_matrix_with_spectrum(eigs, seed=0)
    op = _op(A)
    res = dense_eigh(op, chunk_size=7)
    assert res.method == "dense" and res.which == "SA" and res.converged
    assert res.eigenvalues.dtype == torch.float64
    assert torch.allclose(res.eigenvalues, eigs.sort().values, atol=tol(torch.float64) * 3)
    X = res.eigenvectors
    assert X.shape == (30, 30)
    assert torch.allclose(X @ X.T, torch.eye(30, dtype=torch.float64), atol=1e-12)
    true = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    assert torch.allclose(res.residuals, true, atol=1e-12)
    assert res.num_matvecs == 30 == op.num_matvecs
    assert res.info["asymmetry"] < 1e-14


def test_low_precision_operator():
    A = sym_matrix_with_spectrum(torch.linspace(-1, 1, 20, dtype=torch.float64), seed=1)
    res = dense_eigh(_op(A, torch.bfloat16))
    assert res.eigenvectors.dtype == torch.bfloat16 and res.converged
    assert torch.allclose(
        res.eigenvalues, torch.linspace(-1, 1, 20, dtype=torch.float64), atol=tol(torch.bfloat16)
    )


def test_refuses_large_or_non_symmetric_operators():
    big = LambdaOperator(matvec=lambda v: v, size=20_001)
    with pytest.raises(ValueError, match="n=20001 > max_size=10000"):
        dense_eigh(big)
    with pytest.raises(ValueError, match="n=50 > max_size=10"):
        dense_eigh(torch.eye(50), max_size=10)
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        dense_eigh(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        dense_eigh(torch.eye(3), chunk_size=0)
