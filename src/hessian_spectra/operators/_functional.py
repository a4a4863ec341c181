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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import stateless
from torch.overrides import TorchFunctionMode

from hessian_spectra.operators._mechanism import run_block
from hessian_spectra.operators._user_calls import call_user

_R = TypeVar("_R")

__all__ = [
    "BlockMechanisms",
    "LeanLinearTangents",
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
            out = call_user(forward_fn, "forward_fn", model, batch)
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
        # whether J V runs under LeanLinearTangents: set at the first pass from the
        # parameters' shapes (LEAN_MIN_FEATURES), the same for every pass after
        self.lean_linear: bool | None = None

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


class _LinearTangent(torch.autograd.Function):
    """``F.linear`` whose forward-mode derivative adds ``x Ẇᵀ`` into ``ẋ Wᵀ`` in place.

    PyTorch's own rule for the matrix product computes ``ẋ Wᵀ`` and ``x Ẇᵀ`` as
    two tensors and adds them into a third: with the primal output, four
    output-sized tensors at once. For a language model's head that is four
    ``(tokens, vocab)`` tensors; this rule holds two (the primal and the
    tangent). Under ``vmap`` (a batched tangent) the sum is one ``addmm`` out of
    place, three tensors. Only forward mode is defined: the function is used
    for ``J V`` alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, _ = inputs
        ctx.save_for_forward(x, weight)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None) -> Tensor:
        x, weight = ctx.saved_tensors
        out = None if x_t is None else F.linear(x_t, weight)
        if w_t is not None:
            if out is None:
                out = F.linear(x, w_t)
            else:
                flat_x = x.reshape(-1, x.shape[-1])
                batched = _under_vmap()
                try:
                    flat_out = out.view(-1, out.shape[-1])  # a view: in place reaches out
                except RuntimeError:
                    batched = True
                if batched:
                    out = torch.addmm(out.reshape(-1, out.shape[-1]), flat_x, w_t.t()).reshape(
                        out.shape
                    )
                else:
                    flat_out.addmm_(flat_x, w_t.t())
        if b_t is not None:
            out = b_t.expand(*x.shape[:-1], b_t.shape[-1]) if out is None else out + b_t
        if out is None:
            out = torch.zeros_like(F.linear(x, weight))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise RuntimeError(
            "internal: the lean linear rule is for forward mode only (J V); reverse mode reached it"
        )


def _under_vmap() -> bool:
    """Whether a ``vmap`` transform is active (its batched tensors take no in-place
    ``addmm_`` without a slow per-row fallback)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def _plain(t: Any) -> bool:
    return t is None or type(t) in (Tensor, nn.Parameter)


class LeanLinearTangents(TorchFunctionMode):
    """In this context ``F.linear`` (``nn.Linear``, a language model's head) on plain
    2-d weights takes :class:`_LinearTangent`'s forward-mode rule: its ``J V`` holds
    two output-sized tensors at a time instead of four. Other calls (tensor
    subclasses, reverse mode) are untouched."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) + len(kwargs) <= 3:
            names = ("input", "weight", "bias")
            got = dict(zip(names, args, strict=False)) | kwargs
            x, w, b = got.get("input"), got.get("weight"), got.get("bias")
            if (
                isinstance(x, Tensor)
                and isinstance(w, Tensor)
                and w.dim() == 2
                and x.dim() >= 1
                and all(_plain(t) for t in (x, w, b))
                and set(got) <= set(names)
            ):
                return _LinearTangent.apply(x, w, b)
        return func(*args, **kwargs)


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

    def lean() -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if state.lean_linear is False else LeanLinearTangents()

    def batched() -> Tensor:
        with rng(), lean():
            return torch.func.vmap(lambda *t: torch.func.jvp(f, primals, t)[1], randomness="same")(
                *tangents
            )

    def single(i: int) -> Tensor:
        with rng(), lean():
            return torch.func.jvp(f, primals, tuple(t[i] for t in tangents))[1]

    if state.lean_linear is None:  # the lean rule saves memory only on wide outputs
        state.lean_linear = any(p.dim() == 2 and p.shape[0] >= LEAN_MIN_FEATURES for p in primals)
    return _by_mechanism(state, "jvp", k, batched, single, _stack)


LEAN_MIN_FEATURES = 8192
"""``J V`` runs under :class:`LeanLinearTangents` when a 2-d parameter has at least
this many rows (a language model's head or tied embedding: a vocabulary's worth of
output features, whose logits dominate the product's memory). For narrower models
its dispatch of every operation of the forward through Python costs more than the
output-sized tensors it saves (a seed usage example's GGN trace on a small MLP ran
3x slower under it)."""


def _stack(rows: list[Tensor]) -> Tensor:
    """``torch.stack``, without the copy for one row."""
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)


def block_vjp(
    vjp_fn: Callable[[Tensor], tuple[Tensor, ...]], cotangents: Tensor, state: BlockMechanisms
) -> list[Tensor]:
    """Vector-Jacobian products for a ``(k, *out)`` block: one batched backward or a
    loop over the rows, by ``state``."""
    k = cotangents.shape[0]

    def combine(rows: list[tuple[Tensor, ...]]) -> list[Tensor]:
        if len(rows) == 1:  # no copy of a parameter-sized vector for one row
            return [t.unsqueeze(0) for t in rows[0]]
        return [torch.stack([r[j] for r in rows]) for j in range(len(rows[0]))]

    return _by_mechanism(
        state,
        "vjp",
        k,
        lambda: list(torch.func.vmap(vjp_fn)(cotangents)),
        lambda i: vjp_fn(cotangents[i]),
        combine,
    )
