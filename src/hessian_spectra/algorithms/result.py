"""hessian-eigenthings' module path for the result types (see :mod:`.results`)."""

from hessian_spectra.algorithms.results import (
    ConvergenceWarning,
    DiagonalResult,
    EigenResult,
    SpectralDensityResult,
    TraceResult,
)

__all__ = [
    "ConvergenceWarning",
    "DiagonalResult",
    "EigenResult",
    "SpectralDensityResult",
    "TraceResult",
]
