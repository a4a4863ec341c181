"""The vector space an algorithm runs in: plain vectors, or vectors split across ranks.

An algorithm enters :func:`vector_space` with its operator. For an operator on
plain vectors nothing changes. For one whose :attr:`~CurvatureOperator.backend`
is a :class:`~hessian_spectra.linalg.ShardedBackend`, every tensor of length
``n`` an algorithm holds is this rank's slice; the few places where the
algorithms reduce over ``n`` (:func:`~._common.gram`, :func:`~._common.norm64`,
the random draws, the largest entry that fixes a rescaling) ask this module, which
sums over the ranks, and :func:`dimension` gives the global ``n`` where a limit
needs it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from hessian_spectra.linalg.backend import ShardedBackend

__all__ = [
    "allreduce_max",
    "allreduce_sum",
    "dimension",
    "local_generator",
    "sharded",
    "vector_space",
]

_ACTIVE: contextvars.ContextVar[ShardedBackend | None] = contextvars.ContextVar(
    "hessian_spectra_vector_space", default=None
)


@contextlib.contextmanager
def vector_space(op: Any) -> Iterator[ShardedBackend | None]:
    """Run the block inside ``op``'s vector space (sharded or not)."""
    backend = getattr(op, "backend", None)
    token = _ACTIVE.set(backend if isinstance(backend, ShardedBackend) else None)
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def allreduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks holding slices of the vectors (``t`` itself otherwise)."""
    space = _ACTIVE.get()
    return t if space is None else space.allreduce_sum(t).to(t.dtype)


def sharded() -> bool:
    """Whether the running algorithm's vectors are slices split across ranks."""
    return _ACTIVE.get() is not None


def allreduce_max(value: float) -> float:
    space = _ACTIVE.get()
    return value if space is None else space.allreduce_max(value)


def dimension(local: int) -> int:
    """The global length of vectors whose local slice has ``local`` entries."""
    space = _ACTIVE.get()
    return local if space is None else space.size


def local_generator(generator: torch.Generator) -> torch.Generator:
    """``generator`` itself, or for sliced vectors one for this rank's slice."""
    space = _ACTIVE.get()
    return generator if space is None else space.local_generator(generator)
