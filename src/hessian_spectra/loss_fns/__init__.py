"""hessian-eigenthings' module path for the loss helpers (see :mod:`hessian_spectra.losses`)."""

from hessian_spectra.losses import (
    LossOfOutput,
    cross_entropy_loss_of_output,
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_lm_shifted_ce,
    hf_seq2seq_loss,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
    tlens_forward,
    tlens_loss,
    tlens_loss_of_output,
)

__all__ = [
    "LossOfOutput",
    "cross_entropy_loss_of_output",
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_lm_shifted_ce",
    "hf_seq2seq_loss",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
    "tlens_forward",
    "tlens_loss",
    "tlens_loss_of_output",
]
