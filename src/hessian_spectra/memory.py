"""Peak allocated bytes of a piece of code, counted allocation by allocation.

:func:`track_allocations` records every allocation and free that PyTorch's
allocators report to the profiler (``torch.profiler`` with ``profile_memory``)
and keeps the running total and its maximum, per device type. Unlike the
process's resident set this counts only tensor memory, is exact to the byte,
and does not depend on what the allocator or the operating system kept from
earlier code; unlike ``torch.cuda.max_memory_allocated`` it works on the CPU.
Memory allocated before the block and still held counts zero: the peak is the
most the block had allocated *above* what it started with.

Example:
    >>> import torch
    >>> with track_allocations() as mem:
    ...     a = torch.zeros(1000)
    ...     b = a + 1
    ...     del a
    >>> mem.peak_bytes >= 8000
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["AllocationPeak", "track_allocations"]


@dataclass
class AllocationPeak:
    """What :func:`track_allocations` counted (filled when the block exits).

    Attributes:
        device_type: the device type counted (``"cpu"``, ``"cuda"``).
        peak_bytes: the highest total of bytes allocated in the block and not
            yet freed, at any moment of the block.
        end_bytes: the total still allocated when the block ended.
        allocations: the number of allocations counted.
        allocated_bytes: the bytes of all allocations together.
    """

    device_type: str
    peak_bytes: int = 0
    end_bytes: int = 0
    allocations: int = 0
    allocated_bytes: int = 0
    _events: list[tuple[int, int]] = field(default_factory=list, repr=False)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


@contextlib.contextmanager
def track_allocations(device: str | torch.device = "cpu") -> Iterator[AllocationPeak]:
    """Count the allocations of ``device``'s type in the block and keep the peak.

    Args:
        device: the device (type) whose allocations count (default ``"cpu"``).

    Yields:
        an :class:`AllocationPeak`, filled when the block exits.
    """
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    res = AllocationPeak(dev.type)
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = profile(activities=activities, profile_memory=True)
    with prof:
        yield res
    events = []
    for e in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        if e.name() != "[memory]":
            continue
        if _device_type(e) != dev.type:
            continue
        events.append((e.start_ns(), int(e.nbytes())))  # type: ignore[union-attr]
    events.sort(key=lambda x: x[0])  # stable: same-time events keep their order
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
        if nbytes > 0:
            res.allocations += 1
            res.allocated_bytes += nbytes
    res.peak_bytes, res.end_bytes, res._events = peak, total, events


def _device_type(event: object) -> str:
    kind = event.device_type()  # type: ignore[attr-defined]
    name = str(kind).split(".")[-1].lower()
    return "cuda" if name == "cuda" else name
