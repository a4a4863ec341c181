"""Batches as the seed tools handle them: iterating, moving, and when splitting is safe.

Splitting a batch into microbatches (``microbatch_size=``) gives the same
operator only when every sample's loss depends on that sample alone. A
BatchNorm layer in train mode normalises with the statistics of the batch it
sees, so a microbatch of 4 normalises differently from the batch of 64 it came
from, and the matrix changes (a top Hessian eigenvalue of 1.375 became 1.466 on
a small BatchNorm MLP). :func:`assert_microbatch_safe` finds such layers;
operators call it whenever they would split a batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from hessian_spectra.data import move_batch

__all__ = [
    "assert_microbatch_safe",
    "batch_coupled_modules",
    "iterate_batches",
    "move_batch_to_device",
]


def batch_coupled_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules whose output for one sample depends on the other samples of the batch.

    These are the BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the
    lazy ones) that normalise with batch statistics: in train mode, or in eval mode
    without running statistics (``track_running_stats=False``). ``LayerNorm``,
    ``GroupNorm`` and ``InstanceNorm`` normalise within one sample and are not
    listed.

    Returns:
        ``(qualified name, module)`` pairs in ``model.named_modules()`` order
        (the name is ``""`` for the model itself).
    """
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats or m.running_mean is None
        ):
            out.append((name, m))
    return out


def assert_microbatch_safe(model: nn.Module) -> None:
    """Raise unless splitting a batch into microbatches leaves ``model``'s loss unchanged.

    Args:
        model: the module to check.

    Raises:
        ValueError: naming the layers that couple the samples of a batch (see
            :func:`batch_coupled_modules`), with the ways out.

    Example:
        >>> assert_microbatch_safe(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
        >>> bn = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> assert_microbatch_safe(bn.eval())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = batch_coupled_modules(model)
    if not found:
        return
    shown = ", ".join(f"{n or '<model>'!r} ({type(m).__name__})" for n, m in found[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    raise ValueError(
        f"microbatching would change the matrix: {shown}{more} normalise with the statistics "
        "of the batch they see (train mode, or no running statistics), so a microbatch "
        "normalises differently from the whole batch. Put the model in eval mode "
        "(model.eval()), leave microbatch_size unset, or pass microbatch_unsafe=True to accept "
        "the microbatches' statistics."
    )


def iterate_batches(source: Iterable[Any], num_batches: int | None = None) -> Iterator[Any]:
    """The batches of ``source``, at most ``num_batches`` of them (all for ``None``).

    Args:
        source: any iterable of batches (a list, a ``DataLoader``, a generator).
        num_batches: the most batches to yield; ``None`` for all.

    Raises:
        TypeError: ``source`` is not iterable.
        ValueError: ``num_batches`` is not ``None`` or an int >= 0.

    Example:
        >>> list(iterate_batches([1, 2, 3], num_batches=2))
        [1, 2]
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0
    ):
        raise ValueError(f"num_batches must be None or an int >= 0, got {num_batches!r}")
    if not isinstance(source, Iterable):
        raise TypeError(
            f"source must be an iterable of batches (a list, a DataLoader), got "
            f"{type(source).__name__}"
        )
    it = iter(source)
    yield from it if num_batches is None else itertools.islice(it, num_batches)


def move_batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device``, its structure kept.

    Tensors inside tuples, lists, namedtuples and mappings (``dict``, Hugging Face
    ``BatchEncoding``) are moved, recursively; objects with a ``.to(device)``
    method are moved with it; anything else is returned as it is. A tensor
    already on ``device`` is not copied.

    Example:
        >>> b = move_batch_to_device({"x": torch.ones(2), "n": 3}, "cpu")
        >>> b["x"].device.type, b["n"]
        ('cpu', 3)
    """
    return move_batch(batch, torch.device(device))
