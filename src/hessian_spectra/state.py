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
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
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
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Restore every buffer's value on exit (BatchNorm statistics, counters)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.data_ptr() != v.data_ptr():
                    b.copy_(v)


@contextlib.contextmanager
def parameters_restored(params: Sequence[Tensor]) -> Iterator[None]:
    """Restore the parameters' values bit-exactly on exit (for in-place perturbations)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


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


@contextlib.contextmanager
def preserved_model(model: nn.Module, params: Sequence[Tensor] = ()) -> Iterator[None]:
    """Run a product on ``model`` and leave it bit-identical afterwards.

    Args:
        model: the module analysed.
        params: parameters that the body perturbs in place (finite differences);
            their values are saved and restored. Others are only read.
    """
    modes = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    grads: list[tuple[Tensor, Any]] = [(p, p.grad) for p in model.parameters()]
    grad_values = [(g, g.detach().clone()) for _, g in grads if g is not None]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(model)))
        stack.enter_context(buffers_restored(model))
        if params:
            stack.enter_context(parameters_restored(params))
        try:
            with differentiable_mode():
                yield
        finally:
            for m, t in modes:
                if m.training != t:
                    m.train(t)
            for p, r in req:
                if p.requires_grad != r:
                    p.requires_grad_(r)
            for p, g in grads:
                if p.grad is not g:
                    p.grad = g
            with torch.no_grad():
                for g, v in grad_values:
                    if not torch.equal(g, v):
                        g.copy_(v)


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
        torch.manual_seed(h)
        yield
