r"""Curvature seen through a diagonal preconditioner, as adaptive optimizers see it.

An optimizer that steps :math:`\theta \leftarrow \theta - \eta P^{-1} m` (Adam,
AdamW, RMSProp with :math:`P = \sqrt{\hat v} + \epsilon`) is stable on a quadratic
only while the *preconditioned sharpness* :math:`\lambda_{\max}(P^{-1} H)` stays
below its threshold; for Adam with :math:`\beta_1` that is
:math:`(2 + 2\beta_1) / ((1 - \beta_1)\eta)`, ``38 / lr`` for :math:`\beta_1 = 0.9`
(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").
:math:`P^{-1} H` is not symmetric, but it is similar to the symmetric
:math:`P^{-1/2} H P^{-1/2}`, which has the same eigenvalues:
:class:`PreconditionedOperator` is that operator, so every symmetric algorithm
runs on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from hessian_spectra.operators.base import CurvatureOperator

__all__ = ["PreconditionedOperator", "adam_preconditioner", "stability_threshold"]


class PreconditionedOperator(CurvatureOperator):
    r""":math:`P^{-1/2} A P^{-1/2}` for a symmetric operator ``A`` and a positive diagonal ``P``.

    Its eigenvalues are those of :math:`P^{-1} A`; an eigenvector ``u`` of it gives
    :math:`P^{-1/2} u`, an eigenvector of :math:`P^{-1} A`.

    Args:
        operator: the symmetric operator ``A`` (e.g. a ``HessianOperator``).
        diagonal: ``(n,)`` positive entries of ``P`` (e.g. from
            :func:`adam_preconditioner`).

    Example:
        >>> A = torch.diag(torch.tensor([4.0, 9.0], dtype=torch.float64))
        >>> op = PreconditionedOperator(A, torch.tensor([2.0, 3.0], dtype=torch.float64))
        >>> [round(x, 12) for x in op.to_dense().diagonal().tolist()]  # P^-1 A
        [2.0, 3.0]
    """

    def __init__(self, operator: CurvatureOperator | Tensor, diagonal: Tensor) -> None:
        from hessian_spectra.operators.base import as_operator

        super().__init__()
        self.operator = as_operator(operator)
        if not isinstance(diagonal, Tensor) or diagonal.shape != (self.operator.vector_length,):
            got = tuple(diagonal.shape) if isinstance(diagonal, Tensor) else type(diagonal).__name__
            raise ValueError(
                f"diagonal must be a ({self.operator.vector_length},) tensor, got {got}"
            )
        d = diagonal.detach().to(device=self.operator.device, dtype=torch.float64)
        if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
            raise ValueError(
                "the preconditioner's diagonal must be finite and positive; an optimizer's "
                "denominator sqrt(v_hat) + eps always is (is eps 0 with an unused parameter?)"
            )
        self.diagonal = d
        self._scale = d.rsqrt().to(self.operator.dtype)
        self.symmetric = True

    @property
    def size(self) -> int:
        return self.operator.size

    @property
    def vector_length(self) -> int:
        return self.operator.vector_length

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def backend(self) -> Any:
        return self.operator.backend

    def common_seed(self, seed: Any) -> Any:
        return self.operator.common_seed(seed)

    @contextlib.contextmanager
    def keep_graphs(self) -> Iterator[None]:
        """The wrapped operator's :meth:`~CurvatureOperator.keep_graphs` block."""
        with self.operator.keep_graphs():
            yield

    def clear_graphs(self) -> None:
        self.operator.clear_graphs()

    def _matmat(self, V: Tensor) -> Tensor:
        return self.operator.matmat(V * self._scale) * self._scale

    def __repr__(self) -> str:
        return f"PreconditionedOperator({self.operator!r})"


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor:
    r"""The diagonal :math:`P = \sqrt{\hat v} + \epsilon` by which ``optimizer`` divides its
    step, flattened in the order of ``params`` (an operator's ``op.params``).

    Read exactly as :class:`torch.optim.Adam` and :class:`torch.optim.AdamW` compute
    it: :math:`\hat v = v_t / (1 - \beta_2^t)` from the state's ``exp_avg_sq``
    (``max_exp_avg_sq`` with ``amsgrad``) and ``step``, with the group's ``eps``.

    Raises:
        ValueError: a parameter has no optimizer state yet (take a step first), or is
            not among the optimizer's parameters.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for i, p in enumerate(params):
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not in the optimizer")
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) has no second-moment estimate yet: "
                "the preconditioner exists after the optimizer's first step"
            )
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        beta2 = group["betas"][1]
        v_hat = v.detach().double() / (1 - beta2**step)
        parts.append((v_hat.sqrt() + group["eps"]).reshape(-1))
    return torch.cat(parts)


def stability_threshold(lr: float, beta1: float | None = None) -> float:
    r"""The largest (preconditioned) sharpness at which the optimizer is stable on a quadratic.

    ``2 / lr`` for gradient descent (``beta1=None``); for heavy-ball momentum or
    Adam with ``beta1``, :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\mathrm{lr})`
    (``38 / lr`` for ``beta1 = 0.9``; Cohen et al. 2021, 2022).

    Example:
        >>> stability_threshold(0.1), round(stability_threshold(1e-3, 0.9))
        (20.0, 38000)
    """
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if beta1 is None:
        return 2.0 / lr
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1 must lie in [0, 1), got {beta1!r}")
    return (2 + 2 * beta1) / ((1 - beta1) * lr)
