"""hessian-spectra: curvature of neural-network losses, matrix-free and verified.

Operators (Hessian, GGN, Fisher) give matrix-vector products on blocks of
vectors; algorithms (Lanczos, power iteration, Hutchinson/Hutch++, stochastic
Lanczos quadrature) consume any operator and return result dataclasses with
error information, ``converged`` flags and ``num_matvecs``.
"""

from hessian_spectra.algorithms import (
    DiagonalResult,
    EigenResult,
    SpectralDensityResult,
    TraceResult,
)
from hessian_spectra.data import WeightedBatches, default_batch_size
from hessian_spectra.operators import CurvatureOperator, DenseOperator, LambdaOperator, as_operator
from hessian_spectra.params import (
    ParamFilter,
    match_names,
    match_regex,
    params_to_vector,
    select_parameters,
    vector_to_params,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalResult",
    "EigenResult",
    "LambdaOperator",
    "ParamFilter",
    "SpectralDensityResult",
    "TraceResult",
    "WeightedBatches",
    "__version__",
    "as_operator",
    "default_batch_size",
    "match_names",
    "match_regex",
    "params_to_vector",
    "select_parameters",
    "vector_to_params",
]
