"""Algorithms over any symmetric operator: eigenpairs, trace, diagonal, spectral density."""

from hessian_spectra.algorithms.results import (
    DiagonalResult,
    EigenResult,
    SpectralDensityResult,
    TraceResult,
)

__all__ = ["DiagonalResult", "EigenResult", "SpectralDensityResult", "TraceResult"]
