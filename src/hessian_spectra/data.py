"""Iterating a dataset as weighted (micro)batches.

An operator over data averages exactly as the loss over the union of all batches
would: with mean-reduced per-batch losses ``L_b`` over ``n_b`` samples,

.. math::

    L = \\sum_b \\frac{n_b}{N} L_b, \\qquad N = \\sum_b n_b,

so each (micro)batch carries the weight ``n_b / N``. Weighting every batch
equally instead is a known error elsewhere (2.9x for a 250/6 split).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BatchSizeFn",
    "WeightedBatch",
    "WeightedBatches",
    "default_batch_size",
    "move_batch",
    "slice_batch",
]

BatchSizeFn = Callable[[Any], int]

_CACHE_BYTES = 1 << 30  # cache a loader's batches when they fit in 1 GiB


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("input_ids", "labels", "x", "inputs"):
            if isinstance(batch.get(key), Tensor) and batch[key].dim() > 0:
                return batch[key]
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, list | tuple):
        values = batch
    else:
        return None
    for v in values:
        t = _first_tensor(v)
        if t is not None and t.dim() > 0:
            return t
    return None


def default_batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor.

    Looks into tuples, lists and dicts (``input_ids``/``labels`` first).

    Raises:
        TypeError: when the batch holds no tensor with a leading dimension;
            pass ``batch_size_fn=`` to the operator then.
    """
    t = _first_tensor(batch)
    if t is None:
        raise TypeError(
            f"cannot infer the number of samples of a batch of type {type(batch).__name__}: no tensor "
            "with a leading batch dimension found; pass batch_size_fn=lambda batch: <count>"
        )
    return int(t.shape[0])


def slice_batch(batch: Any, start: int, stop: int, n: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``batch`` whose leading dimension is ``n``."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return type(batch)(**{k: slice_batch(v, start, stop, n) for k, v in batch.items()}) if not isinstance(
            batch, dict
        ) else {k: slice_batch(v, start, stop, n) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, start, stop, n) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(slice_batch(v, start, stop, n) for v in batch)
    return batch


def move_batch(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor moved to ``device`` (no copy when already there)."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, Mapping):
        try:
            return type(batch)(**{k: move_batch(v, device) for k, v in batch.items()})
        except TypeError:
            return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_batch(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        try:
            return batch.to(device)
        except Exception:  # noqa: BLE001 - not a tensor-like after all
            return batch
    return batch


def _nbytes(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, list | tuple):
        return sum(_nbytes(v) for v in batch)
    return 0


@dataclass(frozen=True)
class WeightedBatch:
    """One (micro)batch and its weight ``n_b / N`` in the dataset average.

    ``index`` is a stable ``(batch, microbatch)`` position, used to seed dropout
    so the same batch draws the same masks in every product.
    """

    index: tuple[int, int]
    batch: Any
    size: int
    weight: float


class WeightedBatches:
    """A fixed, re-iterable sequence of weighted (micro)batches.

    Args:
        dataloader: any iterable of batches (list, ``DataLoader``, generator).
        full_dataset: use every batch (default). ``False`` uses the first
            ``num_batches`` (default 1).
        num_batches: use only the first ``num_batches`` batches.
        microbatch_size: split each batch into chunks of at most this many
            samples (weights follow the chunk sizes).
        batch_size_fn: ``batch -> number of samples``; default
            :func:`default_batch_size`.
        device: move batches there when iterating.
        cache: keep the batches in memory (on ``device``) between products.
            ``None`` caches any loader that is not a list/tuple when it fits in
            1 GiB, so a shuffling ``DataLoader`` still gives one fixed matrix.

    The total sample count ``N`` is counted once at construction; a distributed
    operator replaces it with the global count through :meth:`set_total`.
    """

    def __init__(
        self,
        dataloader: Iterable[Any],
        *,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        device: torch.device | str | None = None,
        cache: bool | None = None,
    ) -> None:
        if dataloader is None or not isinstance(dataloader, Iterable):
            raise TypeError(
                "dataloader must be an iterable of batches (a list of (x, y) tuples, a DataLoader, ...), "
                f"got {type(dataloader).__name__}"
            )
        if isinstance(dataloader, Tensor | Mapping):
            raise TypeError(
                f"dataloader must be an iterable of batches, got a single {type(dataloader).__name__}; "
                "wrap one batch in a list: [batch]"
            )
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        if microbatch_size is not None and (not isinstance(microbatch_size, int) or microbatch_size < 1):
            raise ValueError(f"microbatch_size must be a positive int or None, got {microbatch_size!r}")
        if not full_dataset and num_batches is None:
            num_batches = 1
        self._loader = dataloader
        self._limit = num_batches
        self.microbatch_size = microbatch_size
        self._size_fn = batch_size_fn or default_batch_size
        self.device = torch.device(device) if device is not None else None

        is_sequence = isinstance(dataloader, Sequence)
        one_shot = iter(dataloader) is dataloader  # a generator/iterator: can only be read once
        batches: list[Any] = []
        sizes: list[int] = []
        nbytes = 0
        for i, b in enumerate(dataloader):
            if self._limit is not None and i >= self._limit:
                break
            sizes.append(self._checked_size(b, i))
            if cache is not False:
                batches.append(b)
                nbytes += _nbytes(b)
        if not sizes:
            raise ValueError("the dataloader yielded no batches")
        if cache is None:
            cache = one_shot or self._limit is not None or (not is_sequence and nbytes <= _CACHE_BYTES)
        if one_shot and not cache:
            raise ValueError("a one-shot iterator of batches must be cached; pass cache=True or a list")
        if not cache and _shuffles(dataloader):
            warnings.warn(
                "the dataloader shuffles and its batches are not cached (over 1 GiB): BatchNorm and dropout "
                "will see different batches in every product, so the operator is not one fixed matrix. "
                "Pass cache=True or a loader with shuffle=False.",
                stacklevel=3,
            )
        self._cached = [move_batch(b, self.device) for b in batches] if cache else None
        self._sizes = sizes
        self.local_samples = sum(sizes)
        self.total_samples = self.local_samples

    def _checked_size(self, batch: Any, i: int) -> int:
        n = self._size_fn(batch)
        if not isinstance(n, int | torch.SymInt) and not (isinstance(n, Tensor) and n.numel() == 1):
            raise TypeError(f"batch_size_fn must return an int, got {type(n).__name__} for batch {i}")
        n = int(n)
        if n < 0:
            raise ValueError(f"batch_size_fn returned {n} for batch {i}; sample counts must be >= 0")
        return n

    @property
    def num_batches(self) -> int:
        return len(self._sizes)

    def set_total(self, total: int) -> None:
        """Use ``total`` as ``N`` in the weights (the global count across ranks)."""
        if total <= 0:
            raise ValueError(f"total sample count must be positive, got {total}")
        self.total_samples = int(total)

    def _raw(self) -> Iterator[Any]:
        if self._cached is not None:
            yield from self._cached
            return
        for i, b in enumerate(self._loader):
            if i >= len(self._sizes):
                break
            yield move_batch(b, self.device)

    def __iter__(self) -> Iterator[WeightedBatch]:
        N = self.total_samples
        if N <= 0:
            return
        for i, (b, n) in enumerate(zip(self._raw(), self._sizes, strict=False)):
            if n == 0:
                continue
            mb = self.microbatch_size
            if mb is None or mb >= n:
                yield WeightedBatch((i, 0), b, n, n / N)
                continue
            for j, start in enumerate(range(0, n, mb)):
                stop = min(n, start + mb)
                part = slice_batch(b, start, stop, n)
                m = self._size_fn(part) if self._size_fn is not default_batch_size else stop - start
                if m:
                    yield WeightedBatch((i, j), part, int(m), int(m) / N)

    def __len__(self) -> int:
        return len(self._sizes)


def _shuffles(loader: Any) -> bool:
    sampler = getattr(loader, "sampler", None)
    return sampler is not None and type(sampler).__name__ == "RandomSampler"
