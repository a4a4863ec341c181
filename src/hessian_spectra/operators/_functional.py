"""Functional views of a model shared by the GGN and Fisher operators.

The GGN and Fisher products differentiate ``forward_fn(model, batch)`` with
respect to the selected parameters through :mod:`torch.func` (``jvp``,
``vjp``, ``vmap``, ``grad``). The model is called with its parameters swapped
for the traced tensors by :func:`reparametrized` (the mechanism behind
:func:`torch.func.functional_call`, tied weights followed), so any
``forward_fn`` that calls the model, or its methods, works unchanged.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import stateless

from hessian_spectra.operators._mechanism import run_block

_R = TypeVar("_R")

__all__ = [
    "BlockMechanisms",
    "batch_norm_batch_stats",
    "block_jvp",
    "block_vjp",
    "cuda_indices",
    "resolve_seed",
    "seeded_generator",
]


def resolve_seed(seed: int | None) -> int:
    """``seed`` as an ``int`` (NumPy integers too), or fresh entropy from the OS for ``None``.

    Never torch's global RNG.
    """
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") & 0x7FFFFFFFFFFFFFFF
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}: {seed!r}")
    return int(seed)


def _mix(seed: int, index: Sequence[int], salt: int) -> int:
    h = (seed ^ (salt * 0x9E3779B97F4A7C15)) & 0x7FFFFFFFFFFFFFFF
    for i in index:
        h = (h * 1_000_003 + int(i) + 0x9E3779B9) & 0x7FFFFFFFFFFFFFFF
    return h


def seeded_generator(
    seed: int, index: Sequence[int], device: torch.device, salt: int = 1
) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, index)``: the same draws in every product."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(seed, index, salt))
    return g


def cuda_indices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextlib.contextmanager
def reparametrized(
    model: nn.Module, names: Sequence[str], tensors: Sequence[Tensor]
) -> Iterator[None]:
    """Call ``model`` with the named parameters replaced by ``tensors`` (tied weights follow)."""
    with stateless._reparametrize_module(
        model, dict(zip(names, tensors, strict=True)), tie_weights=True
    ):
        yield


@contextlib.contextmanager
def batch_norm_batch_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in train mode use batch statistics without writing running statistics.

    Forward-mode AD and ``vmap`` cannot update a running buffer in place from a
    dual/batched tensor; turning ``track_running_stats`` off for the duration
    gives the same outputs (train mode normalises with batch statistics) and
    leaves the buffers untouched. The flags are restored on exit.
    """
    changed: list[nn.modules.batchnorm._NormBase] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def output_fn(
    model: nn.Module, names: Sequence[str], forward_fn: Callable[[nn.Module, Any], Any], batch: Any
) -> Callable[..., Tensor]:
    """``params -> forward_fn(model with params, batch)``, checked to return one tensor."""

    def f(*params: Tensor) -> Tensor:
        with reparametrized(model, names, params):
            try:
                out = forward_fn(model, batch)
            except (TypeError, AttributeError, KeyError) as err:
                from hessian_spectra.operators._model import explain_call_error

                ours = explain_call_error(err, "forward_fn", model, batch)
                if ours is None:
                    raise
                raise ours from err
        if not isinstance(out, Tensor):
            raise TypeError(
                f"forward_fn must return one tensor (the model output), got {type(out).__name__}; "
                "e.g. forward_fn=lambda model, batch: model(**batch).logits"
            )
        if not out.is_floating_point():
            raise TypeError(
                f"forward_fn must return a floating-point output (logits, predictions), got "
                f"dtype {out.dtype}: an integer output (argmax, a cast) has no derivative. "
                "Return the model's output before any rounding or argmax"
            )
        return out

    return f


class BlockMechanisms:
    """Per operator: how the ``k`` rows of a block go through ``jvp`` and ``vjp``.

    Each is ``"auto"`` (one batched pass for a chunk of two or more rows, one
    pass for a chunk of one: :func:`~hessian_spectra.operators._mechanism.run_block`),
    ``"vmap"`` or ``"loop"`` (one pass per row); a model that ``vmap`` cannot batch
    makes it ``"loop"``. Never timed: the same settings take the same path on every run.
    """

    def __init__(self) -> None:
        self.jvp = "auto"
        self.vjp = "auto"

    def __repr__(self) -> str:
        return f"BlockMechanisms(jvp={self.jvp!r}, vjp={self.vjp!r})"


def _by_mechanism(
    state: BlockMechanisms,
    name: str,
    k: int,
    batched: Callable[[], _R],
    single: Callable[[int], Any],
    combine: Callable[[list[Any]], _R],
) -> _R:
    """A chunk by the mechanism ``state.<name>``
    (:func:`~hessian_spectra.operators._mechanism.run_block`); a vmap failure is kept."""
    out, mech = run_block(getattr(state, name), k, batched, single, combine)
    setattr(state, name, mech)
    return out


def block_jvp(
    f: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    rng: Callable[[], contextlib.AbstractContextManager[Any]],
    state: BlockMechanisms,
) -> Tensor:
    """``(k, *out)`` Jacobian-vector products for tangents with a leading ``k`` dimension.

    One batched forward-mode pass (``vmap`` over ``jvp``) or ``k`` forward-mode
    passes, by ``state`` (a model whose forward ``vmap`` cannot batch always loops). ``rng`` enters the per-batch RNG fork so every
    pass draws the same dropout masks.
    """
    primals = tuple(primals)
    k = tangents[0].shape[0]

    def batched() -> Tensor:
        with rng():
            return torch.func.vmap(lambda *t: torch.func.jvp(f, primals, t)[1], randomness="same")(
                *tangents
            )

    def single(i: int) -> Tensor:
        with rng():
            return torch.func.jvp(f, primals, tuple(t[i] for t in tangents))[1]

    return _by_mechanism(state, "jvp", k, batched, single, torch.stack)


def block_vjp(
    vjp_fn: Callable[[Tensor], tuple[Tensor, ...]], cotangents: Tensor, state: BlockMechanisms
) -> list[Tensor]:
    """Vector-Jacobian products for a ``(k, *out)`` block: one batched backward or a
    loop over the rows, by ``state``."""
    k = cotangents.shape[0]

    def combine(rows: list[tuple[Tensor, ...]]) -> list[Tensor]:
        return [torch.stack([r[j] for r in rows]) for j in range(len(rows[0]))]

    return _by_mechanism(
        state,
        "vjp",
        k,
        lambda: list(torch.func.vmap(vjp_fn)(cotangents)),
        lambda i: vjp_fn(cotangents[i]),
        combine,
    )
