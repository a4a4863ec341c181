"""Softmax regression at W = 0: a Hessian with known eigenvalues and multiplicities.

For logits ``W x`` (no bias) and mean cross-entropy, at ``W = 0`` every sample has
``p = 1/C``, so

.. math::

    H = \\Big(\\tfrac{1}{C} I - \\tfrac{1}{C^2} \\mathbf{1}\\mathbf{1}^T\\Big) \\otimes \\Sigma_x,
    \\qquad \\Sigma_x = \\tfrac{1}{N} X^T X,

whose eigenvalues are ``sigma_j / C`` (each ``C - 1`` times) and ``0`` (``d`` times).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessian_spectra import HessianOperator, lanczos
from reference import tol

C, D, N = 4, 6, 60
SIGMAS = torch.tensor([6.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)


def _problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(N, D, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    X = (U * (N * SIGMAS).sqrt()) @ V.T  # (1/N) X^T X = V diag(SIGMAS) V^T
    y = torch.randint(0, C, (N,), generator=g)
    model = nn.Linear(D, C, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    # unequal batches: the weighting must reproduce the mean over all N samples
    return model, [(X[:41], y[:41]), (X[41:], y[41:])]


def _loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def test_dense_hessian_is_the_kronecker_product() -> None:
    model, data = _problem()
    X = torch.cat([b[0] for b in data])
    A = torch.eye(C, dtype=torch.float64) / C - torch.full((C, C), 1.0 / C**2, dtype=torch.float64)
    expected = torch.kron(A, X.T @ X / N)
    H = HessianOperator(model, data, _loss).to_dense()
    torch.testing.assert_close(H, expected, rtol=tol(torch.float64), atol=tol(torch.float64))


@pytest.mark.parametrize("k", [3, 7, 12])
def test_lanczos_defaults_find_every_copy_of_each_eigenvalue(k: int) -> None:
    model, data = _problem()
    expected = (SIGMAS / C).repeat_interleave(C - 1)[:k]  # each sigma/C exactly C-1 times
    res = lanczos(HessianOperator(model, data, _loss), k=k, seed=1)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-6, atol=0.0)
    # the eigenvectors of a repeated eigenvalue span its eigenspace: orthonormal, no ghosts
    Q = res.eigenvectors
    torch.testing.assert_close(Q @ Q.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-6)


def test_smallest_eigenvalue_is_zero_with_multiplicity_d() -> None:
    model, data = _problem()
    res = lanczos(HessianOperator(model, data, _loss), k=D, which="SA", seed=2)
    assert res.converged
    assert res.eigenvalues.abs().max() <= 1e-6 * float(SIGMAS.max() / C)
