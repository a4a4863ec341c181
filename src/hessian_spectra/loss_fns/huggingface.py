"""hessian-eigenthings' module path for the HuggingFace loss helpers."""

from hessian_spectra.losses.fused_ce import FusedCE as FusedCEHvpBackend
from hessian_spectra.losses.huggingface import (
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_lm_per_sample_loss,
    hf_lm_shifted_ce,
    hf_seq2seq_forward,
    hf_seq2seq_loss,
    hf_seq2seq_loss_of_output,
    hf_token_count,
)

__all__ = [
    "FusedCEHvpBackend",
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_lm_per_sample_loss",
    "hf_lm_shifted_ce",
    "hf_seq2seq_forward",
    "hf_seq2seq_loss",
    "hf_seq2seq_loss_of_output",
    "hf_token_count",
]
