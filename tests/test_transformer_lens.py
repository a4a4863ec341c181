"""TransformerLens helpers on a tiny HookedTransformer: loss identity, GGN against dense J^T H J."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from reference import tol
from test_ggn import dense_ggn_products

pytest.importorskip("transformer_lens")
from transformer_lens import HookedTransformer, HookedTransformerConfig

from hessian_spectra.losses import tlens_forward, tlens_loss, tlens_loss_of_output
from hessian_spectra.losses import transformer_lens as tl_mod
from hessian_spectra.operators.fisher import MCFisherOperator
from hessian_spectra.operators.ggn import GGNOperator
from hessian_spectra.params import match_names

D = torch.float64
VOCAB = 29


def _model():
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        n_ctx=8,
        d_head=4,
        n_heads=2,
        d_mlp=16,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        dtype=D,
        device="cpu",
        seed=0,
    )
    return HookedTransformer(cfg).eval()


def _batch(mask=True):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 6), generator=g)
    if not mask:
        return tokens
    return {
        "tokens": tokens,
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    }


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=tol(D) * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("mask", [False, True])
def test_loss_of_output_is_transformer_lens_loss(mask):
    model, b = _model(), _batch(mask)
    ours = tlens_loss_of_output(fused="eager")(tlens_forward()(model, b), b)
    _close(ours, tlens_loss()(model, b))
    _close(tlens_loss()(model, (b,) if not mask else b), ours)


def test_ggn_matches_dense_reference_and_autograd_path():
    model, b = _model(), _batch()
    lo = tlens_loss_of_output(fused="eager")
    G = GGNOperator(model, [b], tlens_forward(), lo)
    V = torch.randn(3, G.size, generator=torch.Generator().manual_seed(1), dtype=D)
    got = G @ V
    _close(got, dense_ggn_products(model, b, tlens_forward(), lo, V))
    _close(GGNOperator(model, [b], tlens_forward(), lo, loss_hvp="autograd") @ V, got)
    assert (V * got).sum(1).min() >= 0


def test_attention_only_ggn_is_the_diagonal_block():
    model, b = _model(), _batch()
    lo = tlens_loss_of_output(fused="eager")
    full = GGNOperator(model, [b], tlens_forward(), lo)
    attn = GGNOperator(model, [b], tlens_forward(), lo, param_filter=match_names("blocks.*.attn.*"))
    sl = full.layout.slices()
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in attn.names])
    V = torch.randn(2, attn.size, generator=torch.Generator().manual_seed(2), dtype=D)
    W = torch.zeros(2, full.size, dtype=D)
    W[:, idx] = V
    _close(attn @ V, (full @ W)[:, idx])


def test_mc_fisher_runs_and_model_is_untouched():
    model, b = _model(), _batch()
    before = copy.deepcopy(model.state_dict())
    op = MCFisherOperator(model, [b], tlens_forward(), tlens_loss_of_output(fused="eager"), seed=1)
    V = torch.randn(2, op.size, generator=torch.Generator().manual_seed(3), dtype=D)
    MV = op @ V
    torch.testing.assert_close(V[0] @ MV[1], V[1] @ MV[0], rtol=tol(D), atol=0)
    assert (V * MV).sum(1).min() >= 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors(monkeypatch):
    with pytest.raises(TypeError, match="TransformerLens helpers expect"):
        tlens_forward()(_model(), 3)
    with pytest.raises(ValueError, match="needs 'tokens'"):
        tlens_loss()(_model(), {"ids": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="matching tokens"):
        tlens_loss_of_output()(torch.zeros(2, 5, VOCAB), _batch())
    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    tl_mod._require_tlens.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'hessian-spectra\[tlens\]'"):
            tlens_loss()
    finally:
        tl_mod._require_tlens.cache_clear()
