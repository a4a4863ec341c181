"""Hessian-vector products of one (micro)batch loss.

Two ways to get ``H_b v`` for the Hessian ``H_b`` of one batch loss ``L_b``:

* **Reverse over reverse** (:func:`block_hvp`): one forward and one backward with
  ``create_graph=True`` give ``g = dL_b/dθ`` as a differentiable graph; the
  products are then the vector-Jacobian products ``d(g·v)/dθ = H_b v``
  (Pearlmutter, 1994), all ``k`` rows of a block at once through
  ``torch.autograd.grad(..., is_grads_batched=True)`` (a vmap over the second
  backward), or row by row: whichever is measured faster on the model, and row
  by row when vmap cannot run some operation.
* **Central differences** (:func:`gradient`, used by the operator):
  ``H v ≈ (g(θ + εv) − g(θ − εv)) / 2ε`` with an ``O(ε²)`` truncation error.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

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


MEASURE_ROUNDS = 2
"""Rounds of the vmap-or-loop measurement (each times both; the best of each counts)."""


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
    loss = loss_fn(model, batch)
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


def _loop(outs: list[Tensor], params: Sequence[Tensor], gos: list[Tensor]) -> list[Tensor | None]:
    rows = [
        torch.autograd.grad(
            outs, list(params), [g[r] for g in gos], retain_graph=True, allow_unused=True
        )
        for r in range(gos[0].shape[0])
    ]
    return [
        None if rows[0][j] is None else torch.stack([row[j] for row in rows])
        for j in range(len(params))
    ]


def _sync(t: Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _vmapped(
    outs: list[Tensor], params: Sequence[Tensor], gos: list[Tensor]
) -> list[Tensor | None]:
    return list(
        torch.autograd.grad(
            outs, list(params), gos, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    )


def block_hvp(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    mechanism: str,
) -> tuple[list[Tensor | None], str, dict[str, float] | None]:
    """Rows ``H v_r`` from a differentiable gradient, all rows sharing its graph.

    Args:
        grads: ``dL/dθ`` per parameter, from ``gradient(loss, params, create_graph=True)``.
        params: the parameters ``θ``.
        vectors: per parameter, a ``(k, *shape)`` block of the vectors' pieces.
        mechanism: ``"vmap"`` (one vmapped second backward for the block),
            ``"loop"`` (one second backward per row) or ``"auto"`` (not chosen
            yet: on a block of two or more rows, time the vmapped backward of
            the block (after one run that warms it up) against the loop on two
            of its rows, scaled to the block, best of :data:`MEASURE_ROUNDS`
            interleaved rounds each, and
            choose the faster; on CPU a vmap over convolutions can be slower).
            The rows returned come from the mechanism chosen, so every product
            of an operator gives the same bits for the same vector.

    Returns:
        Per parameter a ``(k, *shape)`` block of ``H v`` (``None`` where the
        gradient does not depend on the parameters: a zero block), the mechanism
        to use from now on, and the timings in seconds when this call measured
        them (``{"vmap": per block, "loop": per block}``), else ``None``. The
        graph is retained (callers may run more rows).
    """
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # the loss is at most linear in the parameters: H = 0
        return [None] * len(params), mechanism, None
    outs = [grads[i] for i in live]
    gos = [vectors[i] for i in live]
    k = gos[0].shape[0]
    if k == 1 or mechanism == "loop":
        return _loop(outs, params, gos), mechanism, None  # type: ignore[arg-type]
    try:
        if mechanism == "vmap":
            return _vmapped(outs, params, gos), mechanism, None  # type: ignore[arg-type]
        res = _vmapped(outs, params, gos)  # type: ignore[arg-type]  # warms vmap up: not timed
    except (RuntimeError, NotImplementedError) as err:
        out = _loop(outs, params, gos)  # type: ignore[arg-type]  # raises the real error if any
        warnings.warn(
            "the batched (vmap) Hessian-vector product failed for this model "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); this operator now "
            "loops over "
            "the vectors of a block (same numbers, one second backward per vector)",
            VmapFallbackWarning,
            stacklevel=6,  # block_hvp < _autograd < _matmat < _counted < matmat < caller
        )
        return out, "loop", None
    t_vmap = t_loop = math.inf
    head: list[Tensor | None] = []
    for _ in range(MEASURE_ROUNDS):  # interleaved, best of each: a burst of load hits both
        _sync(gos[0])
        t0 = time.perf_counter()
        _vmapped(outs, params, gos)  # type: ignore[arg-type]
        _sync(gos[0])
        t_vmap = min(t_vmap, time.perf_counter() - t0)
        t0 = time.perf_counter()
        head = _loop(outs, params, [g[:2] for g in gos])  # type: ignore[arg-type]
        _sync(gos[0])
        t_loop = min(t_loop, (time.perf_counter() - t0) * k / 2)
    timings = {"vmap": t_vmap, "loop": t_loop}
    if t_vmap <= t_loop:
        return res, "vmap", timings
    # the loop is kept: return its numbers already (later blocks give the same bits)
    if k > 2:
        tail = _loop(outs, params, [g[2:] for g in gos])  # type: ignore[arg-type]
        head = [None if h is None else torch.cat([h, t]) for h, t in zip(head, tail, strict=True)]  # type: ignore[list-item]
    return head, "loop", timings
