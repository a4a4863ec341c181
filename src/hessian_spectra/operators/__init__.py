"""Curvature operators: matrices known through their products."""

from hessian_spectra.operators.base import (
    CurvatureOperator,
    DenseOperator,
    LambdaOperator,
    as_operator,
)
from hessian_spectra.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from hessian_spectra.operators.ggn import AnalyticalHvpFallbackWarning, GGNOperator
from hessian_spectra.operators.hessian import HessianOperator, VmapFallbackWarning

__all__ = [
    "AnalyticalHvpFallbackWarning",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LambdaOperator",
    "MCFisherOperator",
    "VmapFallbackWarning",
    "as_operator",
]
