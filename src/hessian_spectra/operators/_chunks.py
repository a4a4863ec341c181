"""How many rows of a block one batched pass may take, from a memory budget.

A vmapped pass over ``k`` rows (the Hessian's second backward, the GGN's
``J V`` and ``Jᵀ U``) holds about ``k`` times the intermediates of one row at
once. ``python bench/block_memory.py`` measures the extra peak memory per row of
a 32-row block on the benchmark's CPU models (``bench/results/cpu-block-memory.md``),
against the bytes each batch's graph saves (``s``) and one parameter vector
(``v``): the Hessian took 1.6, 12.9 and 17.4 MiB a row (MLP, CNN, LM) where
``2 s + 16 v`` gives 2.0, 14.1 and 28.3; the GGN (``s``: its forward's saved
bytes) took 1.3, 10.9 and 11.3 where ``4 s + 16 v`` gives 2.2, 14.6 and 25.3.
A row is budgeted by these formulas (:data:`HESSIAN_ROW_FACTOR`,
:data:`GGN_ROW_FACTOR`, :data:`ROW_VECTORS`); the budget defaults to half of the
device's free memory when the product starts.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "GGN_ROW_FACTOR",
    "HESSIAN_ROW_FACTOR",
    "ROW_VECTORS",
    "budget_bytes",
    "free_bytes",
    "rows_per_pass",
]

HESSIAN_ROW_FACTOR = 2.0
"""Bytes a row of the Hessian's second backward is budgeted, per byte the batch's
graph (forward and ``create_graph`` backward) saves."""

GGN_ROW_FACTOR = 4.0
"""Bytes a row of the GGN's ``J V`` and ``Jᵀ U`` is budgeted, per byte the batch's
forward saves."""

ROW_VECTORS = 16
"""Parameter-sized vectors a row of a vmapped pass is budgeted besides the graph's."""


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: ``torch.cuda.mem_get_info`` plus what
    torch's caching allocator holds unused; CPU: the available physical pages), or
    ``None`` where it cannot be read."""
    try:
        if device.type == "cuda":
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0] + cached)
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (RuntimeError, ValueError, OSError, AttributeError):
        return None
    return None


def budget_bytes(block_bytes: int | None, device: torch.device) -> int | None:
    """The bytes a chunk of rows may take: ``block_bytes``, or for ``None`` half of
    ``device``'s free memory (``None`` again where that cannot be read). Read once
    per product.

    Raises:
        ValueError: ``block_bytes`` is not ``None`` or a positive int.
    """
    if block_bytes is None:
        free = free_bytes(device)
        return None if free is None else free // 2
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
        raise ValueError(
            f"block_bytes must be a positive number of bytes or None (half the device's free "
            f"memory), got {block_bytes!r}"
        )
    return block_bytes


def rows_per_pass(
    saved_bytes: int,
    vector_bytes: int,
    budget: int | None,
    cap: int,
    factor: float = HESSIAN_ROW_FACTOR,
) -> int:
    """Rows of one batched pass: at most ``cap``, and as many as fit in ``budget`` bytes
    (from :func:`budget_bytes`; ``None``: just ``cap``) at
    ``factor * saved_bytes + ROW_VECTORS * vector_bytes`` a row; at least 1."""
    per_row = factor * saved_bytes + ROW_VECTORS * vector_bytes
    if budget is None or per_row <= 0:
        return cap
    return max(1, min(cap, int(budget // per_row)))
