"""Hessian products and eigensolvers at realistic size on one device, float32.

Usage::

    python bench/gpu_check.py --device cuda [--out results/gpu-check.json]
    python bench/gpu_check.py --device cpu --small          # a quick run of the script

Two models of the sizes people analyse: a ResNet-style CNN with BatchNorm (eval
mode; 2.76M parameters, batch 64 of 32x32x3, 10 classes) and a GPT-2-style
LM built from ``transformers.GPT2Config`` (about 3.3M parameters, vocabulary 1024,
batch 16 x 128 tokens). For each, in one run: the time of one gradient, of one
Hessian product (first product of an operator; steady state inside an algorithm
call), of a block of 8 per vector, their peak memory relative to one training step
(``torch.cuda.max_memory_allocated`` above the model and data), the memory a
fresh operator keeps allocated from one product to the next (growth per product
over products 2-5), and ``lanczos``
top-1 / top-10 (which="LA") with its products and whether it converged. Times are
medians over ``--reps`` calls after a warm-up, with a device sync around each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realistic_models import cnn

from hessian_spectra import HessianOperator, lanczos


def workloads(device: str, small: bool) -> list[tuple[str, nn.Module, list[Any], Any]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = []
    net = cnn(8 if small else 48).to(device).eval()
    x = torch.randn(8 if small else 64, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)

    def ce(m: nn.Module, b: Any) -> torch.Tensor:
        return F.cross_entropy(m(b[0]), b[1])

    out.append(("cnn", net, [(x, y)], ce))
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=1024,
        bos_token_id=0,
        eos_token_id=0,
        n_positions=128,
        n_embd=64 if small else 256,
        n_layer=2 if small else 4,
        n_head=4,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    lm = GPT2LMHeadModel(cfg).to(device).eval()
    ids = torch.randint(0, 1024, (4 if small else 16, 32 if small else 128), generator=g).to(device)

    def lm_loss(m: nn.Module, b: Any) -> torch.Tensor:
        return m(input_ids=b, labels=b).loss

    out.append(("lm", lm, [ids], lm_loss))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str, reps: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, res = [], None
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        res = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def peak(fn: Any, device: str) -> float:
    """Peak bytes allocated during ``fn`` above what was allocated before it."""
    if not device.startswith("cuda"):
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return float(torch.cuda.max_memory_allocated() - base)


def measure(
    name: str, model: nn.Module, data: list[Any], loss_fn: Any, device: str, reps: int
) -> dict[str, Any]:
    """One workload's row."""
    n = sum(p.numel() for p in model.parameters())
    params = list(model.parameters())

    def grad() -> Any:
        return torch.autograd.grad(loss_fn(model, data[0]), params)

    t_grad, _ = timed(grad, device, reps)
    m_grad = peak(grad, device)
    v = torch.randn(n, device=device, generator=None)
    V8 = torch.randn(8, n, device=device)

    def fresh_product() -> Any:
        return HessianOperator(model, data, loss_fn) @ v

    t_fresh, _ = timed(fresh_product, device, reps)
    m_fresh = peak(fresh_product, device)
    op = HessianOperator(model, data, loss_fn)
    t_single, _ = timed(lambda op=op: op @ v, device, reps)
    t_block, _ = timed(lambda op=op: op @ V8, device, max(1, reps // 2))
    m_block = peak(lambda op=op: op @ V8, device)
    row: dict[str, Any] = {
        "workload": name,
        "params": n,
        "device": device,
        "grad_ms": 1e3 * t_grad,
        "product_first_over_grad": t_fresh / t_grad,
        "product_over_grad": t_single / t_grad,
        "block8_per_vector_over_grad": t_block / 8 / t_grad,
        "product_peak_over_grad_peak": m_fresh / m_grad if m_grad == m_grad else None,
        "block8_peak_over_grad_peak": m_block / m_grad if m_grad == m_grad else None,
    }
    if device.startswith("cuda"):  # memory retained between products (a leak would grow)
        probe = HessianOperator(model, data, loss_fn)
        sync(device)
        held = []
        for _ in range(5):
            probe @ v
            sync(device)
            held.append(torch.cuda.memory_allocated())
        row["retained_growth_mib_per_product"] = (held[-1] - held[1]) / 3 / 2**20
        del probe
    for k in (1, 10):
        sync(device)
        t = time.perf_counter()
        res = lanczos(HessianOperator(model, data, loss_fn), k=k, which="LA", seed=0)
        sync(device)
        row[f"top{k}_s"] = time.perf_counter() - t
        row[f"top{k}_products"] = res.num_matvecs
        row[f"top{k}_converged"] = bool(res.converged)
        row[f"top{k}_lambda1"] = float(res.eigenvalues[0])
    return row


def run(device: str, small: bool, reps: int) -> list[dict[str, Any]]:
    rows = []
    for name, model, data, loss_fn in workloads(device, small):
        row = measure(name, model, data, loss_fn, device, reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = run(a.device, a.small, a.reps)
    info = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
    }
    if a.out:
        Path(a.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
