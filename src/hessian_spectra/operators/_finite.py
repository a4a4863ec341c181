"""Non-finite products: caught where they appear, before they reach any algorithm.

A single NaN sample or an infinite loss on one batch makes every product NaN,
and the algorithms' small dense problems then fail deep inside LAPACK (or
return NaN). Products are therefore checked for NaN/inf:

* model operators check their result once per product (one reduction, one host
  synchronisation); only when it fails do they run the product again, noting one
  on-device flag per batch (:class:`FiniteWatch`), and look at the first failing
  batch again to say what was non-finite (its loss, its gradient, or the product);
* every other operator's product is checked once in
  :meth:`~hessian_spectra.operators.base.CurvatureOperator.matmat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FiniteWatch",
    "NonFiniteError",
    "all_finite",
    "check_finite_input",
    "nonfinite_rows",
]


class NonFiniteError(ValueError):
    """A curvature product, or the loss or gradient behind it, holds NaN or inf.

    Raised by an operator's product before the values reach an algorithm; the
    message names the operator, the batch (for operators over a dataset) and
    what was non-finite.
    """


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN or inf, with one host synchronisation.

    NaN and inf propagate through a sum, so a finite sum proves every entry
    finite; the sum (in float32 at least) is ten times faster than
    ``isfinite(x).all()`` on the CPU. A non-finite sum (a NaN, an inf, or a sum
    of finite entries that overflows) is confirmed entry by entry.
    """
    if not x.is_floating_point():
        return bool(torch.isfinite(x).all())
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(x.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(x).all())


def nonfinite_rows(X: Tensor) -> list[int]:
    """Indices of the rows of a ``(k, n)`` block that hold NaN or inf (at most 5)."""
    bad = ~torch.isfinite(X.reshape(X.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten()[:5].tolist()


def check_finite_input(V: Tensor, who: str) -> None:
    """``NonFiniteError`` if the block ``V`` itself holds NaN or inf (a failure path check)."""
    if not all_finite(V):
        raise NonFiniteError(
            f"{who}: the block multiplied holds NaN or inf (rows {nonfinite_rows(V)}); "
            "products need finite vectors: check where the vectors come from"
        )


def describe_nonfinite(t: Tensor) -> str:
    """``"nan"``, ``"inf"``, ``"-inf"`` or a count of such entries in ``t``."""
    flat = t.detach().reshape(-1)
    nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    if flat.numel() == 1:
        return str(float(flat[0]))
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return " and ".join(p for p in parts if p) + f" of {flat.numel()} entries"


class FiniteWatch:
    """One on-device finiteness flag per batch of an accumulating product.

    ``note(where, acc)`` after batch ``where`` has been added to the
    accumulator(s) ``acc``; an entry once NaN or inf stays so under later
    additions, so the first failing flag names the first batch that brought one.
    :meth:`first_bad` synchronises once and returns that batch's ``where``. An
    inactive watch (``active=False``, the default: an ordinary product) notes
    nothing and costs nothing.
    """

    def __init__(self, active: bool = False) -> None:
        self.active = active
        self._flags: list[Tensor] = []
        self._where: list[Any] = []

    def note(self, where: Any, acc: Tensor | Sequence[Tensor]) -> None:
        if not self.active:
            return
        tensors = [acc] if isinstance(acc, Tensor) else list(acc)
        flags = [torch.isfinite(t).all() for t in tensors]
        self._flags.append(torch.stack(flags).all() if len(flags) > 1 else flags[0])
        self._where.append(where)

    def first_bad(self) -> Any | None:
        """The ``where`` of the first batch whose flag failed, or ``None``."""
        if not self._flags:
            return None
        ok = torch.stack(self._flags)
        if bool(ok.all()):
            return None
        return self._where[int((~ok).nonzero()[0, 0])]
