"""Hessian-vector products of one (micro)batch loss.

Two ways to get ``H_b v`` for the Hessian ``H_b`` of one batch loss ``L_b``:

* **Reverse over reverse** (:func:`block_hvp`): one forward and one backward with
  ``create_graph=True`` give ``g = dL_b/dθ`` as a differentiable graph; the
  products are then the vector-Jacobian products ``d(g·v)/dθ = H_b v``
  (Pearlmutter, 1994), all ``k`` rows of a block at once through
  ``torch.autograd.grad(..., is_grads_batched=True)`` (a vmap over the second
  backward), or row by row, by the rule of
  :mod:`~hessian_spectra.operators._mechanism` (row by row by default, and when
  vmap cannot run some operation).
* **Central differences** (:func:`gradient`, used by the operator):
  ``H v ≈ (g(θ + εv) − g(θ − εv)) / 2ε`` with an ``O(ε²)`` truncation error.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hessian_spectra.operators._mechanism import run_block
from hessian_spectra.operators._user_calls import call_user

__all__ = [
    "FD_EPS",
    "VmapFallbackWarning",
    "block_hvp",
    "check_fd_eps",
    "checked_loss",
    "default_fd_eps",
    "gradient",
]

FD_EPS: dict[torch.dtype, float] = {
    torch.float64: 6e-6,
    torch.float32: 5e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 0.2,
}
"""Default central-difference steps ``||εv||`` per dtype: about ``eps_mach^(1/3)``,
which balances the ``O(ε²)`` truncation error against the ``O(eps_mach / ε)``
rounding error of the difference (Nocedal & Wright, *Numerical Optimization*,
2nd ed., §8.1); the same table as hessian-eigenthings."""


class VmapFallbackWarning(UserWarning):
    """A block of Hessian-vector products fell back from one vmapped backward to a loop."""


def default_fd_eps(dtype: torch.dtype) -> float:
    """The default finite-difference step for ``dtype`` (:data:`FD_EPS`, else ``eps^(1/3)``)."""
    if dtype in FD_EPS:
        return FD_EPS[dtype]
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def check_fd_eps(fd_eps: float | None) -> None:
    """``ValueError`` unless ``fd_eps`` is ``None`` or a positive finite step length."""
    if fd_eps is not None and (
        isinstance(fd_eps, bool)
        or not isinstance(fd_eps, numbers.Real)
        or not math.isfinite(fd_eps)
        or fd_eps <= 0
    ):
        raise ValueError(
            f"fd_eps must be a positive finite step length, got {fd_eps!r}; leave it None for "
            "the dtype's default (about eps^(1/3): 6e-6 in float64, 5e-3 in float32)"
        )


def checked_loss(
    loss_fn: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any, index: Any
) -> Tensor:
    """``loss_fn(model, batch)`` as a 0-dim tensor that depends on the parameters.

    Raises:
        TypeError: the loss is not a floating-point tensor.
        ValueError: the loss is not a scalar, or it has no autograd graph.
    """
    loss = call_user(loss_fn, "loss_fn", model, batch)
    if not isinstance(loss, Tensor):
        raise TypeError(
            "loss_fn must return a scalar torch.Tensor (the batch's mean loss), got "
            f"{type(loss).__name__} "
            f"for batch {index}; return e.g. F.cross_entropy(model(x), y), not loss.item()"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (the batch's mean-reduced loss), got a tensor of shape "
            f"{tuple(loss.shape)} for batch {index}; reduce it with .mean() (samples are weighted "
            "across "
            "batches by batch_size_fn, not by the loss)"
        )
    if not loss.is_floating_point():
        raise TypeError(
            f"loss_fn must return a floating-point tensor, got dtype {loss.dtype} for batch {index}"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"the loss of batch {index} has no autograd graph (requires_grad=False): loss_fn must "
            "not detach it, go through .item()/NumPy, or run under torch.no_grad(); and "
            "param_filter must select "
            "parameters that the loss uses"
        )
    return loss.reshape(())


def gradient(
    loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False
) -> tuple[Tensor | None, ...]:
    """``dloss/dθ`` per parameter; ``None`` for a parameter the loss does not use."""
    return torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)


def block_hvp(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    mechanism: str,
    release: bool = False,
) -> tuple[list[Tensor | None], str]:
    """Rows ``H v_r`` from a differentiable gradient, all rows sharing its graph.

    Args:
        grads: ``dL/dθ`` per parameter, from ``gradient(loss, params, create_graph=True)``.
        params: the parameters ``θ``.
        vectors: per parameter, a ``(k, *shape)`` block of the vectors' pieces.
        mechanism: ``"vmap"`` (one vmapped second backward for the block),
            ``"loop"`` (one second backward per row) or ``"auto"`` (vmapped for
            two or more rows:
            :func:`~hessian_spectra.operators._mechanism.run_block`). A model
            that vmap cannot batch loops, with a :class:`VmapFallbackWarning`.
        release: nothing needs the graph after these rows: a single pass over the
            last row frees each saved tensor as soon as the backward has used it
            (as a training step's backward does), so the product's peak memory is
            not the whole graph plus the second backward's intermediates.

    Returns:
        Per parameter a ``(k, *shape)`` block of ``H v`` (``None`` where the
        gradient does not depend on the parameters: a zero block) and the
        mechanism to use from now on. The graph is retained (callers may run
        more rows) unless ``release``.
    """
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # the loss is at most linear in the parameters: H = 0
        return [None] * len(params), mechanism
    outs = [grads[i] for i in live]
    gos = [vectors[i] for i in live]
    k = gos[0].shape[0]

    def batched() -> list[Tensor | None]:
        return list(
            torch.autograd.grad(
                outs,  # type: ignore[arg-type]
                list(params),
                gos,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        )

    def single(r: int) -> tuple[Tensor | None, ...]:
        return torch.autograd.grad(
            outs,  # type: ignore[arg-type]
            list(params),
            [g[r] for g in gos],
            retain_graph=not (release and r == k - 1),
            allow_unused=True,
        )

    def combine(rows: list[tuple[Tensor | None, ...]]) -> list[Tensor | None]:
        return [
            None if rows[0][j] is None else torch.stack([row[j] for row in rows])  # type: ignore[misc]
            for j in range(len(params))
        ]

    def warn(err: BaseException) -> None:
        warnings.warn(
            "the batched (vmap) Hessian-vector product failed for this model "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); this operator now "
            "loops over "
            "the vectors of a block (same numbers, one second backward per vector)",
            VmapFallbackWarning,
            stacklevel=7,  # warn < run_block < block_hvp < _autograd < _matmat < _counted < matmat
        )

    return run_block(mechanism, k, batched, single, combine, warn)
