"""Parameter blocks of a dense Hessian and their assembly into one matrix.

For a function ``f`` of the parameters ``P_1, ..., P_r`` (each flattened in
row-major order), the Hessian is the ``r x r`` block matrix

.. math::

    H = [H_{ij}], \\qquad
    (H_{ij})_{kl} = \\frac{\\partial^2 f}{\\partial (P_i)_k\\, \\partial (P_j)_l},

of size ``n x n`` with ``n = sum_i numel(P_i)``. Block ``(i, j)`` occupies rows
``off_i : off_i + numel(P_i)`` and columns ``off_j : off_j + numel(P_j)``, where
``off_i`` is the offset of ``P_i`` in ``model.named_parameters()`` order (the
order of :class:`hessian_spectra.params.ParamLayout`). A function with an
output of shape ``S`` has one Hessian per output entry: blocks of shape
``S + P_i.shape + P_j.shape`` (as :func:`torch.func.hessian` gives them) and a
matrix of shape ``S + (n, n)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from hessian_spectra.operators._functional import batch_norm_batch_stats
from hessian_spectra.params import ParamFilter, ParamLayout, selected_parameters
from hessian_spectra.state import captured_update_error, preserved_model

__all__ = [
    "BlockDict",
    "ParamSpec",
    "analysed",
    "as_inputs",
    "as_matrix",
    "blocks_to_matrix",
    "check_batch",
    "dense_blocks",
    "functional_model",
    "hessian_blocks",
    "nested_blocks",
    "per_sample_blocks",
    "resolve_parameters",
]

BlockDict = dict[tuple[str, str], Tensor]
"""Hessian blocks keyed by ``(name_i, name_j)``; with ``diagonal_only`` only ``(name, name)``."""

ParamSpec = ParamFilter | Iterable[str] | str | None
"""Which parameters: ``None`` (all trainable), a filter ``(name, param) -> bool``, or names."""


def resolve_parameters(
    model: nn.Module, params: ParamSpec = None
) -> tuple[list[str], list[nn.Parameter]]:
    """The trainable parameters chosen by ``params``, in ``named_parameters()`` order.

    Frozen parameters (``requires_grad=False``) are always left out; a tied
    parameter appears once.

    Raises:
        ValueError: a name that is not a parameter of ``model`` or is frozen.
        TypeError: ``params`` is neither ``None``, a callable nor names.
    """
    if params is None or callable(params):
        return selected_parameters(model, params)
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, Iterable):
        raise TypeError(
            "params must be None, a filter (name, param) -> bool, or parameter names, "
            f"got {type(params).__name__}"
        )
    wanted = list(params)
    for w in wanted:
        if not isinstance(w, str):
            raise TypeError(f"parameter names must be strings, got {type(w).__name__}: {w!r}")
    named = dict(model.named_parameters())
    unknown = [w for w in wanted if w not in named]
    if unknown:
        shown = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
        raise ValueError(
            f"unknown parameter name(s) {unknown}; the model's parameters are: {shown}"
        )
    frozen = [w for w in wanted if not named[w].requires_grad]
    if frozen:
        raise ValueError(
            f"parameter(s) {frozen} have requires_grad=False; a Hessian leaves frozen parameters "
            "out: drop them from params or set requires_grad=True"
        )
    keep = set(wanted)
    return selected_parameters(model, lambda name, p: name in keep)


def as_inputs(inputs: Any) -> tuple[Any, ...]:
    """The model's positional arguments: a tuple as given, anything else as a 1-tuple."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


@contextlib.contextmanager
def analysed(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Evaluate ``model`` (in eval mode if asked) and leave it bit-identical afterwards.

    BatchNorm layers left in train mode normalise with the batch's statistics and
    write no running statistics (``torch.func`` cannot update them in place).
    """
    with preserved_model(model):
        if eval_mode:
            model.eval()
        with batch_norm_batch_stats(model):
            yield


def _scalar_hessian(fn: Callable[[dict[str, Tensor]], Tensor], values: dict[str, Tensor]) -> Any:
    """Nested blocks ``{a: {b: d2 fn / da db}}`` of a scalar ``fn``: reverse over reverse.

    ``jacrev(grad(fn))``: ``torch.func.hessian`` (``jacfwd(jacrev(fn))``) and
    ``jacrev(jacrev(fn))`` give wrong second derivatives through LayerNorm and
    train-mode BatchNorm in torch 2.13 (errors of 0.15 on a small MLP, against
    ``torch.autograd.functional.hessian``); this composition agrees with it to
    rounding, also under ``vmap``.
    """
    return jacrev(grad(fn))(values)


def _with_fixed(
    fn: Callable[[Mapping[str, Tensor]], Tensor], values: dict[str, Tensor]
) -> Callable[[dict[str, Tensor]], Tensor]:
    """``fn`` of some parameters, the others held at ``values``."""

    def f(some: dict[str, Tensor]) -> Tensor:
        return fn({**values, **some})

    return f


def hessian_blocks(
    fn: Callable[[Mapping[str, Tensor]], Tensor],
    names: list[str],
    params: list[nn.Parameter],
    *,
    diagonal_only: bool = False,
) -> BlockDict:
    """Hessian blocks of ``fn(param_dict)``, one Hessian per entry of its output.

    A scalar output is differentiated directly; for an output of shape ``S``
    the entries are mapped with :func:`torch.func.vmap`, giving blocks of shape
    ``S + P_a.shape + P_b.shape``. ``diagonal_only`` differentiates each
    parameter on its own (the others held at their values), so the
    off-diagonal blocks are never computed.
    """
    values = {n: p.detach() for n, p in zip(names, params, strict=True)}
    shape = fn(values).shape

    def nested(f: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor]) -> Any:
        if len(shape) == 0:
            return _scalar_hessian(f, at)
        numel = math.prod(shape)

        def entry(s: Tensor) -> Any:
            return _scalar_hessian(lambda p: f(p).reshape(-1)[s], at)

        h = vmap(entry)(torch.arange(numel, device=next(iter(at.values())).device))
        return {
            a: {b: t.reshape(*shape, *t.shape[1:]) for b, t in row.items()} for a, row in h.items()
        }

    out: BlockDict = {}
    if diagonal_only:
        for n in names:
            h = nested(_with_fixed(fn, values), {n: values[n]})
            out[(n, n)] = h[n][n]
        return out
    h = nested(lambda p: fn(p), values)
    for a in names:
        for b in names:
            out[(a, b)] = h[a][b]
    return out


def blocks_to_matrix(
    blocks: BlockDict,
    names: list[str],
    shapes: list[torch.Size],
    *,
    diagonal_only: bool = False,
) -> Tensor:
    """Assemble blocks into a ``lead + (n, n)`` matrix, each block at its offsets.

    ``lead`` is the output shape (with a batch dimension first for per-sample
    Hessians). Missing blocks (off-diagonal ones with ``diagonal_only``) stay
    zero. The matrix has the dtype and device of the blocks.
    """
    layout = ParamLayout(tuple(names), tuple(torch.Size(s) for s in shapes))
    first = blocks[(names[0], names[0])]
    lead = first.shape[: first.dim() - 2 * len(shapes[0])]
    n = layout.size
    out = first.new_zeros(*lead, n, n)
    sl = layout.slices()
    for a, na in zip(names, layout.numels, strict=True):
        for b, nb in zip(names, layout.numels, strict=True):
            if diagonal_only and a != b:
                continue
            block = blocks[(a, b)]
            out[..., sl[a], sl[b]] = block.reshape(*lead, na, nb)
    return out


def check_batch(batch_args: tuple[Any, ...], what: str) -> int:
    """The common leading dimension of the tensors in ``batch_args`` (per-sample functions)."""
    sizes = []
    for i, t in enumerate(batch_args):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{what}: per-sample Hessians map over the leading dimension of tensors; argument "
                f"{i} "
                f"is a {type(t).__name__}. Pass tensors with a batch dimension first."
            )
        if t.dim() == 0:
            raise ValueError(
                f"{what}: argument {i} is a 0-d tensor; per-sample Hessians need a batch dimension "
                "first"
            )
        sizes.append(int(t.shape[0]))
    if not sizes:
        raise ValueError(f"{what}: no batch inputs given")
    if len(set(sizes)) != 1:
        raise ValueError(
            f"{what}: the batch tensors disagree in their leading (batch) dimension: {sizes}; "
            "every input (and the target) needs the same number of samples"
        )
    return sizes[0]


def per_sample_blocks(
    sample_fn: Callable[..., BlockDict],
    batch_args: tuple[Tensor, ...],
    *,
    vectorize: bool,
) -> BlockDict:
    """``sample_fn(*sample)`` for each sample (row ``b`` of every tensor), stacked on a new dim 0.

    With ``vectorize`` the samples go through :func:`torch.func.vmap` (the
    model sees one sample without a batch dimension, as with a loop); without,
    a Python loop does the same one sample at a time (for models that vmap
    cannot trace, e.g. ones that call ``.item()``).
    """
    if vectorize:
        return torch.func.vmap(sample_fn)(*batch_args)
    per = [sample_fn(*(t[b] for t in batch_args)) for b in range(int(batch_args[0].shape[0]))]
    return {k: torch.stack([p[k] for p in per]) for k in per[0]}


def dense_blocks(
    model: nn.Module,
    make_fn: Callable[..., Callable[[Mapping[str, Tensor]], Tensor]],
    args: tuple[Any, ...],
    params: ParamSpec,
    diagonal_only: bool,
    eval_mode: bool,
    per_sample: str | None = None,
    vectorize: bool = True,
) -> BlockDict:
    """Hessian blocks of ``make_fn(*args)``, a function of the parameter dict, on ``model``.

    Without ``per_sample`` the blocks of ``make_fn(*args)``; with it (the
    caller's name, for errors) ``args`` are tensors sharing a batch dimension
    and sample ``b`` gives the blocks of ``make_fn(*(t[b] for t in args))``,
    stacked on a new dim 0 (see :func:`per_sample_blocks`). The model is
    evaluated under :func:`analysed` (eval mode if asked, left bit-identical).
    """
    names, ps = resolve_parameters(model, params)
    if per_sample is not None:
        check_batch(args, per_sample)

    def one(*a: Any) -> BlockDict:
        return hessian_blocks(make_fn(*a), names, ps, diagonal_only=diagonal_only)

    with analysed(model, eval_mode):
        try:
            if per_sample is None:
                return one(*args)
            return per_sample_blocks(one, args, vectorize=vectorize)
        except RuntimeError as err:
            values = {n: p.detach() for n, p in zip(names, ps, strict=True)}
            ours = captured_update_error(
                err,
                model,
                lambda: make_fn(*args)(values),
                "dense Hessians differentiate",
                "HessianOperator(...).to_dense()",
            )
            if ours is None:
                raise
            raise ours from err


def as_matrix(
    dict_fn: Callable[..., BlockDict],
    model: nn.Module,
    args: tuple[Any, ...],
    params: ParamSpec,
    diagonal_only: bool,
    **kwargs: Any,
) -> Tensor:
    """The blocks of ``dict_fn(model, *args, ...)`` assembled by :func:`blocks_to_matrix`."""
    names, ps = resolve_parameters(model, params)
    blocks = dict_fn(model, *args, params=names, diagonal_only=diagonal_only, **kwargs)
    return blocks_to_matrix(blocks, names, [p.shape for p in ps], diagonal_only=diagonal_only)


def nested_blocks(blocks: BlockDict) -> dict[str, dict[str, Tensor]]:
    """``{(a, b): H_ab}`` as ``{a: {b: H_ab}}`` (the layout of :func:`torch.func.hessian`)."""
    out: dict[str, dict[str, Tensor]] = {}
    for (a, b), h in blocks.items():
        out.setdefault(a, {})[b] = h
    return out


def functional_model(
    model: nn.Module, inputs: tuple[Any, ...]
) -> Callable[[Mapping[str, Tensor]], Any]:
    """``params -> model(*inputs)`` with the given parameters swapped in."""

    def f(p: Mapping[str, Tensor]) -> Any:
        return functional_call(model, dict(p), inputs)

    return f
