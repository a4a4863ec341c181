"""Algorithms over any symmetric operator: eigenpairs, trace, diagonal, spectral density."""

# hessian-eigenthings' module names, imported before the functions of the same name so
# that ``algorithms.spectral_density`` stays the function
from hessian_spectra.algorithms import power_iteration as _power_iteration_module  # noqa: F401
from hessian_spectra.algorithms import result as _result_module  # noqa: F401
from hessian_spectra.algorithms import spectral_density as _spectral_density_module  # noqa: F401
from hessian_spectra.algorithms.block import block_lanczos
from hessian_spectra.algorithms.dense import dense_eigh
from hessian_spectra.algorithms.density import spectral_density
from hessian_spectra.algorithms.eigenpairs import eigenpairs
from hessian_spectra.algorithms.lanczos import (
    LanczosTridiag,
    LanczosTridiagonal,
    lanczos,
    lanczos_tridiagonal,
)
from hessian_spectra.algorithms.power import (
    deflated_power_iteration,
    power_iteration,
    power_iteration_one,
    stochastic_power_iteration,
)
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
    "LanczosTridiag",
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
    "power_iteration_one",
    "spectral_density",
    "stochastic_power_iteration",
    "trace",
]
