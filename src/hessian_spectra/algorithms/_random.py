"""Randomness for the algorithms: one ``torch.Generator``, never the global RNG.

Every algorithm takes ``seed: int | torch.Generator | None`` and normalises it
once with :func:`make_generator`; every random draw then goes through that
generator. ``seed=None`` seeds a fresh generator from :func:`os.urandom`, so the
global RNG state (``torch.manual_seed``) is neither read nor advanced.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from hessian_spectra.algorithms._space import local_generator

__all__ = ["Seed", "gaussian", "make_generator", "rademacher", "random_block"]

Seed = int | torch.Generator | None
Distribution = Literal["rademacher", "gaussian"]


def make_generator(seed: Seed, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` for ``seed``.

    Args:
        seed: an ``int`` (reproducible), a ``torch.Generator`` (used as is; its
            state advances), or ``None`` (fresh entropy from ``os.urandom``).
        device: where random tensors are needed; a new generator is made on this
            device (a given generator keeps its own device: draws are made there
            and moved).

    Raises:
        TypeError: for any other type of ``seed``.
    """
    if isinstance(seed, torch.Generator):
        return seed
    device = torch.device(device)
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little")
    elif isinstance(seed, int) and not isinstance(seed, bool):
        value = seed
    else:
        raise TypeError(
            f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}; "
            "pass seed=0 for reproducible results"
        )
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {value}")
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen


def rademacher(
    k: int, n: int, generator: torch.Generator, *, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """A ``(k, n)`` block of independent signs ``+-1`` (this rank's slice of sharded vectors)."""
    device = torch.device(device)
    generator = local_generator(generator)
    bits = torch.randint(
        0, 2, (k, n), generator=generator, device=generator.device, dtype=torch.int8
    )
    return (bits.to(device=device, dtype=dtype) * 2 - 1).to(dtype)


def gaussian(
    k: int, n: int, generator: torch.Generator, *, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """A ``(k, n)`` block of independent standard normal entries (drawn in float32 or float64;
    this rank's slice of sharded vectors)."""
    device = torch.device(device)
    generator = local_generator(generator)
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(k, n, generator=generator, device=generator.device, dtype=draw_dtype)
    return z.to(device=device, dtype=dtype)


def random_block(
    distribution: str,
    k: int,
    n: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """``rademacher`` or ``gaussian`` by name; other names raise ``ValueError``."""
    if distribution == "rademacher":
        return rademacher(k, n, generator, dtype=dtype, device=device)
    if distribution == "gaussian":
        return gaussian(k, n, generator, dtype=dtype, device=device)
    raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
