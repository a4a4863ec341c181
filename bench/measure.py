"""Wall time, peak memory and a time cap for one call.

Peak memory is the **peak resident set size (RSS) increase** of the process
during the call, from Linux's ``/proc/self/status``: before the call, freed heap
memory is returned to the OS (``malloc_trim(0)``) and the peak counter is reset
(writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``); after it,
``VmHWM - VmRSS(before)``. It counts everything the call allocates (torch's
CPU tensors, NumPy, Python objects), not only Python objects (``tracemalloc``
would miss torch's allocations). Where ``/proc`` is not available the peak is
reported as ``None``.

The time cap uses ``SIGALRM`` (``setitimer``): a call still running at the cap
gets :class:`CapExceeded` raised inside it at its next Python bytecode, and
is reported as ``> cap``.
"""

from __future__ import annotations

import ctypes
import gc
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CapExceeded", "Measured", "measure"]


class CapExceeded(Exception):
    """The call ran past its time cap."""


@dataclass
class Measured:
    value: Any
    seconds: float
    peak_mib: float | None
    error: BaseException | None = None

    @property
    def capped(self) -> bool:
        return isinstance(self.error, CapExceeded)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


try:
    _libc: Any = ctypes.CDLL("libc.so.6")
except OSError:  # pragma: no cover - not glibc
    _libc = None


def _reset_peak() -> int | None:
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _on_alarm(signum: int, frame: Any) -> None:
    raise CapExceeded


def measure(fn: Callable[[], Any], cap: float | None = None, memory: bool = True) -> Measured:
    """Run ``fn()`` once; return its value, wall seconds, peak RSS increase (MiB) and any error."""
    base = _reset_peak() if memory else None
    old = None
    if cap is not None:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, cap)
    err: BaseException | None = None
    value = None
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as e:  # reported, not raised: a crash of a peer is a result
        err = e
    finally:
        seconds = time.perf_counter() - t0
        if cap is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    peak = None
    if base is not None:
        hwm = _status_kib("VmHWM")
        peak = None if hwm is None else max(0.0, (hwm - base) / 1024)
    return Measured(value, seconds, peak, err)
