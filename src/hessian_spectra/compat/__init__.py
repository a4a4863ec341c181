"""The entry points of three smaller tools, as thin adapters over this library.

* :mod:`hessian_spectra.compat.nnhessian`: NNHessian's ``NNHessianCalculator``;
* :mod:`hessian_spectra.compat.oxford`: the Oxford loss-landscapes ``ModelWrapper``,
  ``min_max_hessian_eigs`` and ``hessian_trace``;
* :mod:`hessian_spectra.compat.hesse`: hesse's dense Hessian and sharpness functions;
* :mod:`hessian_spectra.compat.pyhessian`: PyHessian's ``hessian`` class.

They hold no numerics of their own: products come from the operators, estimates
from the algorithms, dense Hessians from :mod:`hessian_spectra.dense`.
"""

from hessian_spectra.compat import hesse, nnhessian, oxford, pyhessian
from hessian_spectra.compat.nnhessian import NNHessianCalculator
from hessian_spectra.compat.oxford import ModelWrapper, hessian_trace, min_max_hessian_eigs

__all__ = [
    "ModelWrapper",
    "NNHessianCalculator",
    "hesse",
    "hessian_trace",
    "min_max_hessian_eigs",
    "nnhessian",
    "oxford",
    "pyhessian",
]
