"""The GGN product at language-model vocabulary: memory by allocation counts, values
against dense float64 references; bf16 models end to end."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra.algorithms import ConvergenceWarning, lanczos
from hessian_spectra.losses import (
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
)
from hessian_spectra.losses.fused_ce import ce_hvp, chunk_rows
from hessian_spectra.memory import track_allocations
from hessian_spectra.operators._functional import LeanLinearTangents
from hessian_spectra.operators.ggn import GGNOperator
from hessian_spectra.operators.hessian import HessianOperator
from reference import dense_loss_hessian, tol
from test_ggn import dense_ggn_products

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from hessian_spectra.losses import hf_lm_forward, hf_lm_loss, hf_lm_loss_of_output  # noqa: E402

D = torch.float64
BF = torch.bfloat16


def _gpt2(vocab, n_embd=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=n_embd,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def _batch(vocab, B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that does not count
    return {"input_ids": ids, "labels": labels}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- memory ---------------------------------------------------------------------------


def test_ggn_product_at_large_vocabulary_peaks_below_one_training_step():
    """One GGN product (one vector) allocates at most what one training step does
    (forward and backward of the cross-entropy, parameter gradients included), both
    counted above the model and the data. The logits (64 tokens x 16384) dominate:
    a training step holds about three logits-sized tensors at its peak."""
    vocab = 16384
    model = _gpt2(vocab)
    b = _batch(vocab, 2, 32)
    loss_fn = hf_lm_loss()
    loss_fn(model, b).backward()
    model.zero_grad(set_to_none=True)
    with track_allocations() as step:
        loss_fn(model, b).backward()
    model.zero_grad(set_to_none=True)
    logits_bytes = 2 * 32 * vocab * 4
    assert step.peak_bytes >= 2 * logits_bytes  # the counter sees the logits' buffers

    G = GGNOperator(model, [b], hf_lm_forward(), hf_lm_loss_of_output("eager"))
    v = torch.randn(G.size, generator=torch.Generator().manual_seed(2))
    first = G @ v  # the first product also runs the operator's one-time checks
    with track_allocations() as ggn:
        again = G @ v
    assert ggn.peak_bytes <= step.peak_bytes, (ggn.peak_mib, step.peak_mib)
    torch.testing.assert_close(again, first, rtol=0, atol=0)

    # the same product by autograd's double backward of the loss (no closed form,
    # no in-place product), in float32
    Ga = GGNOperator(model, [b], hf_lm_forward(), hf_lm_loss_of_output(), loss_hvp="autograd")
    assert _rel(again, Ga @ v) < 1e-4


def test_ggn_product_of_an_lm_equals_dense_reference_over_several_ce_chunks():
    vocab = 40
    model = _gpt2(vocab).double()
    b = _batch(vocab, 2, 9)  # 18 positions: chunks of 3 rows
    assert chunk_rows(18, vocab) < 18
    lo = hf_lm_loss_of_output("eager")
    G = GGNOperator(model, [b], hf_lm_forward(), lo)
    V = torch.randn(3, G.size, generator=torch.Generator().manual_seed(3), dtype=D)
    want = dense_ggn_products(model, b, hf_lm_forward(), lo, V)
    torch.testing.assert_close(G @ V, want, rtol=0, atol=tol(D) * want.abs().max().item())
    torch.testing.assert_close(G @ V[0], want[0], rtol=0, atol=tol(D) * want.abs().max().item())


def _ce_reference(z, u, y):
    H = torch.func.hessian(lambda t: F.cross_entropy(t, y, ignore_index=-100))(z.double())
    return torch.einsum("ncmd,kmd->knc", H, u.double())


@pytest.mark.parametrize("dtype", [D, torch.float32, BF])
def test_ce_hvp_in_place_over_chunks_matches_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    N, V, k = 19, 11, 2
    z = (3 * torch.randn(N, V, generator=g, dtype=D)).to(dtype)
    u = torch.randn(k, N, V, generator=g, dtype=D).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    want = _ce_reference(z, u, y)
    atol = (tol(dtype) if dtype != torch.float32 else tol(torch.float32)) * want.abs().max()
    fresh = ce_hvp(z, u, y, fused="eager")
    torch.testing.assert_close(fresh.double(), want, rtol=0, atol=atol.item())
    w = u.clone()
    got = ce_hvp(z, w, y, fused="eager", out=w)
    assert got.data_ptr() == w.data_ptr() and got.dtype == dtype
    torch.testing.assert_close(got, fresh, rtol=0, atol=0)  # same chunks, same bits
    one = u[1].clone()
    torch.testing.assert_close(ce_hvp(z, one, y, fused="eager", out=one), fresh[1], rtol=0, atol=0)


def test_ce_hvp_out_is_checked():
    z, u, y = torch.zeros(4, 5), torch.ones(1, 4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="out must be a tensor of u's shape"):
        ce_hvp(z, u, y, out=torch.empty(1, 4, 4))
    with pytest.raises(ValueError, match="out must be a tensor of u's shape"):
        ce_hvp(z, u, y, out=torch.empty(1, 4, 5, dtype=D))
    wide = torch.ones(1, 5, 5)
    with pytest.raises(ValueError, match="shares no memory with u"):
        ce_hvp(z, wide[:, :4], y, out=wide[:, 1:])


def test_chunk_rows():
    assert chunk_rows(1, 50257) == 1
    assert chunk_rows(64, 10) == 8  # an eighth of the rows
    assert chunk_rows(16384, 50257) == (1 << 22) // 50257  # at most 2**22 entries
    assert chunk_rows(16384, 50257, k=4) == (1 << 22) // (4 * 50257)


# -- the linear layer's forward-mode rule ----------------------------------------------


def _head(x, W, b):
    return torch.tanh(F.linear(torch.sin(x), W, b))


@pytest.mark.parametrize("bias", [True, False])
def test_LeanLinearTangents_equal_the_default_rule(bias):
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(3, 5, 4, generator=g, dtype=D), torch.randn(7, 4, generator=g, dtype=D)
    b = torch.randn(7, generator=g, dtype=D) if bias else None
    tx, tW = torch.randn_like(x), torch.randn_like(W)
    tb = torch.randn_like(b) if bias else None
    primals = (x, W) + ((b,) if bias else ())
    tangents = (tx, tW) + ((tb,) if bias else ())

    def f(*a):
        return _head(a[0], a[1], a[2] if bias else None)

    want = torch.func.jvp(f, primals, tangents)[1]
    with LeanLinearTangents():
        got = torch.func.jvp(f, primals, tangents)[1]
    torch.testing.assert_close(got, want, rtol=0, atol=tol(D))
    # only the weight moves; only the input moves
    for i in (0, 1):
        fi = lambda t, i=i: f(*[t if j == i else p for j, p in enumerate(primals)])  # noqa: E731
        want_i = torch.func.jvp(fi, (primals[i],), (tangents[i],))[1]
        with LeanLinearTangents():
            got_i = torch.func.jvp(fi, (primals[i],), (tangents[i],))[1]
        torch.testing.assert_close(got_i, want_i, rtol=0, atol=tol(D))
    # a block of tangents under vmap
    T = [torch.randn(3, *t.shape, generator=g, dtype=D) for t in tangents]
    batched = lambda *t: torch.func.jvp(f, primals, t)[1]  # noqa: E731
    want_b = torch.func.vmap(batched)(*T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow per-row fallback
        with LeanLinearTangents():
            got_b = torch.func.vmap(batched)(*T)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=tol(D))


def test_lean_linear_tangent_holds_two_outputs_where_the_default_holds_four():
    N, d, V = 64, 4, 8192
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    tx, tW = torch.randn_like(x), torch.randn_like(W)
    out_bytes = N * V * 4

    def f(x, W):
        return F.linear(x, W)

    with track_allocations() as default:
        torch.func.jvp(f, (x, W), (tx, tW))
    with LeanLinearTangents(), track_allocations() as lean:
        torch.func.jvp(f, (x, W), (tx, tW))
    assert default.peak_bytes >= 4 * out_bytes
    assert 2 * out_bytes <= lean.peak_bytes < 2.5 * out_bytes


def test_track_allocations_counts_live_bytes():
    with track_allocations() as mem:
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB
        del a
        c = torch.empty(1 << 18)  # 1 MiB
    assert mem.peak_bytes == 6 * 2**20
    assert mem.end_bytes == 3 * 2**20
    assert mem.allocations == 3
    del b, c


# -- bf16 end to end --------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(BF)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g).to(BF)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, [(x[:16], y[:16]), (x[16:], y[16:])]


def test_bf16_mlp_hessian_and_ggn_products_against_float64():
    """bf16 products of a bf16 model against float64 references of the same (bf16-valued)
    weights and data: within the bf16 tolerance of the reference's largest entry."""
    model, data = _mlp()
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=D).to(BF)
    H = HessianOperator(model, data, supervised_loss(F.cross_entropy))
    Hd = dense_loss_hessian(model, data, supervised_loss(F.cross_entropy))
    got = H @ V
    assert got.dtype == BF
    want = V.double() @ Hd
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol(BF) * want.abs().max().item())

    G = GGNOperator(model, data, supervised_forward(), supervised_loss_of_output(F.cross_entropy))
    G64 = GGNOperator(
        copy.deepcopy(model).double(),
        [(x.double(), y) for x, y in data],
        supervised_forward(),
        supervised_loss_of_output(F.cross_entropy),
    )
    Gd = G64.to_dense()
    got = G @ V
    assert got.dtype == BF
    want = V.double() @ Gd
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol(BF) * want.abs().max().item())

    # lanczos on the bf16 GGN: converged within bf16's accuracy, or said that it did not
    lam = torch.linalg.eigvalsh(Gd)[-1].item()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lanczos(G, k=1, seed=0)
    if not bool(torch.as_tensor(res.converged).all()):
        assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
    else:
        assert abs(float(res.eigenvalues[0]) - lam) <= tol(BF) * lam


def test_bf16_lm_ggn_product_against_float64():
    vocab = 37
    model = _gpt2(vocab, dtype=BF)
    b = _batch(vocab, 2, 6)
    lo = hf_lm_loss_of_output("eager")
    G = GGNOperator(model, [b], hf_lm_forward(), lo)
    V = torch.randn(2, G.size, generator=torch.Generator().manual_seed(4), dtype=D).to(BF)
    got = G @ V
    assert got.dtype == BF and torch.isfinite(got).all()
    want = dense_ggn_products(model.double(), b, hf_lm_forward(), lo, V.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol(BF) * want.abs().max().item())
