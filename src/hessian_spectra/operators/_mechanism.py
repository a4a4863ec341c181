"""A block of ``k`` rows through one batched (``vmap``) pass or a loop, by a fixed rule.

The Hessian operator's second backward and the GGN operator's ``J V`` and
``Jᵀ U`` can each run over a block's rows as one vmapped pass or one pass per
row. The choice is a function of the operator's settings and the memory budget
alone, never of timings, so the same operator and vectors take the same path
(and give the same bits) on every run, whatever the machine's load:

* ``"loop"``: one pass per row;
* ``"vmap"``: one vmapped pass per chunk of rows;
* ``"auto"`` (the default): a vmapped pass for a chunk of two or more rows, a
  single pass for a chunk of one. The chunks come from the memory budget
  (:mod:`~hessian_spectra.operators._chunks`), whose default admits one row a
  pass, so by default the rows loop and vmap runs only where ``block_bytes``
  was raised to pay memory for it.

Why no row is vmapped by default: a vmapped pass of ``k`` rows holds about ``k``
rows' intermediates, and it was not faster per vector on the CPU. On the
benchmark's float64 CPU workloads vmap was 1.7x faster than the loop on the MLP
but within about 10% on the CNN (a convolution's double backward has no batched
CPU kernel) and on the transformer (``docs/benchmarks.md``), and on a 2.8M
parameter CNN and a 3.3M parameter GPT-2-style LM in float32 a vmapped block of
8 cost 10.7-10.9x a training step in time and 9-11x in memory without being
cheaper per vector than single products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["MECHANISMS", "run_block"]

R = TypeVar("R")

MECHANISMS = ("auto", "vmap", "loop")


def run_block(
    mechanism: str,
    k: int,
    batched: Callable[[], R],
    single: Callable[[int], Any],
    combine: Callable[[list[Any]], R],
    on_vmap_failure: Callable[[BaseException], None] | None = None,
) -> tuple[R, str]:
    """A chunk of ``k`` rows by ``mechanism``, and the mechanism to use from now on.

    Args:
        mechanism: ``"loop"`` (``combine`` of ``single(i)`` for every row),
            ``"vmap"`` or ``"auto"`` (both: ``batched()`` for two or more rows,
            ``single(0)`` for one).
        k: rows in the chunk.
        batched, single, combine: the two ways to compute the chunk.
        on_vmap_failure: called with the error when ``batched()`` fails (the
            chunk then loops, and so do later ones).

    Returns:
        ``(chunk, mechanism)``: ``mechanism`` unchanged, or ``"loop"`` after vmap failed.
    """
    if k == 1 or mechanism == "loop":
        return combine([single(i) for i in range(k)]), mechanism
    try:
        return batched(), mechanism
    except (RuntimeError, ValueError, NotImplementedError) as err:
        out = combine([single(i) for i in range(k)])  # raises the real error if any
        if on_vmap_failure is not None:
            on_vmap_failure(err)
        return out, "loop"
