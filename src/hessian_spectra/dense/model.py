"""Dense Hessians of a model's outputs with respect to its parameters.

For a model ``f(x; P_1, ..., P_r)`` with an output of shape ``S``, the model
Hessian at ``x`` has one ``n x n`` matrix per output entry ``s``:

.. math::

    H^{(s)}_{kl} = \\frac{\\partial^2 f_s(x)}{\\partial \\theta_k\\, \\partial \\theta_l},
    \\qquad \\theta = (\\mathrm{vec}\\,P_1, \\dots, \\mathrm{vec}\\,P_r) \\in \\mathbb{R}^n,

so the matrix has shape ``S + (n, n)`` (``(n, n)`` for a scalar output).
Per-sample (``batch_*``) functions evaluate the model on each sample of a batch
(row ``b`` of every input, passed without the batch dimension) and stack the
results: shape ``(B,) + S + (n, n)``. Computed with ``torch.func`` (``jacrev(grad(f))``,
reverse-over-reverse), in the parameters' dtype and on their device; only for
models small enough that ``n^2`` numbers per output fit in memory.
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
    "batch_model_hessian_dict",
    "batch_model_hessian_matrix",
    "model_hessian_dict",
    "model_hessian_matrix",
]


def _output_of(model: nn.Module) -> Callable[..., Callable[[Mapping[str, Tensor]], Tensor]]:
    """``(*inputs) -> (params -> model(*inputs))``, checked to return one tensor."""

    def make(*inputs: Any) -> Callable[[Mapping[str, Tensor]], Tensor]:
        forward = functional_model(model, inputs)

        def f(p: Mapping[str, Tensor]) -> Tensor:
            out = forward(p)
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"the model returned a {type(out).__name__}; a model Hessian needs a tensor "
                    "output (wrap the model so that forward returns one tensor)"
                )
            return out

        return f

    return make


def model_hessian_dict(
    model: nn.Module,
    inputs: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
) -> BlockDict:
    """Hessian blocks of ``model(*inputs)`` with respect to its trainable parameters.

    Args:
        model: the module; it is left bit-identical (mode, buffers, grads, RNG).
        inputs: one tensor or a tuple of positional arguments to ``model``,
            passed as they are (a batch dimension, if any, is part of the output).
        params: ``None`` for every trainable parameter, a filter
            ``(name, param) -> bool`` or an iterable of names. Frozen
            parameters are left out.
        diagonal_only: compute only the blocks ``(name, name)``.
        eval_mode: evaluate with the model in eval mode (dropout off, BatchNorm
            on running statistics), as hesse does; ``False`` keeps its mode.

    Returns:
        ``{(name_i, name_j): block}`` with blocks of shape
        ``S + P_i.shape + P_j.shape`` for an output of shape ``S``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> h = model_hessian_dict(model, torch.ones(2))
        >>> h[("weight", "bias")].shape
        torch.Size([1, 1, 2, 1])
    """
    args = as_inputs(inputs)
    return dense_blocks(model, _output_of(model), args, params, diagonal_only, eval_mode)


def model_hessian_matrix(
    model: nn.Module,
    inputs: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
) -> Tensor:
    """The model Hessian as a tensor of shape ``output.shape + (n, n)``.

    Arguments as in :func:`model_hessian_dict`. With ``diagonal_only`` every
    diagonal block sits at its parameter's offset and the rest is zero.

    Example (a bilinear model: its Hessian is the constant coupling matrix):
        >>> import torch
        >>> class Bilinear(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Parameter(torch.ones(2))
        ...         self.b = torch.nn.Parameter(torch.ones(2))
        ...     def forward(self, x):
        ...         return (self.a * x) @ self.b
        >>> model_hessian_matrix(Bilinear(), torch.tensor([1.0, 2.0]))
        tensor([[0., 0., 1., 0.],
                [0., 0., 0., 2.],
                [1., 0., 0., 0.],
                [0., 2., 0., 0.]])
    """
    return as_matrix(
        model_hessian_dict, model, (inputs,), params, diagonal_only, eval_mode=eval_mode
    )


def batch_model_hessian_dict(
    model: nn.Module,
    batch_inputs: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
    vectorize: bool = True,
) -> BlockDict:
    """Per-sample model Hessian blocks, each of shape ``(B,) + S + P_i.shape + P_j.shape``.

    Args:
        batch_inputs: a tensor or tuple of tensors sharing a leading batch
            dimension ``B``; sample ``b`` calls ``model(*(t[b] for t in batch_inputs))``.
        vectorize: map over the samples with :func:`torch.func.vmap` (default)
            or, for models vmap cannot trace, a loop.
        Other arguments as in :func:`model_hessian_dict`.
    """
    args, output_of = as_inputs(batch_inputs), _output_of(model)
    return dense_blocks(
        model, output_of, args, params, diagonal_only, eval_mode, "batch_model_hessian", vectorize
    )


def batch_model_hessian_matrix(
    model: nn.Module,
    batch_inputs: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    eval_mode: bool = True,
    vectorize: bool = True,
) -> Tensor:
    """Per-sample model Hessians, shape ``(B,) + S + (n, n)`` (``S``: one sample's output shape).

    Arguments as in :func:`batch_model_hessian_dict`.
    """
    kwargs = {"eval_mode": eval_mode, "vectorize": vectorize}
    return as_matrix(
        batch_model_hessian_dict, model, (batch_inputs,), params, diagonal_only, **kwargs
    )
