"""Progress bars (tqdm) with one switch, and the package logger.

A bar shows when ``progress=True``, or ``progress=None`` (the default of the
functions that take it) and the environment variable
``HESSIAN_SPECTRA_PROGRESS`` is not ``0``/``false``/``off``. Decisions are
logged on the ``hessian_spectra`` logger (INFO/DEBUG); it has no handler of its
own, so nothing shows unless the application configures logging.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

__all__ = ["ENV_VAR", "logger", "progress_bar", "progress_enabled"]

ENV_VAR = "HESSIAN_SPECTRA_PROGRESS"
logger = logging.getLogger("hessian_spectra")


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` when given, else whether ``HESSIAN_SPECTRA_PROGRESS`` allows bars (default yes)."""
    if progress is not None:
        return bool(progress)
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def progress_bar(
    progress: bool | None, *, total: int, desc: str, unit: str = "matvec"
) -> Iterator[Callable[[int], object]]:
    """A tqdm bar of ``total`` steps; yields its ``update`` (a no-op when bars are off)."""
    if not progress_enabled(progress):
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
        yield bar.update
