"""Loss helpers: ``loss_fn``, ``forward_fn``, ``loss_of_output_fn`` with closed-form curvature.

The HuggingFace and TransformerLens helpers import their libraries lazily, so
this package imports without them.
"""

from hessian_spectra.losses.closed_form import (
    bce_with_logits_hvp,
    cross_entropy_hvp,
    mse_hvp,
)
from hessian_spectra.losses.fused_ce import ce_hvp
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
from hessian_spectra.losses.standard import (
    LossCurvatureWarning,
    LossOfOutput,
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
)
from hessian_spectra.losses.transformer_lens import tlens_forward, tlens_loss, tlens_loss_of_output

__all__ = [
    "LossCurvatureWarning",
    "LossOfOutput",
    "bce_with_logits_hvp",
    "ce_hvp",
    "cross_entropy_hvp",
    "cross_entropy_loss_of_output",
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_lm_per_sample_loss",
    "hf_lm_shifted_ce",
    "hf_seq2seq_forward",
    "hf_seq2seq_loss",
    "hf_seq2seq_loss_of_output",
    "hf_token_count",
    "mse_hvp",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    "supervised_loss_of_output",
    "supervised_per_sample_loss",
    "tlens_forward",
    "tlens_loss",
    "tlens_loss_of_output",
]
