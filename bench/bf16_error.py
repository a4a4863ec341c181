"""Error of bf16 curvature against the same model in float32, and float32 against float64.

Usage::

    python bench/bf16_error.py            # MLP and a small GPT-2-style LM, CPU, a few minutes

Each model's weights (and float inputs) are rounded to bfloat16 first, then cast
to float32 and float64, so the three copies are the same function and the
differences measure the arithmetic alone. For the Hessian and the GGN (closed-form
cross-entropy) of each copy: the top ``k`` eigenvalues by ``lanczos`` and the
trace by Hutch++ with the same probes (seed 0); reported is the largest relative
error of the top eigenvalues, ``max_i |λ_i - λ_i^ref| / |λ_1^ref|``, and the
relative error of the trace, each against the next wider dtype and against float64.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hessian_spectra.algorithms import hutch_plus_plus, lanczos
from hessian_spectra.losses import (
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
)
from hessian_spectra.operators.ggn import GGNOperator
from hessian_spectra.operators.hessian import HessianOperator

DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def _mlp_case(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    )
    model = model.to(torch.bfloat16).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=g).to(torch.bfloat16).to(dtype)
    y = torch.randint(0, 5, (256,), generator=g)
    data = [(x[:128], y[:128]), (x[128:], y[128:])]
    H = HessianOperator(model, data, supervised_loss(F.cross_entropy))
    G = GGNOperator(model, data, supervised_forward(), supervised_loss_of_output(F.cross_entropy))
    return H, G


def _lm_case(dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=512,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(torch.bfloat16).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (4, 32), generator=g)
    data = [{"input_ids": ids, "labels": ids.clone()}]
    H = HessianOperator(model, data, hf_lm_loss())
    G = GGNOperator(model, data, hf_lm_forward(), hf_lm_loss_of_output("eager"))
    return H, G


def run(case, k: int, matvecs: int) -> dict:
    out: dict = {}
    for dtype in DTYPES:
        H, G = case(dtype)
        for name, op in (("Hessian", H), ("GGN", G)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eig = lanczos(op, k=k, seed=0)
            tr = hutch_plus_plus(op, matvecs, seed=0)
            conv = bool(torch.as_tensor(eig.converged).all())
            warned = any("converge" in str(w.message).lower() for w in caught)
            out[name, dtype] = (eig.eigenvalues.double(), float(tr.estimate), conv, warned, op.size)
    return out


def _err(a, b) -> tuple[float, float]:
    (ea, ta, *_), (eb, tb, *_) = a, b
    return float((ea - eb).abs().max() / eb.abs().max()), abs(ta - tb) / abs(tb)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--matvecs", type=int, default=60)
    args = ap.parse_args()
    print(
        "| model | params | operator | λ1 (float64) | bf16 vs f32: top-k | bf16 vs f32: trace "
        "| f32 vs f64: top-k | f32 vs f64: trace | bf16 vs f64: top-k | bf16 vs f64: trace "
        "| bf16 lanczos converged |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, case in (
        ("MLP 20-32-32-5, 256 samples", _mlp_case),
        ("GPT-2 (2 layers, d 32, vocab 512), 4 x 32 tokens", _lm_case),
    ):
        res = run(case, args.k, args.matvecs)
        for name in ("Hessian", "GGN"):
            r64, r32, r16 = (res[name, d] for d in DTYPES)
            e1632, e3264, e1664 = _err(r16, r32), _err(r32, r64), _err(r16, r64)
            conv = "yes" if r16[2] else ("no, warned" if r16[3] else "no")
            print(
                f"| {label} | {r64[4]} | {name} | {float(r64[0][0]):.4g} "
                f"| {e1632[0]:.1e} | {e1632[1]:.1e} | {e3264[0]:.1e} | {e3264[1]:.1e} "
                f"| {e1664[0]:.1e} | {e1664[1]:.1e} | {conv} |"
            )


if __name__ == "__main__":
    main()
