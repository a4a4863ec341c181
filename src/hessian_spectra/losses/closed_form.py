r"""Closed-form Hessians of standard losses with respect to the model output.

Each ``*_hvp`` returns :math:`H_{\text{loss}} U`, the Hessian of the reduced
loss with respect to the output applied to ``U``; ``U`` has the output's shape
or carries extra leading dimensions (a block of ``k`` vectors is
``(k, *output.shape)``). Half-precision outputs are computed in float32 and
returned in ``U``'s dtype.

With :math:`p = \operatorname{softmax}(z)` over the class dimension, the
cross-entropy Hessian of one position is :math:`c_i(\operatorname{diag}(p) - pp^\top)`
(the Hessian of ``logsumexp``: the target enters linearly), so

.. math::

    (H u)_i = \frac{c_i}{D}\, p_i \odot (u_i - \langle p_i, u_i \rangle),

with :math:`c_i` the position's weight (class weight of its target, label
smoothing mixing in the mean class weight, 0 for ``ignore_index``) and
:math:`D` the reduction's denominator. Binary cross-entropy with logits has the
diagonal Hessian :math:`w\,((p_w - 1) y + 1)\,\sigma(z)(1 - \sigma(z))/D`; mean
squared error :math:`2/D`; NLL on log-probabilities is linear in its input, so
its Hessian is zero.

The ``*_mc_fisher_hvp`` functions apply the Monte-Carlo Fisher of the same
losses: targets are sampled from the predictive distribution the output defines
(categorical, Bernoulli, Gaussian with variance 1/2 for squared error) and
:math:`\frac{1}{S}\sum_s r_s r_s^\top`, with :math:`r_s` the per-position
gradient of the sampled negative log-likelihood, replaces the per-position
Hessian. Its expectation is the Hessian above (Martens, 2020, "New insights and
perspectives on the natural gradient method", sec. 9), so the Monte-Carlo
Fisher is an unbiased estimate of the GGN.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "bce_with_logits_hvp",
    "bce_with_logits_mc_fisher_hvp",
    "cross_entropy_hvp",
    "cross_entropy_mc_fisher_hvp",
    "mse_hvp",
    "mse_mc_fisher_hvp",
]

_REDUCTIONS = ("mean", "sum")
Reduction = Literal["mean", "sum"]


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            "closed-form loss Hessians need reduction='mean' or 'sum' (a scalar loss), got "
            f"{reduction!r}"
        )


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _class_dim(output: Tensor) -> int:
    """The class dimension of a cross-entropy input, from the end (dim 1, or 0 unbatched)."""
    return -(output.dim() - 1) if output.dim() >= 2 else -1


def _ce_position_scale(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """``c_i / D`` for every position (the output's shape without the class dimension)."""
    _check_reduction(reduction)
    dt = _compute_dtype(logits)
    cdim = _class_dim(logits)
    C = logits.shape[cdim]
    w = None if weight is None else weight.to(device=logits.device, dtype=dt)
    if target.is_floating_point():  # class probabilities, same shape as the logits
        t = target.to(dt)
        if label_smoothing:
            t = (1 - label_smoothing) * t + label_smoothing / C
        tw = t if w is None else t * w.reshape(-1, *([1] * (-cdim - 1)))
        c = tw.sum(cdim)
        denom = c.new_tensor(float(c.numel())) if reduction == "mean" else c.new_tensor(1.0)
        return c / denom
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    wy = torch.ones(target.shape, dtype=dt, device=logits.device) if w is None else w[safe]
    wy = wy * valid
    c = (1 - label_smoothing) * wy + label_smoothing * (1.0 if w is None else w.mean()) * valid
    if reduction == "sum":
        return c
    denom = wy.sum()
    return torch.where(denom > 0, c / denom.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(c))


def _softmax_hvp(logits: Tensor, scale: Tensor, U: Tensor) -> Tensor:
    dt = _compute_dtype(logits)
    cdim = _class_dim(logits)
    p = torch.softmax(logits.to(dt), dim=cdim)
    u = U.to(dt)
    pu = (p * u).sum(cdim, keepdim=True)
    out = p * (u - pu) * scale.unsqueeze(cdim)
    return out.to(U.dtype)


def cross_entropy_hvp(
    logits: Tensor,
    target: Tensor,
    U: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``H U`` for :func:`torch.nn.functional.cross_entropy` with the same arguments.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` (class dimension 1).
        target: class indices (``ignore_index`` masked) or class probabilities.
        U: the logits' shape, or with leading block dimensions.
    """
    scale = _ce_position_scale(
        logits,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return _softmax_hvp(logits, scale, U)


def cross_entropy_mc_fisher_hvp(
    logits: Tensor,
    target: Tensor,
    U: Tensor,
    *,
    generator: torch.Generator,
    mc_samples: int = 1,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Monte-Carlo Fisher of cross-entropy on ``U``: classes drawn from ``softmax(logits)``.

    With :math:`r_s = p - e_{\\hat y_s}`, position ``i`` contributes
    :math:`\\frac{c_i}{D S}\\sum_s r_s (\\langle p, u\\rangle - u_{\\hat y_s})`,
    computed with a gather and a scatter-add (no ``(S, N, C)`` tensor).
    """
    scale = _ce_position_scale(
        logits,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    dt = _compute_dtype(logits)
    cdim = _class_dim(logits)
    p = torch.softmax(logits.to(dt), dim=cdim).movedim(cdim, -1)  # (..., C)
    C = p.shape[-1]
    flat_p = p.reshape(-1, C)
    y = torch.multinomial(flat_p, mc_samples, replacement=True, generator=generator)  # (P, S)
    y = y.reshape(*p.shape[:-1], mc_samples)
    u = U.to(dt).movedim(cdim, -1)  # (k..., ..., C)
    lead = u.shape[: u.dim() - p.dim()]
    yk = y.expand(*lead, *y.shape)
    a = (p * u).sum(-1, keepdim=True) - torch.gather(u, -1, yk)  # (k..., ..., S)
    out = p * a.sum(-1, keepdim=True)
    out = out.scatter_add(-1, yk, -a)
    out = out * (scale / mc_samples).unsqueeze(-1)
    return out.movedim(-1, cdim).to(U.dtype)


def _bce_scale(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
) -> Tensor:
    _check_reduction(reduction)
    dt = _compute_dtype(logits)
    t = target.to(dt)
    c = torch.ones_like(logits, dtype=dt)
    if pos_weight is not None:
        c = c * ((pos_weight.to(device=logits.device, dtype=dt) - 1) * t + 1)
    if weight is not None:
        c = c * weight.to(device=logits.device, dtype=dt)
    c = c.expand(torch.broadcast_shapes(c.shape, logits.shape))
    if reduction == "mean":
        c = c / c.numel()
    return c


def bce_with_logits_hvp(
    logits: Tensor,
    target: Tensor,
    U: Tensor,
    *,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """``H U`` for :func:`torch.nn.functional.binary_cross_entropy_with_logits` (diagonal)."""
    c = _bce_scale(logits, target, weight=weight, pos_weight=pos_weight, reduction=reduction)
    s = torch.sigmoid(logits.to(c.dtype))
    return (c * s * (1 - s) * U.to(c.dtype)).to(U.dtype)


def bce_with_logits_mc_fisher_hvp(
    logits: Tensor,
    target: Tensor,
    U: Tensor,
    *,
    generator: torch.Generator,
    mc_samples: int = 1,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Monte-Carlo Fisher of BCE with logits: labels drawn from ``Bernoulli(sigmoid(logits))``."""
    c = _bce_scale(logits, target, weight=weight, pos_weight=pos_weight, reduction=reduction)
    s = torch.sigmoid(logits.to(c.dtype))
    draws = torch.rand((mc_samples, *s.shape), generator=generator, device=s.device, dtype=s.dtype)
    r2 = ((s - (draws < s).to(s.dtype)) ** 2).mean(0)
    return (c * r2 * U.to(c.dtype)).to(U.dtype)


def _mse_factor(output: Tensor, target: Tensor, reduction: str) -> float:
    _check_reduction(reduction)
    full = torch.broadcast_shapes(output.shape, target.shape).numel()
    mult = full / max(output.numel(), 1)
    return 2.0 * mult / full if reduction == "mean" else 2.0 * mult


def mse_hvp(output: Tensor, target: Tensor, U: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """``H U`` for :func:`torch.nn.functional.mse_loss`: ``2 U / numel`` (mean) or ``2 U`` (sum)."""
    return U * _mse_factor(output, target, reduction)


def mse_mc_fisher_hvp(
    output: Tensor,
    target: Tensor,
    U: Tensor,
    *,
    generator: torch.Generator,
    mc_samples: int = 1,
    reduction: Reduction = "mean",
) -> Tensor:
    """Monte-Carlo Fisher of squared error: targets from ``N(output, 1/2)`` (its likelihood)."""
    f = _mse_factor(output, target, reduction)
    dt = _compute_dtype(output)
    eps = torch.randn(
        (mc_samples, *output.shape), generator=generator, device=output.device, dtype=dt
    )
    return (f * (eps**2).mean(0) * U.to(dt)).to(U.dtype)
