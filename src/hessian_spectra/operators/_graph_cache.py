"""Differentiable gradients kept between Hessian products.

A Hessian product of one batch is a forward pass and a ``create_graph``
backward (the gradient ``g`` as a graph), then a second backward through that
graph per block of vectors. The first two do not depend on the vectors, so for
a fixed model and data set they can be done once and the graphs kept: every
later block costs only its second backward. On small models the forward and the
first backward are a large share of a product (about 40% of a block of four on
the benchmark's MLP), so this is the difference between a product costing about
one gradient and a fraction of one.

Kept only while it is safe and cheap:

* the batch is made of the same tensors as when its graph was built (same
  memory, shape, strides and autograd version: an in-place change bumps the
  version; the cache holds the batch, so its memory is not reused meanwhile);
* the tensors the graphs save, all batches together, fit in a byte budget
  (counted with :func:`torch.autograd.graph.saved_tensors_hooks` while the graphs
  are built; storage shared with the parameters is not counted);
* nothing the graphs depend on has changed: before each product the parameters
  and buffers are compared with copies taken when the graphs were built (any
  change, also through ``.data``, drops the graphs), as are the dropout seed and
  every module's train/eval flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = ["GraphCache"]


class GraphCache:
    """Per-batch differentiable gradients, valid for one state of the model.

    Attributes:
        budget: the most bytes kept: the graphs' saved tensors plus the copy of
            the parameters and buffers that checks them (``0``: keep nothing).
        nbytes: bytes counted so far for what is kept.
        disabled: a state did not fit in ``budget``; nothing is kept (and nothing
            copied) until the budget changes.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        # index -> (batch key, gradient with its graph, bytes, the batch itself: held so
        # its memory is not reused by other data while the key refers to it)
        self.graphs: dict[Any, tuple[tuple[Any, ...], tuple[Tensor | None, ...], int, Any]] = {}
        self.nbytes = 0
        self.disabled = False
        self._key: tuple[Any, ...] | None = None
        self._values: list[Tensor] = []

    def clear(self) -> None:
        """Drop every kept graph and the copies (the memory returns once nothing else
        holds it)."""
        self.graphs.clear()
        self.nbytes = 0
        self._key = None
        self._values = []

    @staticmethod
    def _state(
        model: nn.Module, params: Sequence[Tensor], seed: Any
    ) -> tuple[tuple[Any, ...], list[Tensor]]:
        key = (
            seed,
            tuple(m.training for m in model.modules()),
            tuple(p.data_ptr() for p in params),
        )
        return key, [p.detach() for p in params] + [b.detach() for b in model.buffers()]

    def sync(self, model: nn.Module, params: Sequence[Tensor], seed: Any, budget: int) -> None:
        """Take the current budget, and drop the graphs if the model, its parameters,
        buffers, modes or the seed changed since they were built (one host
        synchronisation per device for the value comparison)."""
        if budget != self.budget:
            self.budget, self.disabled = int(budget), False
            self.clear()
        if self._key is None:
            return
        key, values = self._state(model, params, seed)
        if (
            key != self._key
            or len(values) != len(self._values)
            or any(a.shape != b.shape for a, b in zip(values, self._values, strict=True))
        ):
            self.clear()
            return
        flags: dict[torch.device, list[Tensor]] = {}
        for a, b in zip(values, self._values, strict=True):
            flags.setdefault(a.device, []).append((a == b).all())
        if not all(bool(torch.stack(f).all()) for f in flags.values()):
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
    @contextlib.contextmanager
    def counting(params: Sequence[Tensor]) -> Iterator[list[int]]:
        """Count the bytes of the tensors saved for backward inside the block
        (distinct storages not shared with ``params``); yields a one-item list."""
        skip = {p.untyped_storage().data_ptr() for p in params}
        seen: set[int] = set()
        total = [0]

        def pack(t: Tensor) -> Tensor:
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in skip and ptr not in seen:
                    seen.add(ptr)
                    total[0] += st.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without storage
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield total

    def offer(
        self,
        index: Any,
        batch: Any,
        grads: tuple[Tensor | None, ...],
        nbytes: int,
        model: nn.Module,
        params: Sequence[Tensor],
        seed: Any,
    ) -> None:
        """Keep ``grads`` for ``index`` if everything kept stays within the budget;
        else keep nothing (and copy nothing) until the budget changes."""
        if not self.active:
            return
        if self._key is None:  # the first graph of this state: the copies come first
            key, values = self._state(model, params, seed)
            copy_bytes = sum(v.numel() * v.element_size() for v in values)
            if copy_bytes + nbytes > self.budget:
                self.disabled = True
                return
            self._key, self._values = key, [v.clone() for v in values]
            self.nbytes = copy_bytes
        if self.nbytes + nbytes > self.budget:
            self.clear()
            self.disabled = True
            return
        old = self.graphs.pop(index, None)
        if old is not None:  # rebuilt for new tensors: the old graph goes
            self.nbytes -= old[2]
        self.graphs[index] = (self.batch_key(batch), grads, nbytes, batch)
        self.nbytes += nbytes
