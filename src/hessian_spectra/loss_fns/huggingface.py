"""hessian-eigenthings' module path for the HuggingFace loss helpers."""

from typing import Any

from hessian_spectra.loss_fns._fused_ce_hvp import eager_ce_hvp
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


class _LossOfOutputWithHvp:
    """hessian-eigenthings' wrapper of a loss and its one-direction ``hvp(output, batch, u)``.

    ``GGNOperator`` calls such an ``.hvp`` with one direction shaped like the output at a
    time; :class:`~hessian_spectra.losses.LossOfOutput` is the form whose ``.hvp`` takes
    a whole block.
    """

    def __init__(self, loss_fn: Any, hvp_fn: Any) -> None:
        self._loss_fn = loss_fn
        self.hvp = hvp_fn

    def __call__(self, output: Any, batch: Any) -> Any:
        return self._loss_fn(output, batch)


def _hf_lm_ce_hvp_eager(flat_logits: Any, flat_u: Any, valid: Any, n: Any) -> Any:
    """The eager cross-entropy Hessian product ``(p * u - p <p, u>) * valid / n``."""
    return eager_ce_hvp(flat_logits, flat_u, valid, n)


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
