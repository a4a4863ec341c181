"""hessian-eigenthings' fused cross-entropy kernels under their names and argument order.

``(flat_logits, flat_u, valid, n) -> (p * u - p <p, u>) * valid / n`` for ``(N, V)``
logits and directions, a ``(N,)`` validity mask and the count ``n``; each backend
of :func:`hessian_spectra.losses.fused_ce.ce_hvp`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hessian_spectra.losses.fused_ce import _triton_available as _triton_reason
from hessian_spectra.losses.fused_ce import ce_hvp

__all__ = ["compiled_ce_hvp", "eager_ce_hvp", "triton_ce_hvp"]


def _run(
    flat_logits: Tensor, flat_u: Tensor, valid: Tensor, n: Tensor | float, fused: str
) -> Tensor:
    return ce_hvp(
        flat_logits,
        flat_u,
        valid.to(torch.bool),
        normalizer=float(n),
        fused=fused,  # type: ignore[arg-type]
    )


def eager_ce_hvp(flat_logits: Tensor, flat_u: Tensor, valid: Tensor, n: Tensor | float) -> Tensor:
    """The plain PyTorch reference."""
    return _run(flat_logits, flat_u, valid, n, "eager")


def compiled_ce_hvp(
    flat_logits: Tensor, flat_u: Tensor, valid: Tensor, n: Tensor | float
) -> Tensor:
    """Through :func:`torch.compile`."""
    return _run(flat_logits, flat_u, valid, n, "compile")


def triton_ce_hvp(flat_logits: Tensor, flat_u: Tensor, valid: Tensor, n: Tensor | float) -> Tensor:
    """The Triton kernel (CUDA tensors only)."""
    return _run(flat_logits, flat_u, valid, n, "triton")


def _triton_available() -> bool:
    """Whether the Triton kernel can run on this machine's CUDA device."""
    return torch.cuda.is_available() and _triton_reason(torch.device("cuda")) is None


_ce_hvp_reference = eager_ce_hvp
