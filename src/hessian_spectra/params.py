"""Which parameters a curvature operator acts on, and the flat-vector layout.

A curvature operator over a model acts on the flat concatenation of the selected
parameters, in the order of ``model.named_parameters()``. A block of ``k``
vectors is a ``(k, n)`` tensor, one vector per row.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ParamFilter",
    "ParamLayout",
    "flatten_params",
    "get_filtered_params",
    "get_param_list",
    "get_param_names",
    "get_param_sizes",
    "match_names",
    "match_regex",
    "params_to_vector",
    "select_parameters",
    "selected_parameters",
    "total_size",
    "unflatten_params",
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


def match_regex(*patterns: str) -> ParamFilter:
    """Select parameters whose name contains a match of any of the regular expressions.

    Uses :func:`re.search`, so anchor with ``^``/``$`` for whole-name matches.

    Example:
        >>> match_regex(r"^blocks\\.\\d+\\.attn\\.")("blocks.3.attn.W_Q", None)
        True
        >>> match_regex(r"^0\\.", r"bias$")("2.bias", None)
        True
    """
    if not patterns:
        raise ValueError("match_regex() needs at least one regular expression, e.g. r'^blocks\\.'")
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"match_regex() takes regular expressions as strings, got "
                f"{type(pattern).__name__}: {pattern!r}"
            )
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"match_regex() got an invalid regular expression {pattern!r}: {err}"
            ) from err

    def _filter(name: str, param: nn.Parameter | None = None) -> bool:
        return any(rx.search(name) is not None for rx in compiled)

    _filter.__qualname__ = f"match_regex{patterns!r}"
    return _filter


def select_parameters(
    model: nn.Module, param_filter: ParamFilter | None = None
) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` chosen by ``param_filter``, name to parameter.

    In the order of ``model.named_parameters()``; the rules and errors are those of
    :func:`selected_parameters`.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> list(select_parameters(model, match_names("0.*")))
        ['0.weight', '0.bias']
    """
    names, params = selected_parameters(model, param_filter)
    return dict(zip(names, params, strict=True))


def selected_parameters(
    model: nn.Module, param_filter: ParamFilter | None = None
) -> tuple[list[str], list[nn.Parameter]]:
    """The trainable parameters of ``model`` chosen by ``param_filter``, as ``(names, params)``.

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
            f"no trainable parameter selected (zero parameters; filter={getattr(param_filter, '__qualname__', param_filter)}); "
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


def _tensors(params: Mapping[str, Tensor] | Iterable[Tensor]) -> list[Tensor]:
    return list(params.values()) if isinstance(params, Mapping) else list(params)


def params_to_vector(params: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """Flatten and concatenate tensors (e.g. parameters or gradients) into one vector.

    Takes a ``name -> tensor`` mapping (its values, in order) or any iterable of tensors.
    """
    ts = _tensors(params)
    if not ts:
        raise ValueError("params_to_vector() got no tensors")
    return torch.cat([t.reshape(-1) for t in ts])


def vector_to_params(
    vec: Tensor, reference: Mapping[str, Tensor] | Sequence[Tensor]
) -> dict[str, Tensor] | list[Tensor]:
    """Split a flat vector into views shaped like the tensors in ``reference``.

    Returns a ``name -> view`` dict for a mapping ``reference`` (as
    :func:`select_parameters` gives), a list for a sequence of tensors.
    """
    like = _tensors(reference)
    n = sum(t.numel() for t in like)
    if not isinstance(vec, Tensor) or vec.dim() != 1 or vec.numel() != n:
        got = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
        raise ValueError(f"expected a 1-D vector of {n} elements, got {got}")
    views = ParamLayout(
        tuple(str(i) for i in range(len(like))), tuple(t.shape for t in like)
    ).split(vec)
    if isinstance(reference, Mapping):
        return dict(zip(reference.keys(), views, strict=True))
    return views


def total_size(params: Mapping[str, Tensor] | Iterable[Tensor]) -> int:
    """Number of elements of all the tensors (values of a mapping, or an iterable)."""
    return sum(int(t.numel()) for t in _tensors(params))


def get_param_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's trainable parameters, in ``named_parameters`` order."""
    return selected_parameters(model)[0]


def get_param_list(model: nn.Module) -> list[nn.Parameter]:
    """The model's trainable parameters, in ``named_parameters`` order."""
    return selected_parameters(model)[1]


def get_param_sizes(model: nn.Module) -> list[torch.Size]:
    """Shapes of the model's trainable parameters, in ``named_parameters`` order."""
    return [p.shape for p in get_param_list(model)]


def get_filtered_params(
    model: nn.Module, param_filter: ParamFilter | None
) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters chosen by ``param_filter`` (see :func:`selected_parameters`)."""
    return selected_parameters(model, param_filter)


def flatten_params(param_dict: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a ``name -> tensor`` dict into one flat vector (its order)."""
    return params_to_vector(param_dict)


def unflatten_params(
    vec: Tensor,
    param_names: Sequence[str],
    param_list: Sequence[Tensor],
    sizes: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Views of ``vec`` shaped like ``param_list``, keyed by ``param_names``.

    ``sizes`` (element counts) is accepted for hessian-eigenthings' signature and
    checked against ``param_list``.
    """
    if len(param_names) != len(param_list):
        raise ValueError(
            f"unflatten_params: {len(param_names)} names for {len(param_list)} parameters"
        )
    if sizes is not None and [
        int(torch.Size(s).numel()) if not isinstance(s, int) else s for s in sizes
    ] != [p.numel() for p in param_list]:
        raise ValueError("unflatten_params: sizes do not match the parameters' element counts")
    views = vector_to_params(vec, list(param_list))
    assert isinstance(views, list)
    return dict(zip(param_names, views, strict=True))
