"""Leaving the model exactly as it was.

Every operator product runs inside :func:`preserved_model`: after it returns or
raises, the parameters, buffers (BatchNorm running statistics and
``num_batches_tracked``), ``.grad`` tensors, train/eval mode of every submodule,
``requires_grad`` flags and the global RNG states are as before. Inside it:

* gradients are enabled even under ``torch.no_grad()`` or ``inference_mode()``;
* scaled-dot-product attention uses the math backend and the
  ``nn.MultiheadAttention`` fast path is off, so double backward works;
* :func:`batch_rng` seeds the RNG per batch so dropout draws the same masks in
  every product and the operator stays one symmetric matrix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ModelSnapshot",
    "batch_rng",
    "buffers_restored",
    "differentiable_mode",
    "parameters_restored",
    "preserved_model",
]


def _cuda_devices(model: nn.Module) -> list[int]:
    devs = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    devs |= {b.device.index or 0 for b in model.buffers() if b.device.type == "cuda"}
    return sorted(devs)


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Restore every buffer on exit (BatchNorm statistics, counters).

    A buffer changed in place gets its old value back through ``.data`` (its
    autograd version counter is left alone, so a graph the caller built before
    still backpropagates); a buffer the body re-assigned is put back itself.

    Yields:
        ``reset()``, which does the same restoration on demand, so that every
        forward pass inside the body starts from the same buffers.
    """
    saved = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None
    ]

    def reset() -> None:
        with torch.no_grad():
            for m, name, b, v in saved:
                if m._buffers.get(name) is not b:
                    m._buffers[name] = b
                if not _same_bits(b, v):
                    b.data.copy_(v)

    try:
        yield reset
    finally:
        reset()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-exact equality (``torch.equal`` calls ``0.0 == -0.0`` and ``nan != nan``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    try:
        return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    except RuntimeError:  # a layout without a byte view (sparse, quantized)
        return bool(torch.equal(a, b))


@contextlib.contextmanager
def parameters_restored(params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Restore the parameters' values bit-exactly on exit (for in-place perturbations).

    Yields the saved values (detached copies), so a body can set ``p.data``
    to ``saved + step`` without accumulating rounding. Values go back through
    ``.data``: the parameters' autograd version counters are not bumped, so a
    graph built before still backpropagates.
    """
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.data.copy_(v)


@contextlib.contextmanager
def differentiable_mode() -> Iterator[None]:
    """Enable autograd (also inside ``no_grad``/``inference_mode``), math SDPA, no MHA fast path."""
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        except (ImportError, RuntimeError):  # pragma: no cover - older torch
            pass
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and hasattr(mha, "get_fastpath_enabled"):
            was = mha.get_fastpath_enabled()
            mha.set_fastpath_enabled(False)
            stack.callback(mha.set_fastpath_enabled, was)
        yield


@dataclass(frozen=True)
class ModelSnapshot:
    """What :func:`preserved_model` saved, for use inside its body.

    Attributes:
        params: detached copies of the ``params`` given (empty when none).
        reset_buffers: put every buffer back to its saved value (call it before
            each forward pass so batches and perturbations see the same state).
    """

    params: list[Tensor]
    reset_buffers: Callable[[], None]


@contextlib.contextmanager
def preserved_model(model: nn.Module, params: Sequence[Tensor] = ()) -> Iterator[ModelSnapshot]:
    """Run a product on ``model`` and leave it bit-identical afterwards.

    Args:
        model: the module analysed.
        params: parameters that the body perturbs in place (finite differences);
            their values are saved and restored. Others are only read.

    Yields:
        A :class:`ModelSnapshot` (saved parameter values, a buffer reset).
    """
    modes = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    grads: list[tuple[Tensor, Any]] = [(p, p.grad) for p in model.parameters()]
    grad_values = [(g, g.detach().clone()) for _, g in grads if g is not None]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(model)))
        reset = stack.enter_context(buffers_restored(model))
        saved: list[Tensor] = stack.enter_context(parameters_restored(params)) if params else []
        try:
            with differentiable_mode():
                yield ModelSnapshot(saved, reset)
        finally:
            for m, t in modes:
                if m.training != t:
                    m.training = t  # the flag only: a user's train() override may do more
            for p, r in req:
                if p.requires_grad != r:
                    p.requires_grad_(r)
            for q, g in grads:
                if q.grad is not g:
                    q.grad = g
            with torch.no_grad():
                for g, v in grad_values:
                    if not _same_bits(g, v):
                        g.data.copy_(v)


@contextlib.contextmanager
def batch_rng(index: tuple[int, ...], seed: int = 0, devices: Sequence[int] = ()) -> Iterator[None]:
    """Seed the global RNG from ``(seed, index)`` for the body, then restore it.

    Dropout in train mode then draws the same masks for the same batch in every
    product.
    """
    h = seed & 0xFFFFFFFF
    for i in index:
        h = (h * 1_000_003 + int(i) + 0x9E3779B9) & 0x7FFFFFFFFFFFFFFF
    with torch.random.fork_rng(devices=list(devices)):
        # seed only the generators that fork_rng restores (torch.manual_seed would
        # also re-seed every other CUDA device and leave it changed)
        torch.random.default_generator.manual_seed(h)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(h)
        yield
