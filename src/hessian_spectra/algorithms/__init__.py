"""Algorithms over any symmetric operator: eigenpairs, trace, diagonal, spectral density."""

from hessian_spectra.algorithms.block import block_lanczos
from hessian_spectra.algorithms.dense import dense_eigh
from hessian_spectra.algorithms.density import spectral_density
from hessian_spectra.algorithms.eigenpairs import eigenpairs
from hessian_spectra.algorithms.lanczos import LanczosTridiagonal, lanczos, lanczos_tridiagonal
from hessian_spectra.algorithms.power import deflated_power_iteration, power_iteration
from hessian_spectra.algorithms.results import (
    ConvergenceWarning,
    DiagonalResult,
    EigenResult,
    SpectralDensityResult,
    TraceResult,
)
from hessian_spectra.algorithms.trace import diagonal, hutch_plus_plus, hutchinson, trace

__all__ = [
    "ConvergenceWarning",
    "DiagonalResult",
    "EigenResult",
    "LanczosTridiagonal",
    "SpectralDensityResult",
    "TraceResult",
    "block_lanczos",
    "deflated_power_iteration",
    "dense_eigh",
    "diagonal",
    "eigenpairs",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos",
    "lanczos_tridiagonal",
    "power_iteration",
    "spectral_density",
    "trace",
]
