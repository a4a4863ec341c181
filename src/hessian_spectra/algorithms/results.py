"""Result dataclasses returned by every algorithm.

Each carries the estimate, its error information, ``converged`` and
``num_matvecs``; ``to_dict()`` gives plain Python values that :func:`json.dumps`
accepts (tensors become lists, eigenvectors only on request) and ``from_dict``
reads back; ``save``/``load`` write and read ``.json``, ``.pt`` (loadable with
``torch.load(path, weights_only=True)``) and ``.safetensors`` files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hessian_spectra.algorithms._codec import Serializable, load_result, to_jsonable

__all__ = [
    "ConvergenceWarning",
    "DiagonalResult",
    "EigenResult",
    "SpectralDensityResult",
    "TraceResult",
    "load_result",
    "to_jsonable",
]


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before meeting its tolerance (the result says which parts)."""


class _Saveable(Serializable):
    """``to_dict``/``from_dict`` and ``save``/``load`` shared by the result classes."""


@dataclass(frozen=True, eq=False)
class EigenResult(_Saveable):
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64, ordered as requested by ``which``.
        eigenvectors: ``(k, n)``, one unit eigenvector per row, operator dtype.
        residuals: ``(k,)`` true residual norms ``||A v - lambda v||``.
        converged: whether every pair met the tolerance.
        converged_mask: ``(k,)`` bool, per pair.
        num_matvecs: operator products used.
        tol: the relative tolerance asked for (residual <= tol * max|lambda|).
        method: the algorithm that produced it (e.g. ``"lanczos"``).
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        iterations: Lanczos (Krylov) steps or power iterations done: the products
            spent on the search itself, without those of the true residuals.
        info: extra method-specific details (plain values).

    Unpacks as ``eigenvalues, eigenvectors = result``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    converged_mask: Tensor
    num_matvecs: int
    tol: float
    method: str
    which: str = "LA"
    iterations: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    _vector_fields = ("eigenvectors",)

    @classmethod
    def _absent(cls, name: str, values: dict[str, Any]) -> Any:
        # saved without vectors: a (k, 0) placeholder keeps ``len`` and unpacking working
        return torch.empty((len(values["eigenvalues"]), 0), dtype=torch.float64)

    def __iter__(self) -> Iterator[Tensor]:
        yield self.eigenvalues
        yield self.eigenvectors

    def __len__(self) -> int:
        return int(self.eigenvalues.shape[0])


@dataclass(frozen=True, eq=False)
class TraceResult(_Saveable):
    """A stochastic trace estimate.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error (``nan`` when it cannot be estimated).
        num_matvecs: operator products used.
        operator_size: the dimension ``n``.
        method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
        samples: per-probe quadratic forms used for the error (Hutchinson part).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    operator_size: int
    method: str
    samples: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    _vector_fields = ("samples",)

    def __float__(self) -> float:
        return float(self.estimate)


@dataclass(frozen=True, eq=False)
class DiagonalResult(_Saveable):
    """A stochastic estimate of ``diag(A)``.

    Attributes:
        estimate: ``(n,)`` diagonal estimate.
        stderr: ``(n,)`` standard error per entry.
        num_matvecs: operator products used.
    """

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str = "hutchinson"
    info: dict[str, Any] = field(default_factory=dict)

    _vector_fields = ("estimate", "stderr")


@dataclass(frozen=True, eq=False)
class SpectralDensityResult(_Saveable):
    """Stochastic Lanczos quadrature estimate of the spectral density.

    Attributes:
        nodes: ``(num_runs, m)`` Ritz values of each run (quadrature nodes).
        weights: ``(num_runs, m)`` quadrature weights, each row sums to 1.
        grid: ``(G,)`` points where the smoothed density is evaluated.
        density: ``(G,)`` smoothed density; integrates to 1 over ``grid``.
        sigma: Gaussian smoothing width used.
        num_matvecs: operator products used.
        operator_size: the dimension ``n``.
        eigenvectors: per run, the ``(m, n)`` Ritz vectors of its nodes (only with
            ``return_eigenvectors=True``, else ``None``).

    ``raw_eigenvalues`` and ``raw_weights`` are the names hessian-eigenthings gives
    ``nodes`` and ``weights``.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_matvecs: int
    operator_size: int
    eigenvectors: list[Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    _vector_fields = ("eigenvectors",)

    @property
    def raw_eigenvalues(self) -> Tensor:
        """``(num_runs, m)`` quadrature nodes (the Ritz values of each run)."""
        return self.nodes

    @property
    def raw_weights(self) -> Tensor:
        """``(num_runs, m)`` quadrature weights, each row summing to 1."""
        return self.weights
