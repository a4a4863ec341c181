"""Full spectrum of a small operator: form the matrix, then ``torch.linalg.eigh``."""

from __future__ import annotations

import warnings

import torch

from hessian_spectra.algorithms._common import default_tol, positive_int, symmetric_operator
from hessian_spectra.algorithms.results import ConvergenceWarning, EigenResult
from hessian_spectra.operators._finite import NonFiniteError, nonfinite_rows
from hessian_spectra.operators.base import CurvatureOperator, keeping_graphs

__all__ = ["dense_eigh"]


@keeping_graphs
def dense_eigh(
    operator: CurvatureOperator | torch.Tensor,
    *,
    chunk_size: int = 64,
    max_size: int = 10_000,
) -> EigenResult:
    """All eigenpairs of a symmetric operator small enough to form.

    Builds ``A = op.to_dense(chunk_size=chunk_size)`` (``n`` products, in blocks of
    ``chunk_size`` unit vectors), symmetrizes it in float64 as ``(A + A^T) / 2``
    and calls ``torch.linalg.eigh``. Residuals ``||A v - lambda v||`` of the
    returned vectors (cast to the operator dtype) are computed against that
    float64 matrix; the relative asymmetry ``||A - A^T||_F / ||A||_F`` of the
    formed matrix is reported in ``info["asymmetry"]``. Above the dtype's
    tolerance (``info["asymmetry_tol"]``, the default residual tolerance:
    ``1e-6`` for float64, ``1e-5`` for float32) the operator is not the symmetric
    matrix it was declared to be (e.g. a wrong double backward), so every pair is
    flagged ``converged=False`` with a :class:`ConvergenceWarning`.

    Args:
        operator: a symmetric operator or square tensor.
        chunk_size: unit vectors per product block when forming the matrix.
        max_size: refuse ``n`` above this (memory ``8 n^2`` bytes, time ``O(n^3)``).

    Returns:
        :class:`EigenResult` with all ``n`` eigenvalues ascending (float64),
        ``eigenvectors`` ``(n, n)`` one per row, ``which="SA"``, ``method="dense"``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> dense_eigh(A).eigenvalues.tolist()
        [1.0, 3.0]
    """
    op = symmetric_operator(operator, "dense_eigh")
    if op.vector_length != op.size:
        raise ValueError(
            "dense_eigh forms the whole matrix; the operator's vectors are split across ranks: "
            "call it on the unsharded operator (e.g. FSDPHessianOperator, not .sharded())"
        )
    chunk_size = positive_int(chunk_size, "chunk_size", "dense_eigh")
    max_size = positive_int(max_size, "max_size", "dense_eigh")
    n = op.size
    if n > max_size:
        raise ValueError(
            f"dense_eigh: the operator has size n={n} > max_size={max_size}; forming it needs "
            f"{8 * n * n / 2**30:.1f} GiB in float64. Use lanczos(op, k=...) for a few "
            "eigenpairs or spectral_density(op) for the whole spectrum, or raise max_size"
        )
    before = op.num_matvecs
    A = op.to_dense(chunk_size=chunk_size).to(torch.float64)
    used = op.num_matvecs - before
    if not bool(torch.isfinite(A).all()):  # DenseOperator.to_dense() bypasses the products
        rows = nonfinite_rows(A)
        raise NonFiniteError(
            f"dense_eigh: the {type(op).__name__}'s matrix holds NaN or inf (rows {rows}); "
            "eigenvalues of a non-finite matrix mean nothing: check where the matrix comes from"
        )
    norm = float(torch.linalg.matrix_norm(A))
    asym = float(torch.linalg.matrix_norm(A - A.T)) / norm if norm > 0 else 0.0
    A = (A + A.T) / 2
    evals, evecs = torch.linalg.eigh(A)
    X = evecs.T.contiguous().to(op.dtype)
    Xd = X.to(torch.float64)
    residuals = torch.linalg.vector_norm(Xd @ A - evals[:, None] * Xd, dim=1)
    tol = default_tol(op.dtype)
    scale = float(evals.abs().max()) if n else 0.0
    mask = residuals <= tol * scale
    if asym > tol:
        mask[:] = False
        warnings.warn(
            f"dense_eigh: the operator's matrix is not symmetric (||A - A^T||_F / ||A||_F = "
            f"{asym:.2e} > {tol:g} for {op.dtype}); the eigenpairs returned are those of "
            "(A + A^T) / 2 and are flagged converged=False. Products of a symmetric curvature "
            "matrix should agree with their transpose: check the model's second derivatives "
            "(some double backwards, e.g. through weight_norm, are wrong), or use float64",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=evals,
        eigenvectors=X,
        residuals=residuals,
        converged=bool(mask.all()),
        converged_mask=mask,
        num_matvecs=used,
        tol=tol,
        method="dense",
        which="SA",
        iterations=0,
        info={"asymmetry": asym, "asymmetry_tol": tol},
    )
