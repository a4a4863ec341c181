"""HuggingFace helpers on tiny random-weight models: losses, GGN products against dense J^T H J."""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch

from reference import tol
from test_ggn import dense_ggn_products

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hessian_spectra.losses import (  # noqa: E402
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_seq2seq_forward,
    hf_seq2seq_loss,
    hf_seq2seq_loss_of_output,
    hf_token_count,
)
from hessian_spectra.losses import huggingface as hf  # noqa: E402
from hessian_spectra.operators.ggn import GGNOperator  # noqa: E402

D = torch.float64
VOCAB = 37


def _gpt2(dropout=0.0):
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double()


def _llama():
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double().eval()


def _t5():
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(cfg).double().eval()


def _lm_batch(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, T - 2 :] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _s2s_batch(seed=0):
    b = _lm_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    labels = torch.randint(1, VOCAB, (3, 4), generator=g)
    labels[1, 3] = -100
    b["labels"] = labels
    return b


CAUSAL = {"gpt2": _gpt2, "llama": _llama}


def _close(a, b, dtype=D):
    torch.testing.assert_close(a, b, rtol=0, atol=tol(dtype) * max(1.0, b.abs().max().item()))


# Llama's RMSNorm/rotary and T5's layer norm compute in float32 even in a float64 model
INTERNAL = {"gpt2": D, "llama": torch.float32, "t5": torch.float32}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_lm_loss_of_output_is_the_models_loss(name):
    model = CAUSAL[name]().eval()
    b = _lm_batch()
    lo = hf_lm_loss_of_output(fused="eager")
    ours = lo(hf_lm_forward()(model, b), b)
    theirs = hf_lm_loss()(model, b)  # computed in float32 by transformers
    torch.testing.assert_close(ours, theirs.to(D), rtol=1e-6, atol=0)
    # without labels: input_ids with padding masked
    no_labels = {k: v for k, v in b.items() if k != "labels"}
    torch.testing.assert_close(lo(hf_lm_forward()(model, b), no_labels), ours)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_lm_ggn_matches_dense_reference(name):
    model = CAUSAL[name]().eval()
    b = _lm_batch()
    lo = hf_lm_loss_of_output(fused="eager")
    G = GGNOperator(model, [b], hf_lm_forward(), lo)
    V = torch.randn(3, G.size, generator=torch.Generator().manual_seed(1), dtype=D)
    got = G @ V
    _close(got, dense_ggn_products(model, b, hf_lm_forward(), lo, V), INTERNAL[name])
    Ga = GGNOperator(model, [b], hf_lm_forward(), lo, loss_hvp="autograd")
    _close(Ga @ V, got)
    assert (V * got).sum(1).min() >= 0  # PSD quadratic forms


def test_seq2seq_loss_and_ggn():
    model = _t5()
    b = _s2s_batch()
    lo = hf_seq2seq_loss_of_output(fused="eager")
    torch.testing.assert_close(
        lo(hf_seq2seq_forward()(model, b), b), hf_seq2seq_loss()(model, b).to(D), rtol=1e-6, atol=0
    )
    G = GGNOperator(model, [b], hf_seq2seq_forward(), lo)
    V = torch.randn(2, G.size, generator=torch.Generator().manual_seed(2), dtype=D)
    got = G @ V
    _close(got, dense_ggn_products(model, b, hf_seq2seq_forward(), lo, V), INTERNAL["t5"])
    _close(GGNOperator(model, [b], hf_seq2seq_forward(), lo, loss_hvp="autograd") @ V, got)


def test_hvp_is_zero_at_positions_that_do_not_count():
    model = _gpt2().eval()
    b = _lm_batch()
    logits = hf_lm_forward()(model, b).detach()
    U = torch.randn(2, *logits.shape, dtype=D)
    out = hf_lm_loss_of_output(fused="eager").hvp(logits, b, U)
    assert torch.count_nonzero(out[:, :, -1]) == 0  # the last position predicts nothing
    assert torch.count_nonzero(out[:, 0, 3:]) == 0  # labels[0, 4:] are -100: positions 3, 4 masked
    assert torch.count_nonzero(out[:, 1, :-1]) > 0


def test_token_weighting_equals_the_loss_over_the_union():
    """Two batches weighted by label tokens give the GGN of the concatenated batch."""
    model = _gpt2().eval()
    b1, b2 = _lm_batch(0), _lm_batch(1, B=2)
    b2["labels"][:, :4] = -100  # few tokens count in b2
    union = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    lo = hf_lm_loss_of_output(fused="eager")
    V = torch.randn(
        2,
        sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(3),
        dtype=D,
    )
    whole = GGNOperator(model, [union], hf_lm_forward(), lo) @ V
    split = GGNOperator(model, [b1, b2], hf_lm_forward(), lo, batch_size_fn=hf_token_count) @ V
    _close(split, whole)
    micro = (
        GGNOperator(
            model, [union], hf_lm_forward(), lo, batch_size_fn=hf_token_count, microbatch_size=2
        )
        @ V
    )
    _close(micro, whole)
    per_sequence = GGNOperator(model, [b1, b2], hf_lm_forward(), lo) @ V
    assert not torch.allclose(per_sequence, whole)


def _sequence_loss(model, one):
    """Mean next-token cross-entropy of one sequence in the model's dtype (HF's own
    ``.loss`` upcasts the logits to float32)."""
    inputs = {k: v for k, v in one.items() if k != "labels"}
    logits = model(**inputs).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, one["labels"][0, 1:], ignore_index=-100)


def _per_sample_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        g = torch.autograd.grad(_sequence_loss(model, one), params, allow_unused=True)
        flat = [
            (x if x is not None else torch.zeros_like(p)).reshape(-1)
            for x, p in zip(g, params, strict=True)
        ]
        rows.append(torch.cat(flat))
    return torch.stack(rows)


@pytest.mark.parametrize("name", list(CAUSAL))
def test_empirical_fisher_of_an_lm_equals_the_mean_of_per_sample_outer_products(name):
    """Per-sample gradients of an HF LM: vmap without padding, the loop with
    ``hf_lm_per_sample_loss`` with padding; vmap with padding says what to do."""
    from hessian_spectra.losses import hf_lm_per_sample_loss
    from hessian_spectra.operators.fisher import EmpiricalFisherOperator

    model = CAUSAL[name]().eval()
    padded = _lm_batch(seed=3)
    plain = {"input_ids": padded["input_ids"], "labels": padded["input_ids"]}
    V = torch.randn(
        3,
        sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(4),
        dtype=D,
    )
    for batch, kw in ((plain, {}), (padded, {"per_sample": "loop"})):
        loss = hf_lm_loss() if not kw else hf_lm_per_sample_loss()
        op = EmpiricalFisherOperator(model, [batch], loss_fn=loss, **kw)
        G = _per_sample_grads(model, batch)
        # hf_lm_loss is HF's .loss, computed in float32 whatever the model's dtype
        _close(op @ V, (V @ G.T) @ G / G.shape[0], torch.float32 if not kw else INTERNAL[name])
    with pytest.raises(RuntimeError, match="hf_lm_per_sample_loss"):
        EmpiricalFisherOperator(model, [padded], loss_fn=hf_lm_loss()) @ V


def test_lm_per_sample_loss_is_each_sequences_own_loss():
    model, batch = _gpt2().eval(), _lm_batch(seed=5)
    from hessian_spectra.losses import hf_lm_per_sample_loss

    per = hf_lm_per_sample_loss()(model, batch)
    ones = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    _close(per, torch.stack([_sequence_loss(model, one) for one in ones]))
    hf_own = torch.stack([model(**one).loss for one in ones])  # computed in float32 by HF
    _close(per.float(), hf_own, torch.float32)


def test_hf_token_count():
    labels = torch.tensor([[5, 6, -100], [7, 8, 9]])
    assert hf_token_count({"labels": labels}) == 3
    assert hf_token_count({"labels": labels}, shift=False) == 5
    assert functools.partial(hf_token_count, shift=False)({"labels": labels}) == 5
    ids = torch.tensor([[1, 2, 3]])
    assert hf_token_count({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0]])}) == 1


def test_dropout_in_train_mode_gives_one_symmetric_matrix_and_leaves_the_model():
    model = _gpt2(dropout=0.3).train()
    before = copy.deepcopy(model.state_dict())
    b = _lm_batch()
    G = GGNOperator(model, [b], hf_lm_forward(), hf_lm_loss_of_output(fused="eager"), seed=7)
    V = torch.randn(2, G.size, generator=torch.Generator().manual_seed(4), dtype=D)
    GV = G @ V
    torch.testing.assert_close(V[0] @ GV[1], V[1] @ GV[0], rtol=tol(D), atol=0)
    assert torch.equal(G @ V, GV)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mc_fisher_hvp_of_lm_loss_is_unbiased():
    model = _gpt2().eval()
    b = _lm_batch()
    logits = hf_lm_forward()(model, b).detach()
    lo = hf_lm_loss_of_output(fused="eager")
    U = torch.randn(1, *logits.shape, dtype=D)
    W = torch.randn(
        4, logits.numel(), dtype=D
    )  # projections: sums over many positions, near-normal
    draws = torch.stack(
        [
            W
            @ lo.mc_fisher_hvp(logits, b, U, generator=torch.Generator().manual_seed(s)).reshape(-1)
            for s in range(300)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / 300**0.5
    assert ((mean - W @ lo.hvp(logits, b, U).reshape(-1)).abs() <= 5 * se).all()


def test_errors(monkeypatch):
    model = _gpt2().eval()
    b = _lm_batch()
    with pytest.raises(ValueError, match="needs 'labels' in the batch"):
        hf_lm_loss()(model, {k: v for k, v in b.items() if k != "labels"})
    with pytest.raises(TypeError, match="expects dict batches"):
        hf_lm_forward()(model, (b["input_ids"],))
    with pytest.raises(ValueError, match="fused must be one of"):
        hf_lm_loss_of_output(fused="fast")
    with pytest.raises(ValueError, match=r"expects \(batch, seq, vocab\) logits"):
        hf_lm_loss_of_output()(torch.zeros(3, VOCAB), b)
    with pytest.raises(ValueError, match="needs 'labels'"):
        hf_seq2seq_forward()(_t5(), {"input_ids": b["input_ids"]})
    monkeypatch.setitem(sys.modules, "transformers", None)
    hf._require_transformers.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'hessian-spectra\[hf\]'"):
            hf_lm_loss()
    finally:
        hf._require_transformers.cache_clear()
