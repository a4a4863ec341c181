"""Utilities under the module name some hessian-eigenthings examples import from.

``from hessian_spectra.util import match_names`` works as it does there; the
functions live in :mod:`hessian_spectra.params`.
"""

from hessian_spectra.param_utils import *  # noqa: F403
from hessian_spectra.param_utils import __all__ as __all__
