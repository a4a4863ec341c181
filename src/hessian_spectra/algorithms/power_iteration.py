"""hessian-eigenthings' module path for power iteration (see :mod:`.power`)."""

from hessian_spectra.algorithms.power import (
    deflated_power_iteration,
    power_iteration,
    power_iteration_one,
    stochastic_power_iteration,
)

__all__ = [
    "deflated_power_iteration",
    "power_iteration",
    "power_iteration_one",
    "stochastic_power_iteration",
]
