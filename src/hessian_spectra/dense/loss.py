"""Dense Hessians of a loss ``criterion(model(*inputs), target)`` with respect to the parameters.

.. math::

    H_{kl} = \\frac{\\partial^2}{\\partial \\theta_k\\, \\partial \\theta_l}\\,
    \\ell\\big(f(x; \\theta), y\\big), \\qquad H \\in \\mathbb{R}^{n \\times n}.

:func:`loss_hessian_matrix` evaluates the criterion once on the whole batch
(so a mean-reduced criterion gives the Hessian of the mean loss);
:func:`batch_loss_hessian_matrix` gives one Hessian per sample, shape
``(B, n, n)``. Computed with ``torch.func`` (``jacrev(grad(f))``), in the parameters'
dtype and on their device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from hessian_spectra.dense.blocks import (
    BlockDict,
    ParamSpec,
    as_inputs,
    as_matrix,
    dense_blocks,
    functional_model,
)

__all__ = [
    "Criterion",
    "batch_loss_hessian_dict",
    "batch_loss_hessian_matrix",
    "loss_hessian_dict",
    "loss_hessian_matrix",
]

Criterion = Callable[[Any, Any], Tensor]
"""``criterion(output, target) -> scalar`` such as ``nn.MSELoss()``."""


def _loss_of(
    model: nn.Module, criterion: Criterion
) -> Callable[..., Callable[[Mapping[str, Tensor]], Tensor]]:
    """``(*inputs, target) -> (params -> criterion(model(*inputs), target))``, checked scalar."""

    def make(*args: Any) -> Callable[[Mapping[str, Tensor]], Tensor]:
        forward, target = functional_model(model, args[:-1]), args[-1]

        def f(p: Mapping[str, Tensor]) -> Tensor:
            loss = criterion(forward(p), target)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(
                    f"the criterion returned {shape}; a loss Hessian needs a scalar loss "
                    "(use reduction='mean' or 'sum')"
                )
            return loss.reshape(())

        return f

    return make


def _check_criterion(criterion: Any) -> None:
    if not callable(criterion):
        raise TypeError(
            "criterion must be callable as criterion(output, target), got "
            f"{type(criterion).__name__}"
        )


def loss_hessian_dict(
    model: nn.Module,
    criterion: Criterion,
    inputs: Any,
    target: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
) -> BlockDict:
    """Hessian blocks of ``criterion(model(*inputs), target)``, shaped ``P_i.shape + P_j.shape``.

    Args:
        model: the module; left bit-identical.
        criterion: ``(output, target) -> scalar``.
        inputs: a tensor or tuple of positional arguments to ``model`` (the
            whole batch; the criterion reduces over it).
        target: passed to the criterion as it is.
        params: ``None`` (all trainable), a filter ``(name, param) -> bool`` or names.
        diagonal_only: compute only the blocks ``(name, name)``.
        eval_mode: evaluate in eval mode (default, as hesse); ``False`` keeps the mode.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> h = loss_hessian_dict(model, torch.nn.MSELoss(), x, y)
        >>> h[("weight", "weight")].shape
        torch.Size([1, 3, 1, 3])
    """
    _check_criterion(criterion)
    args = (*as_inputs(inputs), target)
    return dense_blocks(model, _loss_of(model, criterion), args, params, diagonal_only, eval_mode)


def loss_hessian_matrix(
    model: nn.Module,
    criterion: Criterion,
    inputs: Any,
    target: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
) -> Tensor:
    """The loss Hessian as an ``(n, n)`` matrix (arguments as in :func:`loss_hessian_dict`).

    Example (least squares: ``H = 2/N [X 1]^T [X 1]``):
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        >>> Z = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], dim=1)
        >>> h = loss_hessian_matrix(model, torch.nn.MSELoss(), x, y)
        >>> torch.allclose(h, 2 / 5 * Z.T @ Z)
        True
    """
    args = (criterion, inputs, target)
    return as_matrix(loss_hessian_dict, model, args, params, diagonal_only, eval_mode=eval_mode)


def batch_loss_hessian_dict(
    model: nn.Module,
    criterion: Criterion,
    batch_inputs: Any,
    batch_target: Tensor,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
    vectorize: bool = True,
) -> BlockDict:
    """Per-sample loss Hessian blocks, each of shape ``(B,) + P_i.shape + P_j.shape``.

    Sample ``b`` is ``criterion(model(*(t[b] for t in batch_inputs)), batch_target[b])``:
    the model and the criterion see one sample without its batch dimension.

    Args:
        batch_inputs: a tensor or tuple of tensors with a leading batch dimension ``B``.
        batch_target: a tensor with the same leading dimension.
        vectorize: :func:`torch.func.vmap` over the samples (default) or a loop.
        Other arguments as in :func:`loss_hessian_dict`.
    """
    _check_criterion(criterion)
    args = (*as_inputs(batch_inputs), batch_target)
    loss_of = _loss_of(model, criterion)
    return dense_blocks(
        model, loss_of, args, params, diagonal_only, eval_mode, "batch_loss_hessian", vectorize
    )


def batch_loss_hessian_matrix(
    model: nn.Module,
    criterion: Criterion,
    batch_inputs: Any,
    batch_target: Tensor,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
    vectorize: bool = True,
) -> Tensor:
    """Per-sample loss Hessians, shape ``(B, n, n)`` (see :func:`batch_loss_hessian_dict`)."""
    args = (criterion, batch_inputs, batch_target)
    kwargs = {"eval_mode": eval_mode, "vectorize": vectorize}
    return as_matrix(batch_loss_hessian_dict, model, args, params, diagonal_only, **kwargs)
