"""Loss helpers for TransformerLens ``HookedTransformer`` models.

A batch is a ``(batch, pos)`` token tensor, a ``(tokens,)`` tuple, or a dict
with ``tokens`` (or ``input_ids``) and an optional ``attention_mask``. The loss
is TransformerLens' own next-token cross-entropy (``return_type="loss"``):
position ``t`` predicts token ``t + 1``, a pair counts when both positions are
unmasked, mean over counted pairs.

* :func:`tlens_loss`: ``loss_fn(model, batch)`` for the Hessian;
* :func:`tlens_forward` + :func:`tlens_loss_of_output`: logits and the same
  loss as a function of them, with the closed-form ``.hvp`` (so the GGN runs
  without double backward) and ``.mc_fisher_hvp``.

``transformer_lens`` itself is imported only when a helper is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessian_spectra.losses import closed_form as cf
from hessian_spectra.losses.fused_ce import FusedCE, ce_hvp, resolve_backend
from hessian_spectra.losses.standard import LossOfOutput, _upcast

__all__ = ["tlens_forward", "tlens_loss", "tlens_loss_of_output"]

_IGNORE = -100


@functools.lru_cache(maxsize=1)
def _require_tlens() -> None:
    try:
        import transformer_lens  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the TransformerLens helpers need the transformer-lens package: "
            "pip install 'hessian-spectra[tlens]'"
        ) from err


def _tokens_mask(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        tokens = batch.get("tokens", batch.get("input_ids"))
        if tokens is None:
            raise ValueError(
                "a dict batch for the TransformerLens helpers needs 'tokens' (or 'input_ids')"
            )
        return tokens, batch.get("attention_mask")
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0], None
    raise TypeError(
        "TransformerLens helpers expect a (batch, pos) token tensor, a (tokens,) tuple or a "
        "dict with "
        f"'tokens' and 'attention_mask', got {type(batch).__name__}"
    )


def tlens_loss() -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn(model, batch) = model(tokens, return_type="loss", attention_mask=...)``."""
    _require_tlens()

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        tokens, mask = _tokens_mask(batch)
        return model(tokens, return_type="loss", attention_mask=mask)

    return loss_fn


def tlens_forward() -> Callable[[nn.Module, Any], Tensor]:
    """``forward_fn(model, batch) = model(tokens, return_type="logits", attention_mask=...)``."""
    _require_tlens()

    def forward_fn(model: nn.Module, batch: Any) -> Tensor:
        tokens, mask = _tokens_mask(batch)
        return model(tokens, return_type="logits", attention_mask=mask)

    return forward_fn


def _targets(logits: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
    """Flat ``(B*T, V)`` logits and next-token labels, ``-100`` where the pair does not count."""
    tokens, mask = _tokens_mask(batch)
    if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"expected (batch, pos, vocab) logits matching tokens {tuple(tokens.shape)}, got "
            f"{tuple(logits.shape)}"
        )
    labels = tokens[:, 1:]
    if mask is not None:
        keep = mask[:, :-1].bool() & mask[:, 1:].bool()
        labels = labels.masked_fill(~keep, _IGNORE)
    labels = F.pad(labels, (0, 1), value=_IGNORE)
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def tlens_loss_of_output(fused: FusedCE = "auto") -> LossOfOutput:
    r"""TransformerLens' next-token loss of the logits, with ``.hvp`` and ``.mc_fisher_hvp``.

    ``.hvp`` is :math:`(p \odot u - p\langle p,u\rangle)/n` per counted
    position through :func:`~hessian_spectra.losses.fused_ce.ce_hvp`.
    """
    _require_tlens()
    resolve_backend(fused, torch.device("cpu"))

    def fn(logits: Tensor, batch: Any) -> Tensor:
        z, y = _targets(logits, batch)
        return F.cross_entropy(_upcast(z), y, ignore_index=_IGNORE)

    def hvp(logits: Tensor, batch: Any, U: Tensor) -> Tensor:
        z, y = _targets(logits, batch)
        return ce_hvp(z, U.reshape(U.shape[0], *z.shape), y, fused=fused).reshape(U.shape)

    def hvp_inplace(logits: Tensor, batch: Any, U: Tensor) -> Tensor:
        if not U.is_contiguous():
            return U.copy_(hvp(logits, batch, U))
        z, y = _targets(logits, batch)
        flat = U.view(U.shape[0], *z.shape)
        ce_hvp(z, flat, y, fused=fused, out=flat)
        return U

    def mc_fisher_hvp(
        logits: Tensor, batch: Any, U: Tensor, *, generator: torch.Generator, mc_samples: int = 1
    ) -> Tensor:
        z, y = _targets(logits, batch)
        out = cf.cross_entropy_mc_fisher_hvp(
            z, y, U.reshape(U.shape[0], *z.shape), generator=generator, mc_samples=mc_samples
        )
        return out.reshape(U.shape)

    return LossOfOutput(
        fn,
        hvp,
        mc_fisher_hvp=mc_fisher_hvp,
        hvp_inplace=hvp_inplace,
        name="tlens_loss_of_output",
    )
