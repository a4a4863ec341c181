"""Which parameters a curvature operator acts on, and the flat-vector layout.

A curvature operator over a model acts on the flat concatenation of the selected
parameters, in the order of ``model.named_parameters()``. A block of ``k``
vectors is a ``(k, n)`` tensor, one vector per row.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ParamFilter",
    "ParamLayout",
    "match_names",
    "match_regex",
    "params_to_vector",
    "select_parameters",
    "vector_to_params",
]

ParamFilter = Callable[[str, nn.Parameter], bool]
"""A predicate ``(name, param) -> bool`` choosing the parameters to include."""


def match_names(*patterns: str) -> ParamFilter:
    """Select parameters whose name matches any of the glob ``patterns``.

    ``*`` matches any run of characters (dots included), ``?`` one character,
    ``[abc]`` one of a set (:mod:`fnmatch` semantics).

    Example:
        >>> f = match_names("0.*")
        >>> f("0.weight", None), f("2.bias", None)
        (True, False)
    """
    if not patterns:
        raise ValueError(
            "match_names() needs at least one glob pattern, e.g. match_names('blocks.*.attn.*')"
        )
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"match_names() takes glob strings, got {type(p).__name__}: {p!r}")

    def _filter(name: str, param: nn.Parameter | None = None) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    _filter.__qualname__ = f"match_names{patterns!r}"
    return _filter


def match_regex(pattern: str) -> ParamFilter:
    """Select parameters whose name contains a match of the regular expression.

    Uses :func:`re.search`, so anchor with ``^``/``$`` for whole-name matches.

    Example:
        >>> match_regex(r"^blocks\\.\\d+\\.attn\\.")("blocks.3.attn.W_Q", None)
        True
    """
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"match_regex() got an invalid regular expression {pattern!r}: {err}"
        ) from err

    def _filter(name: str, param: nn.Parameter | None = None) -> bool:
        return rx.search(name) is not None

    _filter.__qualname__ = f"match_regex({pattern!r})"
    return _filter


def select_parameters(
    model: nn.Module, param_filter: ParamFilter | None = None
) -> tuple[list[str], list[nn.Parameter]]:
    """The trainable parameters of ``model`` chosen by ``param_filter``.

    Parameters with ``requires_grad=False`` are left out; a parameter shared by
    several modules appears once (under its first name).

    Raises:
        ValueError: if nothing is selected; the message lists some of the
            model's parameter names so the filter can be fixed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if param_filter is not None and not callable(param_filter):
        raise TypeError(
            "param_filter must be a callable (name, param) -> bool such as match_names('layer.*'), "
            f"got {type(param_filter).__name__}"
        )
    names: list[str] = []
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    all_names: list[str] = []
    for name, p in model.named_parameters():
        all_names.append(name)
        if id(p) in seen or not p.requires_grad:
            continue
        if param_filter is not None and not param_filter(name, p):
            continue
        seen.add(id(p))
        names.append(name)
        params.append(p)
    if not params:
        shown = ", ".join(all_names[:8]) + (", ..." if len(all_names) > 8 else "")
        if not all_names:
            raise ValueError("the model has no parameters; nothing to differentiate")
        raise ValueError(
            f"no trainable parameter selected (filter={getattr(param_filter, '__qualname__', param_filter)}); "
            f"the model's parameters are: {shown}. Fix the filter, or set requires_grad=True."
        )
    return names, params


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of parameters in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, names: Sequence[str], tensors: Sequence[Tensor]) -> ParamLayout:
        return cls(tuple(names), tuple(t.shape for t in tensors))

    @property
    def numels(self) -> tuple[int, ...]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= int(d)
            out.append(n)
        return tuple(out)

    @property
    def size(self) -> int:
        return sum(self.numels)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    def split(self, V: Tensor) -> list[Tensor]:
        """Views of a ``(n,)`` vector or ``(k, n)`` block, one per parameter, shaped like it
        (with the leading ``k`` kept for a block)."""
        lead = V.shape[:-1]
        if V.shape[-1] != self.size:
            raise ValueError(
                f"expected a last dimension of {self.size}, got shape {tuple(V.shape)}"
            )
        chunks = torch.split(V, list(self.numels), dim=-1)
        return [c.reshape(*lead, *s) for c, s in zip(chunks, self.shapes, strict=True)]

    def join(self, tensors: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-parameter tensors (each with ``batch_dims`` leading dims) into one."""
        flat = [t.reshape(*t.shape[:batch_dims], -1) for t in tensors]
        return torch.cat(flat, dim=-1)

    def slices(self) -> dict[str, slice]:
        """The slice of the flat vector that each parameter occupies."""
        return {
            n: slice(o, o + m)
            for n, o, m in zip(self.names, self.offsets, self.numels, strict=True)
        }


def params_to_vector(tensors: Iterable[Tensor]) -> Tensor:
    """Flatten and concatenate tensors (e.g. parameters or gradients) into one vector."""
    ts = list(tensors)
    if not ts:
        raise ValueError("params_to_vector() got no tensors")
    return torch.cat([t.reshape(-1) for t in ts])


def vector_to_params(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like the tensors in ``like``."""
    n = sum(t.numel() for t in like)
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(f"expected a vector of {n} elements, got shape {tuple(vec.shape)}")
    return ParamLayout(tuple(str(i) for i in range(len(like))), tuple(t.shape for t in like)).split(
        vec
    )
