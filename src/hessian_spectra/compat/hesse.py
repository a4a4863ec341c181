"""hesse's entry points, as thin adapters over :mod:`hessian_spectra.dense`.

Code written against ``hesse`` runs with only its import changed::

    from hessian_spectra.compat import hesse
    hessian = hesse.model_hessian_matrix(model=model, inputs=(x, y))

Same names, argument names and output shapes: a model Hessian is
``output.shape + (n, n)``, a per-sample one ``(B,) + sample_output.shape + (n, n)``,
a loss Hessian ``(n, n)``, and the dicts are nested, ``hessian_dict["P"]["Q"]``
with blocks of shape ``output.shape + P.shape + Q.shape``. ``params`` lists
parameter names; frozen ones are left out, as in hesse.

Where this differs from hesse (its faults, fixed here):

* models whose parameters differ in rank (``nn.Linear`` with a bias) work;
  hesse's dimension checks reject them;
* ``diagonal_only=True`` puts every diagonal block at its own offset; hesse
  skips the column-offset update on off-diagonal blocks and writes later blocks
  at the wrong columns;
* outputs with any number of dimensions are supported (hesse's matrix
  functions raise "Unsupported high-dimensional output shape" beyond one
  non-batch dimension);
* the result keeps the parameters' dtype and device (hesse allocates float32 on the CPU);
* an unknown name in ``params`` raises ``ValueError`` (hesse ignores it);
* the sharpness functions accept ``diagonal_only`` (a hesse to-do) and a
  multi-output model (sharpness per output entry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from hessian_spectra import dense
from hessian_spectra.dense.blocks import nested_blocks
from hessian_spectra.dense.loss import Criterion
from hessian_spectra.dense.sharpness import sharpness

__all__ = [
    "batch_loss_hessian",
    "batch_loss_hessian_dict",
    "batch_loss_hessian_matrix",
    "batch_loss_sharpness",
    "batch_model_hessian",
    "batch_model_hessian_dict",
    "batch_model_hessian_matrix",
    "batch_model_sharpness",
    "loss_hessian",
    "loss_hessian_dict",
    "loss_hessian_matrix",
    "loss_sharpness",
    "model_hessian",
    "model_hessian_dict",
    "model_hessian_matrix",
    "model_sharpness",
    "sharpness",
]

HessianDict = dict[str, dict[str, Tensor]]


def _params(model: nn.Module, params: Iterable[str] | None) -> list[str] | None:
    """hesse's selection: the named parameters among the trainable ones (``None``: all of them)."""
    if params is None:
        return None
    if isinstance(params, str):
        params = [params]
    wanted = list(params)
    named = dict(model.named_parameters())
    unknown = [w for w in wanted if w not in named]
    if unknown:
        # let the dense layer raise its message listing the model's names
        return wanted
    return [w for w in wanted if named[w].requires_grad]


def _call(
    fn: Callable[..., Any],
    model: nn.Module,
    args: tuple[Any, ...],
    params: Iterable[str] | None,
    diagonal_only: bool,
) -> Any:
    """``fn(model, *args)`` of :mod:`hessian_spectra.dense` with hesse's parameter selection."""
    return fn(model, *args, params=_params(model, params), diagonal_only=diagonal_only)


def model_hessian_dict(
    model: nn.Module, inputs: Any, params: Iterable[str] | None = None, diagonal_only: bool = False
) -> HessianDict:
    """``hessian_dict["P"]["Q"]``: block of the Hessian of ``model(*inputs)``.

    Each block has shape ``out.shape + P.shape + Q.shape``.
    """
    return nested_blocks(_call(dense.model_hessian_dict, model, (inputs,), params, diagonal_only))


def batch_model_hessian_dict(
    model: nn.Module,
    batch_inputs: Any,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> HessianDict:
    """Per-sample blocks, ``hessian_dict["P"]["Q"][b]`` for sample ``b``."""
    return nested_blocks(
        _call(dense.batch_model_hessian_dict, model, (batch_inputs,), params, diagonal_only)
    )


def loss_hessian_dict(
    model: nn.Module,
    criterion: Criterion,
    inputs: Any,
    target: Any,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> HessianDict:
    """Blocks of the Hessian of ``criterion(model(*inputs), target)`` (whole batch)."""
    return nested_blocks(
        _call(dense.loss_hessian_dict, model, (criterion, inputs, target), params, diagonal_only)
    )


def batch_loss_hessian_dict(
    model: nn.Module,
    criterion: Criterion,
    batch_inputs: Any,
    batch_target: Tensor,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> HessianDict:
    """Per-sample loss Hessian blocks, ``hessian_dict["P"]["Q"][b]``."""
    args = (criterion, batch_inputs, batch_target)
    return nested_blocks(_call(dense.batch_loss_hessian_dict, model, args, params, diagonal_only))


def model_hessian_matrix(
    model: nn.Module, inputs: Any, params: Iterable[str] | None = None, diagonal_only: bool = False
) -> Tensor:
    """Model Hessian matrix, shape ``model(*inputs).shape + (n, n)``."""
    return _call(dense.model_hessian_matrix, model, (inputs,), params, diagonal_only)


def batch_model_hessian_matrix(
    model: nn.Module,
    batch_inputs: Any,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> Tensor:
    """Per-sample model Hessian matrices, shape ``(B,) + sample_output.shape + (n, n)``."""
    return _call(dense.batch_model_hessian_matrix, model, (batch_inputs,), params, diagonal_only)


def loss_hessian_matrix(
    model: nn.Module,
    criterion: Criterion,
    inputs: Any,
    target: Any,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> Tensor:
    """Loss Hessian matrix, shape ``(n, n)``."""
    return _call(
        dense.loss_hessian_matrix, model, (criterion, inputs, target), params, diagonal_only
    )


def batch_loss_hessian_matrix(
    model: nn.Module,
    criterion: Criterion,
    batch_inputs: Any,
    batch_target: Tensor,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> Tensor:
    """Per-sample loss Hessian matrices, shape ``(B, n, n)``."""
    args = (criterion, batch_inputs, batch_target)
    return _call(dense.batch_loss_hessian_matrix, model, args, params, diagonal_only)


def model_sharpness(
    model: nn.Module, inputs: Any, params: Iterable[str] | None = None, diagonal_only: bool = False
) -> Tensor:
    """Largest ``|eigenvalue|`` of the model Hessian (one per output entry)."""
    return _call(dense.model_sharpness, model, (inputs,), params, diagonal_only)


def batch_model_sharpness(
    model: nn.Module,
    batch_inputs: Any,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> Tensor:
    """Per-sample model sharpness, shape ``(B,) + sample_output.shape``."""
    return _call(dense.batch_model_sharpness, model, (batch_inputs,), params, diagonal_only)


def loss_sharpness(
    model: nn.Module,
    criterion: Criterion,
    inputs: Any,
    target: Any,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> Tensor:
    """Largest ``|eigenvalue|`` of the loss Hessian (0-d tensor)."""
    return _call(dense.loss_sharpness, model, (criterion, inputs, target), params, diagonal_only)


def batch_loss_sharpness(
    model: nn.Module,
    criterion: Criterion,
    batch_inputs: Any,
    batch_target: Tensor,
    params: Iterable[str] | None = None,
    diagonal_only: bool = False,
) -> Tensor:
    """Per-sample loss sharpness, shape ``(B,)``."""
    args = (criterion, batch_inputs, batch_target)
    return _call(dense.batch_loss_sharpness, model, args, params, diagonal_only)


# hesse's first interface (hesse.py): inputs as *args, nested dicts of blocks
def model_hessian(model: nn.Module, *inputs: Any) -> HessianDict:
    """``model_hessian(model, x, y)``: nested blocks for unbatched inputs."""
    return model_hessian_dict(model, tuple(inputs))


def batch_model_hessian(model: nn.Module, *batch_inputs: Tensor) -> HessianDict:
    """``batch_model_hessian(model, xs, ys)``: per-sample nested blocks."""
    return batch_model_hessian_dict(model, tuple(batch_inputs))


def loss_hessian(model: nn.Module, criterion: Criterion, *inputs: Any, target: Any) -> HessianDict:
    """``loss_hessian(model, criterion, x, target=t)``: nested loss blocks."""
    return loss_hessian_dict(model, criterion, tuple(inputs), target)


def batch_loss_hessian(
    model: nn.Module, criterion: Criterion, *batch_inputs: Tensor, batch_target: Tensor
) -> HessianDict:
    """``batch_loss_hessian(model, criterion, xs, batch_target=ts)``: per-sample nested blocks."""
    return batch_loss_hessian_dict(model, criterion, tuple(batch_inputs), batch_target)
