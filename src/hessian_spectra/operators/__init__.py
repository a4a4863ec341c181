"""Curvature operators: matrices known through their products."""

from hessian_spectra.operators._finite import NonFiniteError
from hessian_spectra.operators._model import ZeroCurvatureWarning
from hessian_spectra.operators.base import (
    CurvatureOperator,
    DenseOperator,
    ForeignOperator,
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
from hessian_spectra.operators.fisher import (
    EmpiricalFisherOperator,
    MCFisherOperator,
    PerSampleLossFn,
)
from hessian_spectra.operators.ggn import (
    AnalyticalHvpFallbackWarning,
    ForwardFn,
    GGNOperator,
    LossOfOutputFn,
)
from hessian_spectra.operators.hessian import (
    HessianOperator,
    HvpMethod,
    LossFn,
    VmapFallbackWarning,
)
from hessian_spectra.operators.preconditioned import (
    PreconditionedOperator,
    adam_preconditioner,
    stability_threshold,
)

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
    "ForeignOperator",
    "ForwardFn",
    "GGNOperator",
    "HessianOperator",
    "HvpMethod",
    "LambdaOperator",
    "LossFn",
    "LossOfOutputFn",
    "MCFisherOperator",
    "NonFiniteError",
    "PerSampleLossFn",
    "PreconditionedOperator",
    "VmapFallbackWarning",
    "ZeroCurvatureWarning",
    "adam_preconditioner",
    "as_operator",
    "broadcast_seed",
    "stability_threshold",
    "unwrap_model",
]
