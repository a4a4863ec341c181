"""Curvature operators: matrices known through their products."""

from hessian_spectra.operators._model import ZeroCurvatureWarning
from hessian_spectra.operators.base import (
    CurvatureOperator,
    DenseOperator,
    LambdaOperator,
    as_operator,
)
from hessian_spectra.operators.distributed import (
    DataParallelOperator,
    DDPEmpiricalFisherOperator,
    DDPGGNOperator,
    DDPHessianOperator,
    DDPMCFisherOperator,
    FSDPHessianOperator,
    broadcast_seed,
    unwrap_model,
)
from hessian_spectra.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from hessian_spectra.operators.ggn import AnalyticalHvpFallbackWarning, GGNOperator
from hessian_spectra.operators.hessian import HessianOperator, VmapFallbackWarning

__all__ = [
    "AnalyticalHvpFallbackWarning",
    "CurvatureOperator",
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    "DataParallelOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "FSDPHessianOperator",
    "GGNOperator",
    "HessianOperator",
    "LambdaOperator",
    "MCFisherOperator",
    "VmapFallbackWarning",
    "ZeroCurvatureWarning",
    "as_operator",
    "broadcast_seed",
    "unwrap_model",
]
