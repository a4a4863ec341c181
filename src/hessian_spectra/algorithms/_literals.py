"""The string options of the algorithms, as ``Literal`` types a type checker can check."""

from __future__ import annotations

from typing import Literal

__all__ = ["EigenMethod", "TraceMethod", "Which"]

Which = Literal["LA", "SA", "LM"]
"""Largest algebraic, smallest algebraic, largest magnitude (scipy ``eigsh``'s names)."""

EigenMethod = Literal["auto", "lanczos", "block"]
"""Solver of :func:`~hessian_spectra.eigenpairs`."""

TraceMethod = Literal["hutch++", "hutchinson", "exact"]
"""Estimator of :func:`~hessian_spectra.trace`."""
