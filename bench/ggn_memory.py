"""Peak allocated memory of one GGN product on a GPT-2-style LM, against one training step.

Usage::

    python bench/ggn_memory.py                       # vocab 50257, 4 x 128 tokens, float32, CPU
    python bench/ggn_memory.py --vocab 8192 --batch 2 --seq 64 --dtype bfloat16

Both are counted allocation by allocation
(:func:`hessian_spectra.memory.track_allocations`), above the model and the data:
the training step is ``hf_lm_loss()(model, batch).backward()`` (forward and
backward of the cross-entropy, parameter gradients included); the GGN product
is ``G @ v`` for one vector ``v`` (after a first product, which also runs the
operator's one-time checks). ``logits`` is one ``(tokens, vocab)`` tensor of the
model's dtype, the unit the peaks are also given in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hessian_spectra.losses.huggingface import hf_lm_forward, hf_lm_loss, hf_lm_loss_of_output
from hessian_spectra.memory import track_allocations
from hessian_spectra.operators.ggn import GGNOperator

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def lm(vocab: int, n_embd: int, n_layer: int, dtype: torch.dtype, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=max(seq, 8),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    return model


def measure(
    vocab: int,
    batch: int,
    seq: int,
    n_embd: int,
    n_layer: int,
    dtype: torch.dtype,
    fused: str = "auto",
) -> dict:
    model = lm(vocab, n_embd, n_layer, dtype, seq)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    data = [{"input_ids": ids, "labels": ids.clone()}]
    loss_fn = hf_lm_loss()
    loss_fn(model, data[0]).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with track_allocations() as step:
        loss_fn(model, data[0]).backward()
    model.zero_grad(set_to_none=True)
    G = GGNOperator(model, data, hf_lm_forward(), hf_lm_loss_of_output(fused))
    v = torch.randn(G.size, generator=g, dtype=dtype)
    G @ v
    with track_allocations() as ggn:
        G @ v
    logits = batch * seq * vocab * dtype.itemsize
    return {
        "vocab": vocab,
        "tokens": batch * seq,
        "dtype": str(dtype).removeprefix("torch."),
        "params": G.size,
        "logits_MiB": logits / 2**20,
        "step_MiB": step.peak_mib,
        "ggn_MiB": ggn.peak_mib,
        "ratio": ggn.peak_bytes / step.peak_bytes,
        "step_logits": step.peak_bytes / logits,
        "ggn_logits": ggn.peak_bytes / logits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    ap.add_argument("--fused", default="auto")
    args = ap.parse_args()
    r = measure(
        args.vocab, args.batch, args.seq, args.n_embd, args.n_layer, _DTYPES[args.dtype], args.fused
    )
    print(
        "| vocab | tokens | dtype | params | logits MiB | training step MiB | GGN product MiB "
        "| GGN / step | step / logits | GGN / logits |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {r['vocab']} | {r['tokens']} | {r['dtype']} | {r['params']} | {r['logits_MiB']:.1f} "
        f"| {r['step_MiB']:.1f} | {r['ggn_MiB']:.1f} | {r['ratio']:.2f} | {r['step_logits']:.2f} "
        f"| {r['ggn_logits']:.2f} |"
    )


if __name__ == "__main__":
    main()
