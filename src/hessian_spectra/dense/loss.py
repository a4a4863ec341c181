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
    analysed,
    as_inputs,
    blocks_to_matrix,
    check_batch,
    functional_model,
    hessian_blocks,
    per_sample_blocks,
    resolve_parameters,
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


def _loss_fn(
    model: nn.Module, criterion: Criterion, inputs: tuple[Any, ...], target: Any
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    forward = functional_model(model, inputs)

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
    names, ps = resolve_parameters(model, params)
    with analysed(model, eval_mode):
        return hessian_blocks(
            _loss_fn(model, criterion, as_inputs(inputs), target),
            names,
            ps,
            diagonal_only=diagonal_only,
        )


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
    names, ps = resolve_parameters(model, params)
    blocks = loss_hessian_dict(
        model,
        criterion,
        inputs,
        target,
        params=names,
        diagonal_only=diagonal_only,
        eval_mode=eval_mode,
    )
    return blocks_to_matrix(blocks, names, [p.shape for p in ps], diagonal_only=diagonal_only)


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
    names, ps = resolve_parameters(model, params)
    args = as_inputs(batch_inputs)
    check_batch((*args, batch_target), "batch_loss_hessian")

    def one(*sample: Tensor) -> BlockDict:
        fn = _loss_fn(model, criterion, tuple(sample[:-1]), sample[-1])
        return hessian_blocks(fn, names, ps, diagonal_only=diagonal_only)

    with analysed(model, eval_mode):
        return per_sample_blocks(one, (*args, batch_target), vectorize=vectorize)


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
    names, ps = resolve_parameters(model, params)
    blocks = batch_loss_hessian_dict(
        model,
        criterion,
        batch_inputs,
        batch_target,
        params=names,
        diagonal_only=diagonal_only,
        eval_mode=eval_mode,
        vectorize=vectorize,
    )
    return blocks_to_matrix(blocks, names, [p.shape for p in ps], diagonal_only=diagonal_only)
