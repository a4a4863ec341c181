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
:data:`GGN_ROW_FACTOR`, :data:`ROW_VECTORS`).

The default budget is tied to the model's own training step, not to the
machine: :data:`BUDGET_STEPS` times ``s + STEP_VECTORS v`` (:func:`step_bytes`:
the tensors the batch's graph saves, at least a training step's activations,
plus the parameters, their gradient and two optimizer moments). That is below
one row's budget for either operator (``2 s + 8 v < 2 s + 16 v``;
``2 s + 8 v < 4 s + 16 v``), so by default every pass takes one row: a block
of any size peaks at about the memory of one product. A small model (a training
step under :data:`SMALL_STEP_BYTES`, 16 MiB), whose products cost mostly the fixed
cost of a call, may take up to :data:`SMALL_PASS_BYTES` (64 MiB) a pass, so its
rows share vmapped passes. ``python
bench/block_choice.py --kept`` (float32, CPU, peak RSS growth over a training
step's): a default block of 8 peaked at 2.9-3.5x a training step on CNNs and
3.2-6.1x on transformers where one product took 2.1-3.1x, and 8 vmapped rows
(the old default, half of the free memory) 6.9-14.2x (``docs/operators.md``).
More rows per pass only when asked, through ``block_bytes``.
"""

from __future__ import annotations

import os

import torch

__all__ = [
    "BUDGET_STEPS",
    "GGN_ROW_FACTOR",
    "HESSIAN_ROW_FACTOR",
    "ROW_VECTORS",
    "SMALL_PASS_BYTES",
    "SMALL_STEP_BYTES",
    "STEP_VECTORS",
    "budget_bytes",
    "default_budget",
    "free_bytes",
    "rows_per_pass",
    "step_bytes",
]

HESSIAN_ROW_FACTOR = 2.0
"""Bytes a row of the Hessian's second backward is budgeted, per byte the batch's
graph (forward and ``create_graph`` backward) saves."""

GGN_ROW_FACTOR = 4.0
"""Bytes a row of the GGN's ``J V`` and ``Jᵀ U`` is budgeted, per byte the batch's
forward saves."""

ROW_VECTORS = 16
"""Parameter-sized vectors a row of a vmapped pass is budgeted besides the graph's."""

STEP_VECTORS = 4
"""Parameter-sized vectors of a training step besides its activations: the
parameters, their gradient and two optimizer moments (Adam)."""

BUDGET_STEPS = 2
"""Training steps (:func:`step_bytes`) the rows of one pass may take by default."""

SMALL_STEP_BYTES = 16 * 2**20
"""A training step (:func:`step_bytes`) at most this large is a small model's, whose
products cost mostly the fixed cost of each call (the timing-free rule still has
to let its rows share a pass: a seed usage example's GGN trace on a small MLP
took 4x longer one row at a time than in vmapped blocks)."""

SMALL_PASS_BYTES = 64 * 2**20
"""The default bytes of one pass on a small model (:data:`SMALL_STEP_BYTES`), when
more than :data:`BUDGET_STEPS` of its training steps."""


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


def step_bytes(saved_bytes: int, vector_bytes: int) -> int:
    """The footprint of a training step on the batch, as the operators count it: the
    bytes the batch's graph saves plus :data:`STEP_VECTORS` parameter vectors."""
    return int(saved_bytes) + STEP_VECTORS * int(vector_bytes)


def default_budget(saved_bytes: int, vector_bytes: int) -> int:
    """The default bytes of one pass's rows: :data:`BUDGET_STEPS` training steps
    (:func:`step_bytes`); for a small model, whose training step takes at most
    :data:`SMALL_STEP_BYTES`, at least :data:`SMALL_PASS_BYTES`."""
    step = step_bytes(saved_bytes, vector_bytes)
    if step <= SMALL_STEP_BYTES:
        return max(BUDGET_STEPS * step, SMALL_PASS_BYTES)
    return BUDGET_STEPS * step


def budget_bytes(block_bytes: int | None) -> int | None:
    """``block_bytes`` checked: a positive number of bytes, or ``None`` for the default
    (:func:`default_budget` of each batch, applied by :func:`rows_per_pass`).

    Raises:
        ValueError: ``block_bytes`` is not ``None`` or a positive int.
    """
    if block_bytes is None:
        return None
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
        raise ValueError(
            f"block_bytes must be a positive number of bytes or None (the default: "
            f"{BUDGET_STEPS} training steps' memory, one row per pass), got {block_bytes!r}"
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
    (``None``: :func:`default_budget`) at ``factor * saved_bytes + ROW_VECTORS *
    vector_bytes`` a row; at least 1."""
    if budget is None:
        budget = default_budget(saved_bytes, vector_bytes)
    per_row = factor * saved_bytes + ROW_VECTORS * vector_bytes
    if per_row <= 0:
        return cap
    return max(1, min(cap, int(budget // per_row)))
