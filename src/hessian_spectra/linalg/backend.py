"""Vector-arithmetic backends: how an algorithm's vectors are stored and combined.

The algorithms here work on blocks of vectors, one per row of a ``(k, n)``
tensor, and do their arithmetic with torch on the operator's device. A
:class:`LinAlgBackend` names the handful of vector operations an algorithm
needs (``dot``, ``norm``, ``axpy``, ``scale``, ``zeros_like``, ``randn_like``,
``rademacher_like``) so that code written against it does not care where the
numbers live. :class:`SingleDeviceBackend` implements them for plain tensors on
one device; it is the default of every algorithm's ``backend=`` argument.

:class:`ShardedBackend` is the backend of vectors split across processes like
the parameters of an FSDP model: each rank holds its own slice, elementwise
operations stay local and every inner product or norm is summed over the ranks
(one all-reduce). An operator names its backend (:attr:`CurvatureOperator.backend`);
:meth:`~hessian_spectra.FSDPHessianOperator.sharded` gives an operator on
sharded vectors, and every algorithm runs on it unchanged, holding only this
rank's slice of its Krylov basis.

An algorithm's ``backend=`` argument may be ``None`` (the operator's own) or the
operator's backend; another one is refused, since the vectors' layout is the
operator's.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LinAlgBackend", "ShardedBackend", "SingleDeviceBackend", "check_backend"]

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


SINGLE_DEVICE = SingleDeviceBackend()
"""The backend of every operator on plain tensors."""


class ShardedBackend(SingleDeviceBackend):
    """:class:`LinAlgBackend` for vectors split across the ranks of a process group.

    Each rank holds ``local_size`` of the ``size`` entries; ``dot`` and ``norm``
    sum over the ranks (an all-reduce in float64), everything else is local.
    Random vectors are drawn independently on each rank (from a generator seeded
    by the caller's draw and the rank), so together they are one random vector.

    Args:
        size: the global dimension ``n``.
        local_size: this rank's share ``n_r``.
        process_group: the group the vectors are split over (``None``: the default).
    """

    def __init__(self, size: int, local_size: int, process_group: Any = None) -> None:
        import torch.distributed as dist

        self.size, self.local_size, self.process_group = int(size), int(local_size), process_group
        self.rank = dist.get_rank(process_group)

    def allreduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (in float64, in place when it already is)."""
        import torch.distributed as dist

        out = t.to(torch.float64).contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.process_group)
        return out

    def allreduce_max(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return float(t[0])

    def local_generator(self, generator: torch.Generator) -> torch.Generator:
        """A generator for this rank's slice: seeded by one draw of ``generator`` (the same
        on every rank, as the ranks share its seed) and the rank."""
        draw = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        g = torch.Generator(device=generator.device)
        g.manual_seed((draw * 1_000_003 + self.rank + 1) % 2**63)
        return g

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        return self.allreduce_sum(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))

    def norm(self, a: Tensor) -> Tensor:
        return self.allreduce_sum(a.double().pow(2).sum()).sqrt()

    def __repr__(self) -> str:
        return f"ShardedBackend(size={self.size}, local_size={self.local_size}, rank={self.rank})"


def check_backend(backend: object, fn: str, op: object = None) -> None:
    """Accept ``None``, or the operator's own backend (a :class:`SingleDeviceBackend` for
    operators on plain vectors); refuse anything else clearly.

    The algorithms do their arithmetic on blocks of vectors laid out as the
    operator's vectors are, so a backend other than the operator's cannot apply.
    """
    if backend is None:
        return
    own = getattr(op, "backend", None)
    if own is not None and backend is own:
        return
    if type(backend) is SingleDeviceBackend and not isinstance(own, ShardedBackend):
        return
    missing = [m for m in _METHODS if not callable(getattr(backend, m, None))]
    what = (
        f"an object without {', '.join(missing)}"
        if missing
        else f"a backend of another layout ({type(backend).__name__})"
    )
    raise TypeError(
        f"{fn}: backend must be None or the operator's own backend (a SingleDeviceBackend for "
        f"plain vectors), got {what}; pass backend=None to use the operator's"
    )
