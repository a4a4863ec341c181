"""hessian-eigenthings' module path for stochastic Lanczos quadrature (see :mod:`.density`)."""

from hessian_spectra.algorithms.density import spectral_density
from hessian_spectra.algorithms.results import SpectralDensityResult

__all__ = ["SpectralDensityResult", "spectral_density"]
