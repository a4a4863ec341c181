"""Leaving the model exactly as it was.

Every operator product runs inside :func:`preserved_model`: after it returns or
raises, the parameters, buffers (BatchNorm running statistics and
``num_batches_tracked``), ``.grad`` tensors, train/eval mode of every submodule,
``requires_grad`` flags and the global RNG states (torch's CPU and CUDA
generators, NumPy's global generator and Python's :mod:`random`) are as before.
A parameter that something inside the product (a hook, the loss) changed in
place is put back and reported with a ``ValueError`` naming it; a buffer that a
hook registered during the product is removed. Inside it:

* gradients are enabled even under ``torch.no_grad()`` or ``inference_mode()``;
* scaled-dot-product attention uses the math backend and the
  ``nn.MultiheadAttention`` fast path is off, so double backward works;
* :func:`batch_rng` seeds the RNG per batch so dropout draws the same masks in
  every product and the operator stays one symmetric matrix.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ModelSnapshot",
    "all_same_bits",
    "batch_rng",
    "buffers_restored",
    "captured_update_error",
    "changed_parameters_error",
    "differentiable_mode",
    "global_rng_preserved",
    "parameters_checked",
    "parameters_restored",
    "preserved_model",
    "written_buffers",
]

PARAM_COPY_BYTES = 256 * 2**20
"""Up to this many bytes of parameters, :func:`parameters_checked` keeps a copy of
every parameter so that one changed during a product can be put back; above it,
it keeps a checksum per parameter (the change is reported, not undone)."""


def _cuda_devices(model: nn.Module) -> list[int]:
    devs = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    devs |= {b.device.index or 0 for b in model.buffers() if b.device.type == "cuda"}
    return sorted(devs)


def _all_cuda_devices(model: nn.Module | None) -> list[int]:
    """The model's CUDA devices, and every device once CUDA is initialised."""
    devs = set(_cuda_devices(model)) if model is not None else set()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devs |= set(range(torch.cuda.device_count()))
    return sorted(devs)


@contextlib.contextmanager
def global_rng_preserved(model: nn.Module | None = None) -> Iterator[None]:
    """Restore every global random state on exit: torch's CPU generator, the CUDA
    generators (of ``model``'s devices, and of all devices once CUDA is initialised),
    NumPy's global generator and Python's :mod:`random`.

    Iterating a ``DataLoader`` draws its base seed from torch's generator (also with
    ``shuffle=False``), and a model's forward may draw from any of them; none of
    it may reach the caller.
    """
    devices = _all_cuda_devices(model)
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Restore every buffer on exit (BatchNorm statistics, counters).

    A buffer changed in place gets its old value back through ``.data`` (its
    autograd version counter is left alone, so a graph the caller built before
    still backpropagates); a buffer the body re-assigned is put back itself, and
    one the body registered (a forward hook's ``register_buffer``) is removed.

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
    names = [(m, set(m._buffers)) for m in model.modules()]

    def reset() -> None:
        for m, had in names:  # buffers registered meanwhile (e.g. by a hook) go
            for name in [n for n in m._buffers if n not in had]:
                del m._buffers[name]
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


def _local(t: Tensor) -> Tensor:
    """The tensor itself, or a DTensor's local shard."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _int_view(t: Tensor) -> Tensor:
    """The bits of ``t`` as a flat integer tensor of the same element size (comparing
    these is bit-exact: ``0.0`` differs from ``-0.0``, a NaN equals itself)."""
    flat = t.detach().reshape(-1)
    return flat.view(_INTS.get(flat.element_size(), torch.uint8))


def _checksum(t: Tensor) -> Tensor:
    """A bit-level checksum of ``t`` (its bits read as integers, summed): any change
    of one element changes it, NaNs included."""
    try:
        return _int_view(t).sum(dtype=torch.int64)
    except RuntimeError:  # no integer view (complex, sub-byte): its values
        flat = t.detach().reshape(-1)
        view = flat.real if flat.is_complex() else flat
        return view.double().sum() if view.is_floating_point() else view.sum()


def all_same_bits(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[bool]:
    """``_same_bits(x, y)`` for each pair, with one host synchronisation per device."""
    out: list[bool | None] = [None] * len(xs)
    flags: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape != y.shape or x.dtype != y.dtype:
            out[i] = False
            continue
        try:
            a, b = _int_view(x), _int_view(y)
        except RuntimeError:  # no integer view
            out[i] = _same_bits(x, y)
            continue
        if a.device.type == "cpu":  # no synchronisation to save
            out[i] = bool(torch.equal(a, b))
            continue
        flags.setdefault(a.device, []).append((i, (a == b).all()))
    for pairs in flags.values():
        for (i, _), ok in zip(pairs, torch.stack([f for _, f in pairs]).tolist(), strict=True):
            out[i] = bool(ok)
    return [bool(o) for o in out]


def _owner(model: nn.Module, name: str) -> str:
    """``'name' (of ModuleType)`` for a parameter's qualified name."""
    prefix = name.rpartition(".")[0]
    try:
        mod = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return repr(name)
    return f"{name!r} (of {type(mod).__name__})"


@contextlib.contextmanager
def parameters_checked(model: nn.Module) -> Iterator[None]:
    """Put back any parameter the body changed in place, then report it.

    Up to :data:`PARAM_COPY_BYTES` of parameters are copied and a changed one is
    restored bit-exactly; beyond that a checksum per parameter detects the change
    (it cannot be undone). Either way a ``ValueError`` names the parameters, unless
    the body is already raising (its error is kept).
    """
    named = list(model.named_parameters())
    values = [_local(p) for _, p in named]
    total = sum(v.numel() * v.element_size() for v in values)
    copies = [v.detach().clone() for v in values] if total <= PARAM_COPY_BYTES else None
    sums = None if copies is not None else [_checksum(v) for v in values]
    raising = False
    try:
        yield
    except BaseException:
        raising = True
        raise
    finally:
        with torch.no_grad():
            if copies is not None:
                same = all_same_bits(values, copies)
                for v, c, ok in zip(values, copies, same, strict=True):
                    if not ok:
                        if v.shape == c.shape and v.dtype == c.dtype:
                            v.data.copy_(c)
                        else:
                            v.data = c
            else:
                assert sums is not None
                same = all_same_bits([_checksum(v) for v in values], sums)
        changed = [name for (name, _), ok in zip(named, same, strict=True) if not ok]
        if changed and not raising:
            raise changed_parameters_error(model, changed, restored=copies is not None)


def changed_parameters_error(model: nn.Module, names: Sequence[str], restored: bool) -> ValueError:
    """The error for parameters that something inside a product wrote to in place."""
    shown = ", ".join(_owner(model, n) for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    undone = (
        "Its value has been put back, but the product used the changed value."
        if restored
        else f"The model is over {PARAM_COPY_BYTES} bytes, so no copy was kept: the change stays."
    )
    return ValueError(
        f"parameter {shown}{more} changed during the product: something in the forward pass "
        f"(a forward hook, the loss function) wrote to it in place. {undone} Curvature "
        "operators need a forward that leaves the parameters alone: compute new tensors "
        "instead of writing to param.data, or remove the hook while analysing."
    )


def written_buffers(model: nn.Module, run: Callable[[], Any]) -> list[str]:
    """Names of the buffers ``run()`` changes (run without autograd); they are put back.

    Used to name the buffer behind a ``torch.func`` error about an in-place update.
    """
    before = {n: b.detach().clone() for n, b in model.named_buffers()}
    with buffers_restored(model), torch.no_grad():
        with contextlib.suppress(Exception):  # only naming what it wrote before failing
            run()
        after = dict(model.named_buffers())
        return [n for n, b in after.items() if n not in before or not _same_bits(b, before[n])]


def captured_update_error(
    err: RuntimeError, model: nn.Module, run: Callable[[], Any], who: str, instead: str
) -> ValueError | None:
    """Our message for ``torch.func``'s refusal of an in-place update in the model's
    forward (``None`` for any other error), naming the buffers ``run()`` (the forward,
    once more without autograd) writes.

    Args:
        who: what differentiates the forward, with its verb ("dense Hessians
            differentiate", "GGNOperator differentiates").
        instead: what to use instead, ending the message.
    """
    if "mutate a captured Tensor" not in str(err):
        return None
    written = written_buffers(model, run)
    what = (
        "buffer(s) " + ", ".join(repr(n) for n in written[:5])
        if written
        else "a tensor it does not take as input"
    )
    return ValueError(
        f"the model's forward updates {what} in place (e.g. `self.calls += 1` or a running "
        f"statistic); {who} the forward with torch.func, which cannot run an "
        "in-place update of a tensor it does not trace. Move the update out of forward (or "
        f"skip it while analysing), or use {instead}"
    )


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
def preserved_model(
    model: nn.Module, params: Sequence[Tensor] = (), *, check_parameters: bool = True
) -> Iterator[ModelSnapshot]:
    """Run a product on ``model`` and leave it bit-identical afterwards.

    Args:
        model: the module analysed.
        params: parameters that the body perturbs in place (finite differences);
            their values are saved and restored. Others are only read.
        check_parameters: put back and report parameters that changed in the body
            (:func:`parameters_checked`); ``False`` for a body that moves parameters
            itself and restores them only after the guard.

    Yields:
        A :class:`ModelSnapshot` (saved parameter values, a buffer reset).
    """
    modes = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in model.parameters()]
    grads: list[tuple[Tensor, Any]] = [(p, p.grad) for p in model.parameters()]
    grad_values = [(g, g.detach().clone()) for _, g in grads if g is not None]
    with contextlib.ExitStack() as stack:
        stack.enter_context(global_rng_preserved(model))
        if check_parameters:
            stack.enter_context(parameters_checked(model))
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
