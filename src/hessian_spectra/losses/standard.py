"""Loss helpers for supervised ``(x, y)`` batches.

Operators take one of three kinds of function:

* ``loss_fn(model, batch) -> scalar`` (Hessian, empirical Fisher):
  :func:`supervised_loss`;
* ``forward_fn(model, batch) -> output`` and ``loss_of_output_fn(output, batch)
  -> scalar`` (GGN, Monte-Carlo Fisher): :func:`supervised_forward` and
  :func:`supervised_loss_of_output`, which carries the closed-form
  ``.hvp(output, batch, U)`` of a known criterion;
* ``per_sample_loss_fn(model, batch) -> (B,)`` (empirical Fisher):
  :func:`supervised_per_sample_loss`.

A criterion is a functional (``F.cross_entropy``, ``F.mse_loss``,
``F.binary_cross_entropy_with_logits``, ``F.nll_loss``, or a
:func:`functools.partial` of one with keyword arguments) or the matching module
(``nn.CrossEntropyLoss(ignore_index=0)``, ...), reductions ``"mean"`` and
``"sum"``. Any other callable ``(output, target) -> scalar`` works too; it has
no ``.hvp`` and the GGN then differentiates it twice with autograd.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessian_spectra.losses import closed_form as cf

__all__ = [
    "LossCurvatureWarning",
    "LossOfOutput",
    "cross_entropy_loss_of_output",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
]

Criterion = Callable[..., Tensor]
HvpFn = Callable[[Tensor, Any, Tensor], Tensor]


class LossCurvatureWarning(UserWarning):
    """A loss whose curvature with respect to the output is not what one usually wants."""


class LossOfOutput:
    """A ``loss_of_output_fn(output, batch) -> scalar`` that may carry its output-space curvature.

    Args:
        fn: ``(output, batch) -> scalar`` loss.
        hvp: ``(output, batch, U) -> H_loss U`` for a block ``U`` of shape
            ``(k, *output.shape)``; the GGN operator uses it instead of autograd.
        mc_fisher_hvp: ``(output, batch, U, *, generator, mc_samples)``: the
            Monte-Carlo Fisher in output space (see
            :class:`~hessian_spectra.operators.fisher.MCFisherOperator`).
        hvp_inplace: ``(output, batch, U) -> U`` with ``H_loss U`` written into
            ``U`` (same block shape as for ``hvp``). The GGN operator uses it,
            when given, on its own ``J V`` buffer, which saves one output-sized
            buffer per product (one ``(tokens, vocab)`` tensor for a language
            model). Needs ``hvp``.
        name: shown in ``repr`` and messages.

    Example:
        >>> loss = LossOfOutput(lambda out, b: (out ** 2).sum(), hvp=lambda out, b, U: 2 * U)
        >>> loss.hvp(torch.zeros(3), None, torch.ones(1, 3))
        tensor([[2., 2., 2.]])
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Any], Tensor],
        hvp: HvpFn | None = None,
        *,
        mc_fisher_hvp: Callable[..., Tensor] | None = None,
        hvp_inplace: HvpFn | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (output, batch) -> loss, got {type(fn).__name__}")
        if hvp is not None and not callable(hvp):
            raise TypeError(
                f"hvp must be callable (output, batch, U) -> H U, got {type(hvp).__name__}"
            )
        if hvp_inplace is not None and (hvp is None or not callable(hvp_inplace)):
            raise TypeError(
                "hvp_inplace must be callable (output, batch, U) -> U and comes with hvp"
            )
        self.fn = fn
        if hvp is not None:
            self.hvp = _one_or_block(hvp)
        if hvp_inplace is not None:
            self.hvp_inplace = hvp_inplace
        if mc_fisher_hvp is not None:
            self.mc_fisher_hvp = mc_fisher_hvp
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, output: Tensor, batch: Any) -> Tensor:
        return self.fn(output, batch)

    def __repr__(self) -> str:
        extras = [s for s in ("hvp", "mc_fisher_hvp") if hasattr(self, s)]
        return f"LossOfOutput({self.name}{', with ' + ', '.join(extras) if extras else ''})"


def _one_or_block(hvp: HvpFn) -> HvpFn:
    """``hvp`` for a block ``U`` of shape ``(k, *output.shape)``, also taking one direction
    ``u`` shaped like the output (hessian-eigenthings' form), whose product comes back
    in its shape."""

    @functools.wraps(hvp)
    def one_or_block(output: Tensor, batch: Any, U: Tensor) -> Tensor:
        if isinstance(U, Tensor) and isinstance(output, Tensor) and U.shape == output.shape:
            return hvp(output, batch, U.unsqueeze(0)).squeeze(0)
        return hvp(output, batch, U)

    return one_or_block


def _upcast(t: Tensor) -> Tensor:
    """fp16/bf16 to float32 (losses are computed in at least float32), other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# -- criteria ---------------------------------------------------------------------

_FUNCTIONALS: dict[Any, str] = {
    F.cross_entropy: "cross_entropy",
    F.mse_loss: "mse",
    F.binary_cross_entropy_with_logits: "bce_with_logits",
    F.nll_loss: "nll",
}
_MODULES: dict[type, str] = {
    nn.CrossEntropyLoss: "cross_entropy",
    nn.MSELoss: "mse",
    nn.BCEWithLogitsLoss: "bce_with_logits",
    nn.NLLLoss: "nll",
}
_ARGS = {
    "cross_entropy": ("weight", "ignore_index", "reduction", "label_smoothing"),
    "mse": ("reduction",),
    "bce_with_logits": ("weight", "pos_weight", "reduction"),
    "nll": ("weight", "ignore_index", "reduction"),
}


def _known_criterion(criterion: Any) -> tuple[str, dict[str, Any]] | None:
    """``(kind, keyword arguments)`` for a recognised criterion, else ``None``."""
    if isinstance(criterion, functools.partial) and not criterion.args:
        kind = _FUNCTIONALS.get(criterion.func)
        if kind is None or set(criterion.keywords) - set(_ARGS[kind]):
            return None
        return kind, dict(criterion.keywords)
    kind = _FUNCTIONALS.get(criterion)
    if kind is not None:
        return kind, {}
    kind = _MODULES.get(type(criterion))  # exact type: a subclass may change forward()
    if kind is None:
        return None
    kw = {a: getattr(criterion, a) for a in _ARGS[kind] if hasattr(criterion, a)}
    return kind, kw


def _check_criterion(criterion: Any) -> None:
    if not callable(criterion):
        raise TypeError(
            "criterion must be a loss callable (output, target) -> scalar such as "
            "F.cross_entropy or "
            f"nn.MSELoss(), got {type(criterion).__name__}"
        )


def _xy(batch: Any) -> tuple[Any, Tensor]:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        keys = list(batch)[:8]
        x, y = (repr(k) for k in [*keys, "x", "y"][:2])
        raise TypeError(
            f"supervised helpers expect (inputs, targets) batches, got a {type(batch).__name__} "
            f"with keys {keys}; for dict batches write the function by key, e.g. "
            f"loss_fn=lambda model, batch: criterion(model(batch[{x}]), batch[{y}]), or give "
            "the operator (inputs, targets) tuples"
        )
    raise TypeError(
        f"supervised helpers expect (inputs, targets) batches, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        + "; write loss_fn=lambda model, batch: ... for other batch layouts"
    )


def _not_a_tensor(out: Any) -> TypeError:
    """Our error for a model output that the criterion could not take (a dict, a tuple)."""
    if isinstance(out, Mapping):
        keys = list(out)[:8]
        key = repr("logits" if "logits" in out else (keys[0] if keys else "logits"))
        what, pick = f"a {type(out).__name__} with keys {keys}", f"[{key}]"
    else:
        what, pick = f"a {type(out).__name__}", "[0]"
    return TypeError(
        f"the model returned {what} where the criterion expects a tensor of outputs; pick the "
        f"tensor yourself: loss_fn=lambda model, batch: criterion(model(batch[0]){pick}, "
        f"batch[1]) (and forward_fn=lambda model, batch: model(batch[0]){pick} for the GGN)"
    )


def _criterion_on(criterion: Criterion, out: Any, y: Any, known: bool) -> Tensor:
    """``criterion(out, y)``; a model output that is not a tensor gets our message (at
    once for a known criterion, which needs a tensor; else when the criterion fails)."""
    if isinstance(out, Tensor):
        return criterion(out, y)
    if known:
        raise _not_a_tensor(out)
    try:
        return criterion(out, y)
    except (TypeError, AttributeError, KeyError, IndexError) as err:
        raise _not_a_tensor(out) from err


def _scalar(loss: Tensor, what: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{what} must return a scalar loss, got {shape}; use reduction='mean' or 'sum' "
            "(supervised_per_sample_loss gives per-sample losses)"
        )
    return loss


def supervised_forward(model: nn.Module | None = None, batch: Any = None) -> Any:
    """The ``forward_fn`` of a supervised ``(x, y)`` batch: ``model(x)``.

    Pass it itself as ``forward_fn=supervised_forward`` (hessian-eigenthings' form).
    Called with no arguments it returns itself, so ``forward_fn=supervised_forward()``
    (this library's earlier form) works too.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> supervised_forward(model, (torch.zeros(4, 2), torch.zeros(4, 1))).shape
        torch.Size([4, 1])
    """
    if model is None and batch is None:
        return supervised_forward
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"supervised_forward(model, batch) takes an nn.Module first, got {type(model).__name__}"
        )
    x, _ = _xy(batch)
    return model(x)


def supervised_loss(criterion: Criterion) -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn(model, (x, y)) = criterion(model(x), y)``, a scalar.

    Example:
        >>> loss_fn = supervised_loss(torch.nn.functional.mse_loss)
        >>> model = torch.nn.Linear(2, 1)
        >>> float(loss_fn(model, (torch.zeros(4, 2), model.bias.detach().expand(4, 1)))) == 0.0
        True
    """
    _check_criterion(criterion)
    known = _known_criterion(criterion) is not None

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        x, y = _xy(batch)
        return _scalar(_criterion_on(criterion, model(x), y, known), "the criterion")

    return loss_fn


def _hvp_for(kind: str, kw: dict[str, Any]) -> tuple[HvpFn, Callable[..., Tensor] | None]:
    if kind == "cross_entropy":
        return (
            lambda out, b, U: cf.cross_entropy_hvp(out, _xy(b)[1], U, **kw),
            lambda out, b, U, **mc: cf.cross_entropy_mc_fisher_hvp(out, _xy(b)[1], U, **mc, **kw),
        )
    if kind == "mse":
        return (
            lambda out, b, U: cf.mse_hvp(out, _xy(b)[1], U, **kw),
            lambda out, b, U, **mc: cf.mse_mc_fisher_hvp(out, _xy(b)[1], U, **mc, **kw),
        )
    if kind == "bce_with_logits":
        return (
            lambda out, b, U: cf.bce_with_logits_hvp(out, _xy(b)[1], U, **kw),
            lambda out, b, U, **mc: cf.bce_with_logits_mc_fisher_hvp(out, _xy(b)[1], U, **mc, **kw),
        )
    # nll_loss is linear in the log-probabilities: zero Hessian, zero Fisher at this split
    return (lambda out, b, U: torch.zeros_like(U), lambda out, b, U, **mc: torch.zeros_like(U))


def supervised_loss_of_output(criterion: Criterion) -> LossOfOutput:
    """``loss_of_output_fn(output, (x, y)) = criterion(output, y)`` with its closed-form ``.hvp``.

    Known criteria (cross-entropy with ``weight``/``ignore_index``/``label_smoothing``,
    MSE, BCE with logits, NLL; reductions ``"mean"``/``"sum"``) carry ``.hvp``
    and ``.mc_fisher_hvp``; other callables carry neither.

    ``nll_loss`` is linear in its input: its Hessian with respect to
    log-probabilities is zero, so the GGN at that split is zero (a
    :class:`LossCurvatureWarning` says so). End ``forward_fn`` at the logits and
    use ``cross_entropy`` for the usual GGN/Fisher of a classifier.
    """
    _check_criterion(criterion)
    known = _known_criterion(criterion)
    name = getattr(criterion, "__name__", type(criterion).__name__)

    def fn(output: Tensor, batch: Any) -> Tensor:
        return _scalar(criterion(output, _xy(batch)[1]), "the criterion")

    if known is None:
        return LossOfOutput(fn, name=name)
    kind, kw = known
    if kw.get("reduction", "mean") not in ("mean", "sum"):
        raise ValueError(
            f"supervised_loss_of_output needs a scalar loss: reduction must be 'mean' or 'sum', "
            f"got {kw['reduction']!r}"
        )
    if kind == "nll":
        warnings.warn(
            "nll_loss is linear in the log-probabilities, so its Hessian with respect to the "
            "model output "
            "is zero and the GGN/Fisher at this split is zero; end forward_fn at the logits "
            "and use "
            "F.cross_entropy for the usual GGN of a classifier",
            LossCurvatureWarning,
            stacklevel=2,
        )
    hvp, mc = _hvp_for(kind, kw)
    return LossOfOutput(fn, hvp, mc_fisher_hvp=mc, name=kind)


def cross_entropy_loss_of_output() -> LossOfOutput:
    """``loss_of_output_fn`` for mean cross-entropy on ``(x, y)`` batches, with its
    closed-form ``.hvp`` (``(diag(p) - p p^T) / N`` per row of logits).

    Example:
        >>> loss = cross_entropy_loss_of_output()
        >>> out, y = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> Hu = loss.hvp(out, (None, y), torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
        >>> [round(x, 4) for x in Hu[0].tolist()]  # (p - p <p, u>) / N with p = 1/3
        [0.1111, -0.0556, -0.0556]
    """
    return supervised_loss_of_output(F.cross_entropy)


def mse_loss_of_output() -> LossOfOutput:
    """``loss_of_output_fn`` for mean squared error on ``(x, y)`` batches, with its
    closed-form ``.hvp`` (``2 u / output.numel()``)."""
    return supervised_loss_of_output(F.mse_loss)


def supervised_per_sample_loss(criterion: Criterion) -> Callable[[nn.Module, Any], Tensor]:
    """``(model, (x, y)) -> (B,)`` losses of each sample (mean over its other elements).

    A known criterion is called with ``reduction="none"`` and each sample's
    values are averaged over its other elements (for cross-entropy with
    ``ignore_index``, over its own valid positions). The batch's mean loss is
    the mean of these values when every sample has as many counted elements
    and no class weights apply. Any other callable is called on one-sample
    slices.
    """
    _check_criterion(criterion)
    known = _known_criterion(criterion)

    def per_sample(model: nn.Module, batch: Any) -> Tensor:
        x, y = _xy(batch)
        out = model(x)
        if not isinstance(out, Tensor):
            raise _not_a_tensor(out)
        if known is None:
            return torch.stack(
                [criterion(out[i : i + 1], y[i : i + 1]) for i in range(out.shape[0])]
            )
        kind, kw = known
        kw = {k: v for k, v in kw.items() if k != "reduction"}
        fn: Callable[..., Any] = {v: k for k, v in _FUNCTIONALS.items()}[kind]
        if kind == "mse" and y.shape != out.shape:
            y = y.expand_as(out)
        losses = fn(out, y, reduction="none", **kw)
        if losses.dim() == 0:
            return losses.reshape(1)
        if losses.dim() == 1:
            return losses
        flat = losses.reshape(losses.shape[0], -1)
        if kind in ("cross_entropy", "nll") and not y.is_floating_point():
            valid = (y != kw.get("ignore_index", -100)).reshape(y.shape[0], -1).to(flat.dtype)
            return flat.sum(1) / valid.sum(1).clamp_min(1)
        return flat.mean(1)

    return per_sample
