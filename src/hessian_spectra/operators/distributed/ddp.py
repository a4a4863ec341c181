"""hessian-eigenthings' module path for the DDP operators (see :mod:`..distributed`)."""

from hessian_spectra.operators.distributed import (
    DataParallelOperator,
    DDPEmpiricalFisherOperator,
    DDPGGNOperator,
    DDPHessianOperator,
    DDPMCFisherOperator,
)

__all__ = [
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    "DataParallelOperator",
]
