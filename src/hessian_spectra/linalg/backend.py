"""Vector-arithmetic backends: how an algorithm's vectors are stored and combined.

The algorithms here work on blocks of vectors, one per row of a ``(k, n)``
tensor, and do their arithmetic with torch on the operator's device. A
:class:`LinAlgBackend` names the handful of vector operations an algorithm
needs (``dot``, ``norm``, ``axpy``, ``scale``, ``zeros_like``, ``randn_like``,
``rademacher_like``) so that code written against it does not care where the
numbers live. :class:`SingleDeviceBackend` implements them for plain tensors on
one device; it is the default of every algorithm's ``backend=`` argument.

Every algorithm accepts ``backend=None`` or a :class:`SingleDeviceBackend`.
Operators whose vectors are sharded across processes (FSDP) present full
vectors to the algorithms (see :class:`~hessian_spectra.FSDPHessianOperator`),
so no other backend is needed to run any algorithm on them.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LinAlgBackend", "SingleDeviceBackend", "check_backend"]

V = TypeVar("V")

_METHODS = ("dot", "norm", "axpy", "scale", "zeros_like", "randn_like", "rademacher_like")


@runtime_checkable
class LinAlgBackend(Protocol[V]):
    """The vector operations an algorithm needs."""

    def dot(self, a: V, b: V) -> Tensor:
        """Inner product ``<a, b>`` as a 0-dim tensor."""
        ...

    def norm(self, a: V) -> Tensor:
        """Euclidean norm ``||a||`` as a 0-dim tensor."""
        ...

    def axpy(self, alpha: float | Tensor, a: V, b: V) -> V:
        """``alpha * a + b`` (BLAS axpy, functional form)."""
        ...

    def scale(self, alpha: float | Tensor, a: V) -> V:
        """``alpha * a``."""
        ...

    def zeros_like(self, a: V) -> V:
        """A zero vector shaped like ``a``."""
        ...

    def randn_like(self, a: V, *, generator: torch.Generator | None = None) -> V:
        """A standard Gaussian vector shaped like ``a``."""
        ...

    def rademacher_like(self, a: V, *, generator: torch.Generator | None = None) -> V:
        """A vector of independent ``+-1`` entries shaped like ``a``."""
        ...


def _draw_on(a: Tensor, generator: torch.Generator | None) -> torch.device:
    """Where to draw random numbers: the generator's device (a CPU generator with a CUDA
    tensor draws on the CPU and moves the result)."""
    return a.device if generator is None else generator.device


class SingleDeviceBackend:
    """:class:`LinAlgBackend` for plain tensors on one device.

    Example:
        >>> b = SingleDeviceBackend()
        >>> x = torch.tensor([3.0, 4.0])
        >>> float(b.norm(x)), float(b.dot(x, x)), b.axpy(2.0, x, x).tolist()
        (5.0, 25.0, [9.0, 12.0])
    """

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.dot(a.reshape(-1), b.reshape(-1))

    def norm(self, a: Tensor) -> Tensor:
        return torch.linalg.vector_norm(a)

    def axpy(self, alpha: float | Tensor, a: Tensor, b: Tensor) -> Tensor:
        return alpha * a + b

    def scale(self, alpha: float | Tensor, a: Tensor) -> Tensor:
        return alpha * a

    def zeros_like(self, a: Tensor) -> Tensor:
        return torch.zeros_like(a)

    def randn_like(self, a: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        dev = _draw_on(a, generator)
        out = torch.randn(a.shape, dtype=a.dtype, device=dev, generator=generator)
        return out.to(a.device)

    def rademacher_like(self, a: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        dev = _draw_on(a, generator)
        bits = torch.randint(0, 2, a.shape, device=dev, generator=generator)
        return (bits.to(a.dtype) * 2 - 1).to(a.device)

    def __repr__(self) -> str:
        return "SingleDeviceBackend()"


def check_backend(backend: object, fn: str) -> None:
    """Accept ``None`` or a :class:`SingleDeviceBackend`; refuse anything else clearly.

    The algorithms do their arithmetic on blocks of vectors with torch directly,
    which is what :class:`SingleDeviceBackend` describes; a backend of another
    kind cannot change that, so it is refused rather than ignored.
    """
    if backend is None or isinstance(backend, SingleDeviceBackend):
        return
    missing = [m for m in _METHODS if not callable(getattr(backend, m, None))]
    what = (
        f"an object without {', '.join(missing)}"
        if missing
        else f"a custom backend ({type(backend).__name__})"
    )
    raise TypeError(
        f"{fn}: backend must be None or a SingleDeviceBackend, got {what}. The algorithms run "
        "on plain (or FSDP-gathered) tensors; pass backend=None"
    )
