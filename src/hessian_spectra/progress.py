"""Progress bars (tqdm) with one switch, and the package logger.

A bar shows unless the call says ``progress=False`` (the eigensolvers' default;
``analyze`` and ``loss_landscape`` default to on) or the environment variable
``HESSIAN_SPECTRA_PROGRESS`` is ``0``/``false``/``off``, which turns every bar off. Decisions are
logged on the ``hessian_spectra`` logger (INFO/DEBUG); it has no handler of its
own, so nothing shows unless the application configures logging.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "ENV_VAR",
    "bars_allowed",
    "logger",
    "operator_progress",
    "progress_bar",
    "progress_enabled",
]

ENV_VAR = "HESSIAN_SPECTRA_PROGRESS"
logger = logging.getLogger("hessian_spectra")


def bars_allowed() -> bool:
    """Whether ``HESSIAN_SPECTRA_PROGRESS`` allows bars (unset: yes; ``0``/``false``/``off``: no)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def progress_enabled(progress: bool | None) -> bool:
    """Bars for a call given ``progress``: ``False`` or the environment switch turn them off,
    ``True`` and ``None`` (the default of :func:`analyze` and :func:`loss_landscape`) on."""
    if progress is False:
        return False
    return bars_allowed()


@contextlib.contextmanager
def progress_bar(
    progress: bool | None, *, total: int, desc: str, unit: str = "matvec"
) -> Iterator[Callable[[int], object]]:
    """A tqdm bar of ``total`` steps; yields its ``update`` (a no-op when bars are off)."""
    if not progress_enabled(progress):
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit) as bar:

        def update(n: int) -> None:
            if bar.n + n > bar.total:
                bar.total = bar.n + n
            bar.update(n)

        try:
            yield update
        finally:
            bar.total = bar.n  # a finished run reads 100%
            bar.refresh()


@contextlib.contextmanager
def operator_progress(
    operator: Any, progress: bool | None, *, total: int, desc: str
) -> Iterator[None]:
    """Count ``operator``'s products on a bar while the body runs (for algorithms without a
    ``progress`` argument); the operator is restored on exit."""
    if not progress_enabled(progress):
        yield
        return
    own = operator.__dict__.get("_matmat")
    inner = operator._matmat
    with progress_bar(True, total=total, desc=desc) as update:

        def counted(V: Any) -> Any:
            out = inner(V)
            update(int(V.shape[0]))
            return out

        operator._matmat = counted
        try:
            yield
        finally:
            if own is None:
                del operator._matmat
            else:
                operator._matmat = own
