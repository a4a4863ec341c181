r"""Loss helpers for HuggingFace ``transformers`` language models.

Batches are dicts of tensors as a tokenizer or collator makes them
(``input_ids``, ``attention_mask``, ``labels``). Labels follow the HuggingFace
convention: ``-100`` marks positions that do not count (padding, prompts); a
causal LM predicts ``labels[:, t + 1]`` from position ``t`` (the shift happens
inside), an encoder-decoder predicts ``labels[:, t]``.

* :func:`hf_lm_loss` / :func:`hf_seq2seq_loss`: ``loss_fn(model, batch) =
  model(**batch).loss`` for the Hessian and the empirical Fisher.
* :func:`hf_lm_forward` / :func:`hf_seq2seq_forward` and
  :func:`hf_lm_loss_of_output` / :func:`hf_seq2seq_loss_of_output`: the
  two halves for the GGN and the Monte-Carlo Fisher; the loss carries the
  closed-form cross-entropy HVP through :func:`~hessian_spectra.losses.fused_ce.ce_hvp`.
* :func:`hf_token_count`: a ``batch_size_fn`` counting the label tokens that
  count, so batches are weighted by tokens (what the loss over the union of
  batches does) rather than by sequences.

``transformers`` is imported only when a helper is built; without it an
:class:`ImportError` names the ``hessian-spectra[hf]`` extra.
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

__all__ = [
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

_NOT_INPUTS = ("labels", "num_items_in_batch")


@functools.lru_cache(maxsize=1)
def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the HuggingFace helpers need the transformers package: pip install "
            "'hessian-spectra[hf]'"
        ) from err


def _mapping(batch: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{what} expects dict batches like a tokenizer's output (input_ids, "
            "attention_mask, labels), "
            f"got {type(batch).__name__}"
        )
    return batch


def _labels(batch: Mapping[str, Any], ignore_index: int) -> Tensor:
    """``batch['labels']``, else ``input_ids`` with padding (mask 0) set to ``ignore_index``."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    ids = batch.get("input_ids")
    if ids is None:
        raise ValueError(
            "the batch has neither 'labels' nor 'input_ids'; add labels (-100 where ignored)"
        )
    mask = batch.get("attention_mask")
    return ids if mask is None else ids.masked_fill(mask == 0, ignore_index)


def _shifted(labels: Tensor, ignore_index: int) -> Tensor:
    """Labels aligned with causal-LM logits: ``labels[:, 1:]`` padded with ``ignore_index``."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def hf_token_count(batch: Any, *, shift: bool = True, ignore_index: int = -100) -> int:
    """Label tokens that count in a batch: a ``batch_size_fn`` weighting batches by tokens.

    Args:
        batch: dict with ``labels`` (or ``input_ids`` + ``attention_mask``).
        shift: causal LM (the first label is never predicted). Use
            ``functools.partial(hf_token_count, shift=False)`` for encoder-decoders.

    Example:
        >>> hf_token_count({"labels": torch.tensor([[1, 2, -100], [3, 4, 5]])})
        3
    """
    labels = _labels(_mapping(batch, "hf_token_count"), ignore_index)
    if shift:
        labels = labels[..., 1:]
    return int((labels != ignore_index).sum())


def hf_lm_loss(fused: FusedCE | None = None) -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn(model, batch) = model(**batch).loss``; the batch must hold ``labels``.

    Args:
        fused: accepted as hessian-eigenthings' documentation writes
            ``hf_lm_loss(fused="auto")`` and checked (``"auto"``, ``"eager"``,
            ``"compile"``, ``"triton"``). A Hessian product differentiates this loss
            twice with autograd, so no fused kernel takes part; the fused
            cross-entropy product serves the GGN through :func:`hf_lm_shifted_ce`.
    """
    _require_transformers()
    if fused is not None:
        resolve_backend(fused, torch.device("cpu"))  # validates the name

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        b = _mapping(batch, "hf_lm_loss")
        if "labels" not in b:
            raise ValueError(
                "hf_lm_loss needs 'labels' in the batch so the model computes its loss; for a "
                "causal LM "
                "use labels = input_ids with padding set to -100"
            )
        loss = model(**b).loss
        if loss is None:
            raise ValueError(
                f"{type(model).__name__}(**batch) returned no .loss; is it a *ForCausalLM model?"
            )
        return loss

    return loss_fn


def hf_lm_per_sample_loss(
    *, shift: bool = True, ignore_index: int = -100
) -> Callable[[nn.Module, Any], Tensor]:
    """``(B,)`` per-sample losses of a language model: each sequence's mean token
    cross-entropy over its counted labels (for
    :class:`~hessian_spectra.operators.fisher.EmpiricalFisherOperator` with
    ``per_sample="loop"``, which works where ``vmap`` cannot run the model, e.g. with
    padding masks).

    A sequence's loss equals ``model(**one_sequence).loss``. Labels come from
    ``batch["labels"]`` (or ``input_ids`` with padding set to ``ignore_index``);
    ``shift=False`` for encoder-decoders (T5, BART). A sequence without counted
    labels has loss 0.
    """
    _require_transformers()

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        b = _mapping(batch, "hf_lm_per_sample_loss")
        labels = _labels(b, ignore_index)
        inputs = dict(b)
        inputs.pop("labels", None)
        if not shift:  # encoder-decoders build decoder inputs from the labels
            inputs["labels"] = labels
        logits = model(**inputs).logits
        target = _shifted(labels, ignore_index) if shift else labels
        tok = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=ignore_index,
            reduction="none",
        ).reshape(target.shape)
        count = (target != ignore_index).sum(-1)
        return tok.sum(-1) / count.clamp_min(1).to(tok.dtype)

    return loss_fn


def hf_seq2seq_loss() -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn(model, batch) = model(**batch).loss`` for encoder-decoders (T5, BART, ...)."""
    return hf_lm_loss()


def _inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


def hf_lm_forward() -> Callable[[nn.Module, Any], Tensor]:
    """``forward_fn(model, batch) = model(**inputs).logits``, labels dropped (no loss computed)."""
    _require_transformers()

    def forward_fn(model: nn.Module, batch: Any) -> Tensor:
        return model(**_inputs(_mapping(batch, "hf_lm_forward"))).logits

    return forward_fn


def hf_seq2seq_forward() -> Callable[[nn.Module, Any], Tensor]:
    """Decoder logits of an encoder-decoder (``decoder_input_ids`` made from the labels)."""
    _require_transformers()

    def forward_fn(model: nn.Module, batch: Any) -> Tensor:
        b = _mapping(batch, "hf_seq2seq_forward")
        inputs = _inputs(b)
        if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
            labels = b.get("labels")
            if labels is None or not hasattr(model, "prepare_decoder_input_ids_from_labels"):
                raise ValueError(
                    "hf_seq2seq_forward needs 'labels' (or 'decoder_input_ids') in the batch "
                    "and a model with prepare_decoder_input_ids_from_labels"
                )
            prepare: Any = model.prepare_decoder_input_ids_from_labels
            inputs["decoder_input_ids"] = prepare(labels=labels)
        return model(**inputs).logits

    return forward_fn


def _lm_loss_of_output(fused: FusedCE, ignore_index: int, shift: bool, name: str) -> LossOfOutput:
    resolve_backend(fused, torch.device("cpu"))  # validates the name eagerly

    def aligned(logits: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        if logits.dim() != 3:
            raise ValueError(
                f"{name} expects (batch, seq, vocab) logits, got shape {tuple(logits.shape)}"
            )
        labels = _labels(_mapping(batch, name), ignore_index)
        if shift:
            labels = _shifted(labels, ignore_index)
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}"
            )
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)

    def fn(logits: Tensor, batch: Any) -> Tensor:
        z, y = aligned(logits, batch)
        return F.cross_entropy(_upcast(z), y, ignore_index=ignore_index)

    def hvp(logits: Tensor, batch: Any, U: Tensor) -> Tensor:
        z, y = aligned(logits, batch)
        out = ce_hvp(z, U.reshape(U.shape[0], *z.shape), y, ignore_index=ignore_index, fused=fused)
        return out.reshape(U.shape)

    def hvp_inplace(logits: Tensor, batch: Any, U: Tensor) -> Tensor:
        if not U.is_contiguous():
            return U.copy_(hvp(logits, batch, U))
        z, y = aligned(logits, batch)
        flat = U.view(U.shape[0], *z.shape)
        ce_hvp(z, flat, y, ignore_index=ignore_index, fused=fused, out=flat)
        return U

    def mc_fisher_hvp(
        logits: Tensor, batch: Any, U: Tensor, *, generator: torch.Generator, mc_samples: int = 1
    ) -> Tensor:
        z, y = aligned(logits, batch)
        out = cf.cross_entropy_mc_fisher_hvp(
            z,
            y,
            U.reshape(U.shape[0], *z.shape),
            generator=generator,
            mc_samples=mc_samples,
            ignore_index=ignore_index,
        )
        return out.reshape(U.shape)

    return LossOfOutput(fn, hvp, mc_fisher_hvp=mc_fisher_hvp, hvp_inplace=hvp_inplace, name=name)


def hf_lm_loss_of_output(fused: FusedCE = "auto", *, ignore_index: int = -100) -> LossOfOutput:
    r"""Shifted cross-entropy of causal-LM logits (mean over label tokens), closed-form ``.hvp``.

    ``loss(logits, batch)`` equals ``model(**batch).loss`` of a HuggingFace
    causal LM: position ``t`` predicts ``labels[:, t + 1]``, ``ignore_index``
    (and, without ``labels``, padding) masked, mean over the tokens that count,
    computed in float32. ``.hvp`` is :math:`(p \odot u - p\langle p,u\rangle)/n`
    per counted position through :func:`~hessian_spectra.losses.fused_ce.ce_hvp`
    with backend ``fused``; ``.mc_fisher_hvp`` samples tokens from the model.
    """
    _require_transformers()
    return _lm_loss_of_output(fused, ignore_index, True, "hf_lm_loss_of_output")


def hf_lm_shifted_ce(fused: FusedCE = "auto", *, ignore_index: int = -100) -> LossOfOutput:
    """hessian-eigenthings' name for :func:`hf_lm_loss_of_output`: the shifted cross-entropy
    of causal-LM logits with its closed-form (fused) ``.hvp``, for ``GGNOperator``."""
    _require_transformers()
    return _lm_loss_of_output(fused, ignore_index, True, "hf_lm_shifted_ce")


def hf_seq2seq_loss_of_output(fused: FusedCE = "auto", *, ignore_index: int = -100) -> LossOfOutput:
    """Unshifted cross-entropy of encoder-decoder logits (``model(**batch).loss``)."""
    _require_transformers()
    return _lm_loss_of_output(fused, ignore_index, False, "hf_seq2seq_loss_of_output")
