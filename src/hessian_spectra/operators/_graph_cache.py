"""Differentiable gradients kept between the Hessian products of one algorithm run.

A Hessian product of one batch is a forward pass and a ``create_graph``
backward (the gradient ``g`` as a graph), then a second backward through that
graph per block of vectors. The first two do not depend on the vectors, so while
the model and the data stay as they are they can be done once and the graphs
kept: every later block costs only its second backward. On small models the
forward and the first backward are a large share of a product (about 40% of a
block of four on the benchmark's MLP), so inside a Krylov run this is the
difference between a product costing about one gradient and a fraction of one.

The graphs live only inside
:meth:`~hessian_spectra.operators.base.CurvatureOperator.keep_graphs` (every
algorithm opens it around its own products, where nothing but the algorithm
runs) and are dropped when it closes: correctness never rests on detecting that
the model, the loss or the data changed. Inside the block a graph is used again
only for the same batch tensors (memory, shape, strides, autograd version: a
loader that yields new tensors on every pass gets new graphs), and only while the
tensors the graphs save, all batches together, fit in a byte budget (counted
with :func:`torch.autograd.graph.saved_tensors_hooks` while the graphs are built;
storage shared with the parameters is not counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["GraphCache"]


class GraphCache:
    """Per-batch differentiable gradients, kept within a byte budget.

    Attributes:
        budget: the most bytes the graphs' saved tensors may take (``0``: keep nothing).
        nbytes: bytes counted for what is kept.
        disabled: the graphs did not fit in ``budget``; nothing is kept until
            :meth:`clear` (the end of the block) or a new budget.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        # index -> (batch key, gradient with its graph, bytes, the batch itself: held so
        # its memory is not reused by other data while the key refers to it)
        self.graphs: dict[Any, tuple[tuple[Any, ...], tuple[Tensor | None, ...], int, Any]] = {}
        self.nbytes = 0
        self.disabled = False

    def clear(self) -> None:
        """Drop every kept graph (the memory returns once nothing else holds it)."""
        self.graphs.clear()
        self.nbytes = 0
        self.disabled = False

    def set_budget(self, budget: int) -> None:
        """Take the current budget; a new one drops what is kept."""
        if budget != self.budget:
            self.budget = int(budget)
            self.clear()

    @staticmethod
    def batch_key(batch: Any) -> tuple[Any, ...]:
        """What a batch's tensors are: memory, shape, strides, dtype and autograd version
        (an in-place change bumps the version, which views share with their base). The
        cache holds the tensors of every batch it keeps, so their memory cannot be reused
        by other data; a microbatch sliced again from the same tensor matches."""
        leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, Tensor)]
        if not leaves:  # a container pytree does not open (e.g. a UserDict): the object itself
            return (id(batch),)
        return tuple(
            (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)
            for t in leaves
        )

    def get(self, index: Any, batch: Any) -> tuple[tuple[Tensor | None, ...], int] | None:
        """The kept gradient of batch ``index`` and the bytes its graph saves, if it was
        built from these tensors."""
        hit = self.graphs.get(index)
        if hit is None or hit[0] != self.batch_key(batch):
            return None
        return hit[1], hit[2]

    @property
    def active(self) -> bool:
        """Whether a graph built now would be offered (budget left, not disabled)."""
        return self.budget > 0 and not self.disabled

    @staticmethod
    @staticmethod
    def saved_bytes(roots: Sequence[Tensor | None], params: Sequence[Tensor]) -> int:
        """Bytes of the tensors the autograd graph behind ``roots`` saves for backward
        (distinct storages not shared with ``params``), read from the graph's nodes.

        The graph is walked once; saved tensors are read from each node's ``_saved_*``
        attributes. (A saved-tensor pack hook that returns the tensor would see them
        as they are saved, but it makes a node that saves its own output hold that
        output through a Python reference: a cycle through the autograd graph that
        the garbage collector cannot see, which kept every such graph alive.)
        """
        skip = {p.untyped_storage().data_ptr() for p in params}
        seen_nodes: set[Any] = set()
        seen: set[int] = set()
        total = 0
        stack: list[Any] = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen_nodes:
                continue
            seen_nodes.add(node)
            for name in dir(node):
                if not name.startswith("_saved_"):
                    continue
                try:
                    value = getattr(node, name)
                except (RuntimeError, AttributeError):  # freed, or not a tensor field
                    continue
                for t in value if isinstance(value, tuple | list) else (value,):
                    if not isinstance(t, Tensor):
                        continue
                    try:
                        st = t.untyped_storage()
                        ptr = st.data_ptr()
                    except (RuntimeError, NotImplementedError):  # tensors without storage
                        continue
                    if ptr not in skip and ptr not in seen:
                        seen.add(ptr)
                        total += st.nbytes()
            stack.extend(f for f, _ in node.next_functions)
        return total

    def offer(self, index: Any, batch: Any, grads: tuple[Tensor | None, ...], nbytes: int) -> None:
        """Keep ``grads`` for ``index`` if everything kept stays within the budget;
        else keep nothing until :meth:`clear`."""
        if not self.active:
            return
        old = self.graphs.pop(index, None)
        if old is not None:  # rebuilt for new tensors: the old graph goes
            self.nbytes -= old[2]
        if self.nbytes + nbytes > self.budget:
            self.clear()
            self.disabled = True
            return
        self.graphs[index] = (self.batch_key(batch), grads, nbytes, batch)
        self.nbytes += nbytes
