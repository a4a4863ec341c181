"""hessian-eigenthings' module path for the TransformerLens loss helpers."""

from hessian_spectra.losses.transformer_lens import tlens_forward, tlens_loss, tlens_loss_of_output

__all__ = ["tlens_forward", "tlens_loss", "tlens_loss_of_output"]
