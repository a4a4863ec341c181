"""A block of ``k`` rows through one batched (``vmap``) pass or a loop, whichever is faster.

The Hessian operator's second backward and the GGN operator's ``J V`` and
``Jᵀ U`` can each run over a block's rows as one vmapped pass or one pass per
row. Which is faster depends on the model and the device (on the CPU a vmap
over convolutions runs one kernel per row anyway, plus the batching overhead),
so :func:`run_block` measures it on the first block of two or more rows and
the caller keeps the answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["MEASURE_ROUNDS", "MECHANISMS", "run_block"]

R = TypeVar("R")

MECHANISMS = ("auto", "vmap", "loop")

MEASURE_ROUNDS = 2
"""Rounds of the vmap-or-loop measurement (each times both; the best of each counts)."""


def run_block(
    mechanism: str,
    k: int,
    batched: Callable[[], R],
    single: Callable[[int], Any],
    combine: Callable[[list[Any]], R],
    probe: Tensor,
    on_vmap_failure: Callable[[BaseException], None] | None = None,
) -> tuple[R, str, dict[str, float] | None]:
    """A block of ``k`` rows by ``mechanism``, and the mechanism to use from now on.

    Args:
        mechanism: ``"vmap"`` (``batched()``), ``"loop"`` (``combine`` of
            ``single(i)`` for every row) or ``"auto"``: on a block of two or more
            rows, time ``batched()`` (its result is kept) and two single rows
            scaled to ``k``, interleaved over :data:`MEASURE_ROUNDS` rounds
            (``batched()`` runs once more between them), and keep the faster by
            the best time of each. The first ``batched()`` pays vmap's one-time
            set-up, which can only count against it. The rows returned come from
            the mechanism kept, so later blocks give the same bits.
        k: rows in the block.
        batched, single, combine: the two ways to compute the block.
        probe: a tensor on the device (synchronised around the timings on CUDA).
        on_vmap_failure: called with the error when ``batched()`` fails (the
            block then loops, and so do later ones).

    Returns:
        ``(block, mechanism, timings)``; ``timings`` is ``{"rows", "vmap", "loop"}``
        (seconds per block) when this call measured, else ``None``.
    """
    if k == 1 or mechanism == "loop":
        return combine([single(i) for i in range(k)]), mechanism, None
    measure = mechanism == "auto"
    t0 = _now(probe) if measure else 0.0  # no device sync outside the measurement
    try:
        res = batched()
    except (RuntimeError, ValueError, NotImplementedError) as err:
        out = combine([single(i) for i in range(k)])  # raises the real error if any
        if on_vmap_failure is not None:
            on_vmap_failure(err)
        return out, "loop", None
    if not measure:
        return res, mechanism, None
    t_vmap, t_loop = _now(probe) - t0, math.inf
    head: list[Any] = []
    for r in range(MEASURE_ROUNDS):  # interleaved, best of each: a burst of load hits both
        if r:
            t0 = _now(probe)
            batched()
            t_vmap = min(t_vmap, _now(probe) - t0)
        t0 = _now(probe)
        head = [single(0), single(1)]
        t_loop = min(t_loop, (_now(probe) - t0) * k / 2)
    timings = {"rows": float(k), "vmap": t_vmap, "loop": t_loop}
    if t_vmap <= t_loop:
        return res, "vmap", timings
    return combine(head + [single(i) for i in range(2, k)]), "loop", timings


def _now(probe: Tensor) -> float:
    """``time.perf_counter()`` after the device's queued work (CUDA) has finished."""
    if probe.device.type == "cuda":
        torch.cuda.synchronize(probe.device)
    return time.perf_counter()
