"""hessian-eigenthings' module path for the supervised loss helpers."""

from hessian_spectra.losses.standard import (
    LossOfOutput,
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
)

__all__ = [
    "LossOfOutput",
    "cross_entropy_loss_of_output",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
]
