"""Dense Hessians for small models: model and loss Hessians as blocks or matrices, and sharpness.

Model Hessians (of each output entry with respect to the trainable parameters)
and loss Hessians (of ``criterion(model(*inputs), target)``), as dicts of
blocks keyed by ``(name_i, name_j)`` or as ``(n, n)`` matrices, for a whole
batch or per sample, built with ``torch.func`` (``jacrev(grad(f))``); sharpness (largest
``|eigenvalue|``) dense or matrix-free.
"""

from hessian_spectra.dense.blocks import BlockDict, blocks_to_matrix, nested_blocks
from hessian_spectra.dense.loss import (
    batch_loss_hessian_dict,
    batch_loss_hessian_matrix,
    loss_hessian_dict,
    loss_hessian_matrix,
)
from hessian_spectra.dense.model import (
    batch_model_hessian_dict,
    batch_model_hessian_matrix,
    model_hessian_dict,
    model_hessian_matrix,
)
from hessian_spectra.dense.sharpness import (
    batch_loss_sharpness,
    batch_model_sharpness,
    loss_sharpness,
    model_sharpness,
    sharpness,
)

__all__ = [
    "BlockDict",
    "batch_loss_hessian_dict",
    "batch_loss_hessian_matrix",
    "batch_loss_sharpness",
    "batch_model_hessian_dict",
    "batch_model_hessian_matrix",
    "batch_model_sharpness",
    "blocks_to_matrix",
    "loss_hessian_dict",
    "loss_hessian_matrix",
    "loss_sharpness",
    "model_hessian_dict",
    "model_hessian_matrix",
    "model_sharpness",
    "nested_blocks",
    "sharpness",
]
