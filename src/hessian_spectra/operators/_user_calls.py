"""Calling a user's ``loss_fn`` / ``forward_fn`` as ``fn(model, batch)``, with our own
error where it failed in a way we recognise."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["call_user", "explain_call_error"]

R = TypeVar("R")


def call_user(fn: Callable[[nn.Module, Any], R], what: str, model: nn.Module, batch: Any) -> R:
    """``fn(model, batch)``; a recognisable mistake (:func:`explain_call_error`) is raised
    as our own ``TypeError``, chained to the original."""
    try:
        return fn(model, batch)
    except (TypeError, AttributeError, KeyError) as err:
        ours = explain_call_error(err, what, model, batch)
        if ours is None:
            raise
        raise ours from err


def explain_call_error(
    err: BaseException, what: str, model: nn.Module, batch: Any
) -> Exception | None:
    """Our own error for a user function that failed in a recognisable way, else ``None``.

    * it treated the model as a tensor: a criterion ``(output, target)`` passed
      where ``(model, batch)`` is expected (the PyHessian habit);
    * it indexed a dict batch by position (``batch[0]``): a tuple-style function
      on dict batches.
    """
    mname = type(model).__name__
    if isinstance(err, TypeError | AttributeError) and (
        f"not {mname}" in str(err) or f"'{mname}'" in str(err) or f"'{mname}' object" in str(err)
    ):
        return TypeError(
            f"{what} failed treating the model ({mname}) as a tensor ({type(err).__name__}: "
            f"{err}). {what} is called as {what}(model, batch) and must run the model itself; "
            "a criterion taking (output, target), such as nn.CrossEntropyLoss() or "
            f"F.cross_entropy, goes through supervised_loss(criterion) (or "
            "supervised_forward() for forward_fn)"
        )
    if isinstance(err, KeyError) and isinstance(batch, Mapping) and err.args:
        key = err.args[0]
        if isinstance(key, int) and key not in batch:
            return TypeError(
                f"{what} indexed a dict batch by position (batch[{key}]), but the batch is a "
                f"{type(batch).__name__} with keys {list(batch)[:8]}; index it by key, e.g. "
                f"{what}=lambda model, batch: ... model(batch[{next(iter(batch), 'x')!r}]) ..., "
                "or give the operator (inputs, targets) tuples"
            )
    return None
