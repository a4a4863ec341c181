"""Sharpness: the largest absolute eigenvalue of a model or loss Hessian.

.. math::

    \\operatorname{sharpness}(H) = \\max_i |\\lambda_i(H)| = \\|H\\|_2
    \\quad (H \\text{ symmetric}),

the quantity that bounds stable gradient-descent step sizes (``lr < 2 / sharpness``,
Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the
edge of stability"). ``diagonal_only=True`` gives the sharpness of the
block-diagonal part of ``H`` (one block per parameter), i.e. the largest
sharpness of any single parameter's block, since the spectrum of a
block-diagonal matrix is the union of its blocks' spectra.

Two ways to compute it:

* ``method="dense"`` forms the Hessian (:mod:`hessian_spectra.dense`) and takes
  its eigenvalues (``torch.linalg.eigvalsh`` in float64);
* ``method="lanczos"`` never forms it: a
  :class:`~hessian_spectra.operators.hessian.HessianOperator` gives
  Hessian-vector products and :func:`~hessian_spectra.algorithms.lanczos` finds
  the eigenvalue of largest magnitude (``which="LM"``).

``method="auto"`` (default) is dense up to ``dense_limit`` parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hessian_spectra.dense.blocks import (
    BlockDict,
    ParamSpec,
    analysed,
    as_inputs,
    blocks_to_matrix,
    check_batch,
    resolve_parameters,
)
from hessian_spectra.dense.loss import (
    Criterion,
    batch_loss_hessian_dict,
    loss_hessian_dict,
)
from hessian_spectra.dense.model import batch_model_hessian_dict, model_hessian_dict
from hessian_spectra.params import ParamFilter

__all__ = [
    "DENSE_LIMIT",
    "batch_loss_sharpness",
    "batch_model_sharpness",
    "loss_sharpness",
    "model_sharpness",
    "sharpness",
]

DENSE_LIMIT = 2048
"""``method="auto"`` forms the Hessian up to this many parameters, else runs Lanczos."""

_METHODS = ("auto", "dense", "lanczos")
SharpnessMethod = Literal["auto", "dense", "lanczos"]


def sharpness(matrix: Tensor) -> Tensor:
    """Largest ``|eigenvalue|`` of symmetric matrices over the last two dimensions.

    Args:
        matrix: ``(..., n, n)``, symmetric.

    Returns:
        ``(...)`` in the matrix's dtype and device (eigenvalues computed in float64).

    Example:
        >>> import torch
        >>> sharpness(torch.diag(torch.tensor([1.0, -3.0, 2.0])))
        tensor(3.)
    """
    if not isinstance(matrix, Tensor) or matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"sharpness() needs square matrices of shape (..., n, n), got {shape}")
    evals = torch.linalg.eigvalsh(matrix.to(torch.float64))
    return evals.abs().amax(dim=-1).to(matrix.dtype)


def _blocks_sharpness(
    blocks: dict[tuple[str, str], Tensor], shapes: dict[str, torch.Size]
) -> Tensor:
    """Max over diagonal blocks of their sharpness (leading dims kept)."""
    out = None
    for name, shape in shapes.items():
        h = blocks[(name, name)]
        lead = h.shape[: h.dim() - 2 * len(shape)]
        m = math.prod(shape)
        s = sharpness(h.reshape(*lead, m, m))
        out = s if out is None else torch.maximum(out, s)
    assert out is not None
    return out


def _use_dense(method: str, ps: list[nn.Parameter], dense_limit: int) -> bool:
    """Whether ``method`` forms the Hessian (``"auto"``: up to ``dense_limit`` parameters)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "auto":
        return sum(p.numel() for p in ps) <= dense_limit
    return method == "dense"


def _dense_sharpness(
    dict_fn: Callable[..., BlockDict],
    model: nn.Module,
    args: tuple[Any, ...],
    names: list[str],
    ps: list[nn.Parameter],
    diagonal_only: bool,
    **kwargs: Any,
) -> Tensor:
    """Sharpness of the Hessian whose blocks ``dict_fn(model, *args, ...)`` forms."""
    blocks = dict_fn(model, *args, params=names, diagonal_only=diagonal_only, **kwargs)
    if diagonal_only:
        return _blocks_sharpness(blocks, {n: p.shape for n, p in zip(names, ps, strict=True)})
    return sharpness(blocks_to_matrix(blocks, names, [p.shape for p in ps]))


def _sample_options(
    names: list[str],
    diagonal_only: bool,
    eval_mode: bool,
    tol: float | None,
    max_matvecs: int | None,
    seed: int | None,
) -> dict[str, Any]:
    """Keywords of the single-sample function for one sample's matrix-free sharpness."""
    return {
        "params": names,
        "diagonal_only": diagonal_only,
        "method": "lanczos",
        "eval_mode": eval_mode,
        "tol": tol,
        "max_matvecs": max_matvecs,
        "seed": seed,
    }


def _per_sample(one: Callable[..., Tensor], batch_args: tuple[Any, ...], what: str) -> Tensor:
    """``one(*(t[b] for t in batch_args))`` for every sample ``b``, stacked."""
    B = check_batch(batch_args, what)
    return torch.stack([one(*(t[b] for t in batch_args)) for b in range(B)])


def _names_filter(keep: frozenset[str]) -> ParamFilter:
    def f(name: str, p: nn.Parameter) -> bool:
        return name in keep

    return f


def _lanczos_sharpness(
    model: nn.Module,
    scalar_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    names: list[str],
    diagonal_only: bool,
    tol: float | None,
    max_matvecs: int | None,
    seed: int | None,
) -> float:
    """Largest |eigenvalue| of the Hessian of ``scalar_fn(model, batch)``, matrix-free.

    A run that misses ``tol`` warns with the library's ``ConvergenceWarning``.
    """
    from hessian_spectra.algorithms.lanczos import lanczos
    from hessian_spectra.operators.hessian import HessianOperator

    groups = [[n] for n in names] if diagonal_only else [names]
    best = 0.0
    for group in groups:
        keep = frozenset(group)
        op = HessianOperator(
            model,
            [batch],
            scalar_fn,
            param_filter=_names_filter(keep),
            batch_size_fn=lambda b: 1,
        )
        res = lanczos(op, 1, which="LM", tol=tol, max_matvecs=max_matvecs, seed=seed)
        best = max(best, abs(float(res.eigenvalues[0])))
    return best


def _dtype_device(ps: list[nn.Parameter]) -> dict[str, Any]:
    return {"dtype": ps[0].dtype, "device": ps[0].device}


def model_sharpness(
    model: nn.Module,
    inputs: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    method: SharpnessMethod = "auto",
    eval_mode: bool = True,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int | None = 0,
    dense_limit: int = DENSE_LIMIT,
) -> Tensor:
    """Sharpness of the model Hessian of each output entry: shape ``output.shape``.

    Args:
        model, inputs, params, eval_mode: as in
            :func:`~hessian_spectra.dense.model.model_hessian_matrix`.
        diagonal_only: sharpness of the block-diagonal part (max over
            parameters of each block's sharpness).
        method: ``"dense"``, ``"lanczos"`` (matrix-free, one run per output
            entry) or ``"auto"`` (dense up to ``dense_limit`` parameters).
        tol, max_matvecs, seed: passed to :func:`~hessian_spectra.algorithms.lanczos`
            (which warns with a ``ConvergenceWarning`` when ``tol`` is not met).
    """
    names, ps = resolve_parameters(model, params)
    if _use_dense(method, ps, dense_limit):
        args = (inputs,)
        return _dense_sharpness(
            model_hessian_dict, model, args, names, ps, diagonal_only, eval_mode=eval_mode
        )
    args = as_inputs(inputs)
    with analysed(model, eval_mode), torch.no_grad():
        shape = model(*args).shape
    values = []
    with analysed(model, eval_mode):
        for idx in range(math.prod(shape)):

            def entry(m: nn.Module, batch: Any, idx: int = idx) -> Tensor:
                return m(*batch).reshape(-1)[idx]

            values.append(
                _lanczos_sharpness(model, entry, args, names, diagonal_only, tol, max_matvecs, seed)
            )
    return torch.tensor(values, **_dtype_device(ps)).reshape(shape)


def batch_model_sharpness(
    model: nn.Module,
    batch_inputs: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    method: SharpnessMethod = "auto",
    eval_mode: bool = True,
    vectorize: bool = True,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int | None = 0,
    dense_limit: int = DENSE_LIMIT,
) -> Tensor:
    """Per-sample model sharpness: shape ``(B,) + S`` (``S``: one sample's output shape).

    Sample ``b`` is ``model(*(t[b] for t in batch_inputs))``; other arguments
    as in :func:`model_sharpness`.
    """
    names, ps = resolve_parameters(model, params)
    if _use_dense(method, ps, dense_limit):
        args, kwargs = (batch_inputs,), {"eval_mode": eval_mode, "vectorize": vectorize}
        return _dense_sharpness(
            batch_model_hessian_dict, model, args, names, ps, diagonal_only, **kwargs
        )
    lanczos = _sample_options(names, diagonal_only, eval_mode, tol, max_matvecs, seed)
    return _per_sample(
        lambda *sample: model_sharpness(model, sample, **lanczos),
        as_inputs(batch_inputs),
        "batch_model_sharpness",
    )


def loss_sharpness(
    model: nn.Module,
    criterion: Criterion,
    inputs: Any,
    target: Any,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    method: SharpnessMethod = "auto",
    eval_mode: bool = True,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int | None = 0,
    dense_limit: int = DENSE_LIMIT,
) -> Tensor:
    """Sharpness of the Hessian of ``criterion(model(*inputs), target)``: a 0-d tensor.

    Arguments as in :func:`~hessian_spectra.dense.loss.loss_hessian_matrix` and
    :func:`model_sharpness`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> s = loss_sharpness(model, torch.nn.MSELoss(), x, y)
        >>> s.shape
        torch.Size([])
    """
    names, ps = resolve_parameters(model, params)
    if _use_dense(method, ps, dense_limit):
        args = (criterion, inputs, target)
        return _dense_sharpness(
            loss_hessian_dict, model, args, names, ps, diagonal_only, eval_mode=eval_mode
        )
    args = as_inputs(inputs)

    def loss(m: nn.Module, batch: Any) -> Tensor:
        return criterion(m(*batch[0]), batch[1])

    with analysed(model, eval_mode):
        value = _lanczos_sharpness(
            model, loss, (args, target), names, diagonal_only, tol, max_matvecs, seed
        )
    return torch.tensor(value, **_dtype_device(ps))


def batch_loss_sharpness(
    model: nn.Module,
    criterion: Criterion,
    batch_inputs: Any,
    batch_target: Tensor,
    *,
    params: ParamSpec = None,
    diagonal_only: bool = False,
    method: SharpnessMethod = "auto",
    eval_mode: bool = True,
    vectorize: bool = True,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int | None = 0,
    dense_limit: int = DENSE_LIMIT,
) -> Tensor:
    """Per-sample loss sharpness, shape ``(B,)``; sample ``b`` is
    ``criterion(model(*(t[b] for t in batch_inputs)), batch_target[b])``."""
    names, ps = resolve_parameters(model, params)
    if _use_dense(method, ps, dense_limit):
        args = (criterion, batch_inputs, batch_target)
        kwargs = {"eval_mode": eval_mode, "vectorize": vectorize}
        return _dense_sharpness(
            batch_loss_hessian_dict, model, args, names, ps, diagonal_only, **kwargs
        )
    lanczos = _sample_options(names, diagonal_only, eval_mode, tol, max_matvecs, seed)
    return _per_sample(
        lambda *sample: loss_sharpness(model, criterion, sample[:-1], sample[-1], **lanczos),
        (*as_inputs(batch_inputs), batch_target),
        "batch_loss_sharpness",
    )
