"""The least time any Krylov solver of products could need for the top-k eigenvalues.

For each workload: the smallest Krylov dimension ``m`` at which plain Lanczos
(one random start, full reorthogonalization, no restarts, no stopping test:
the best a single-vector Krylov method can do with ``m`` products) has its top
``k`` Ritz values within ``--target`` (relative) of the dense reference
(``reference.py``), for ``--seeds`` starts; times the steady-state product of
``HessianOperator`` (graphs kept, best of ``--reps``) and one full-data
gradient; and, given a results file of ``run.py``, the floor ``m x product``
as a share of curvlinops + ``eigsh``'s time in that run.

Also a mixed-precision variant: the same Lanczos on a float32 copy of the model,
then one float64 block of ``k`` products for a Rayleigh-Ritz step on its top
``k`` Ritz vectors (the float32 products' rounding limits the float32 run itself).

Run by hand (about a minute per workload on 2 cores)::

    python bench/krylov_floor.py --workloads cnn --results bench/results/cpu-full.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))

import peers
import workloads

import reference
from hessian_spectra import HessianOperator


def ritz_curve(
    op: HessianOperator, m: int, seed: int, ref: Tensor, k: int
) -> tuple[list[float], Tensor, Tensor]:
    """Max relative error of the top-``k`` Ritz values after ``j = 1..m`` products,
    and the basis with its products."""
    dt = op.dtype
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(op.size, generator=g, dtype=torch.float64).to(dt)
    q /= q.norm()
    Q = torch.zeros(m, op.size, dtype=dt)
    AQ = torch.zeros(m, op.size, dtype=dt)
    errs: list[float] = []
    for j in range(m):
        Q[j] = q
        AQ[j] = (op @ q[None])[0]
        r = AQ[j] - Q[: j + 1].T @ (Q[: j + 1] @ AQ[j])
        r -= Q[: j + 1].T @ (Q[: j + 1] @ r)  # twice is enough
        q = r / r.norm()
        T = (Q[: j + 1] @ AQ[: j + 1].T).double()
        theta = torch.linalg.eigvalsh((T + T.T) / 2).flip(0)
        errs.append(
            float(((theta[:k] - ref[: len(theta[:k])]).abs() / ref[: len(theta[:k])]).max())
            if j + 1 >= k
            else float("inf")
        )
    return errs, Q, AQ


def first_below(errs: list[float], target: float) -> int | None:
    return next((j + 1 for j, e in enumerate(errs) if e <= target), None)


def best_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def refine_in_float64(op64: HessianOperator, Q: Tensor, AQ: Tensor, m: int, k: int) -> Tensor:
    """Top-k eigenvalues after a float64 Rayleigh-Ritz step on the top-k Ritz vectors of
    the first ``m`` float32 Lanczos vectors (``k`` float64 products)."""
    T = (Q[:m] @ AQ[:m].T).double()
    _, S = torch.linalg.eigh((T + T.T) / 2)
    X, _ = torch.linalg.qr((S[:, -k:].T @ Q[:m].double()).T)
    X = X.T.contiguous()
    AX = op64 @ X
    return torch.linalg.eigvalsh((X @ AX.T + AX @ X.T) / 2).flip(0)


def eigsh_seconds(results: Path | None, workload: str, task: str) -> float | None:
    if results is None or not results.exists():
        return None
    data = json.loads(results.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    times = [
        r["seconds"]
        for r in rows
        if r.get("workload") == workload
        and r.get("task") == task
        and r.get("tool") == "curvlinops"
        and r.get("status") == "ok"
        and r.get("seconds")
    ]
    return min(times) if times else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["cnn"], choices=list(workloads.WORKLOADS))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--target", type=float, default=1e-6)
    p.add_argument("--max-m", type=int, default=60)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for name in a.workloads:
        report(name, a)


def report(name: str, a: argparse.Namespace) -> None:
    w = workloads.build(name)
    ref = torch.tensor(reference.reference(w)["top"][: a.k], dtype=torch.float64)
    op = HessianOperator(w.model, w.batches, w.loss_fn, seed=0)
    model32 = copy.deepcopy(w.model).float()
    batches32 = [tuple(t.float() if t.is_floating_point() else t for t in b) for b in w.batches]
    op32 = HessianOperator(model32, batches32, w.loss_fn, seed=0)
    v = torch.randn(1, op.size, dtype=op.dtype)
    Vk = torch.randn(a.k, op.size, dtype=op.dtype)
    with op.keep_graphs(), op32.keep_graphs():  # graphs kept, as inside a Krylov run
        t_prod = best_time(lambda: op @ v, a.reps)
        t_prod32 = best_time(lambda: op32 @ v.float(), a.reps)
        t_block64 = best_time(lambda: op @ Vk, a.reps)
    t_grad = best_time(peers.gradient_fn(w), a.reps)
    ms, mixed = [], []
    for seed in range(a.seeds):
        errs, _, _ = ritz_curve(op, a.max_m, seed, ref, a.k)
        ms.append(first_below(errs, a.target))
        errs32, Q, AQ = ritz_curve(op32, a.max_m, seed, ref, a.k)
        m32 = next(
            (
                m
                for m in range(a.k, a.max_m + 1)
                if errs32[m - 1] <= 1e-2
                and float(((refine_in_float64(op, Q, AQ, m, a.k)[: a.k] - ref).abs() / ref).max())
                <= a.target
            ),
            None,
        )
        mixed.append(m32)
    eig = eigsh_seconds(a.results, name, f"top{a.k}")
    known = [m for m in ms if m is not None]
    m_floor = min(known) if known else None
    print(f"{name}: {w.num_params} parameters, top-{a.k} to {a.target:g} relative")
    print(
        f"  gradient {t_grad * 1e3:.1f} ms; product {t_prod * 1e3:.1f} ms "
        f"({t_prod / t_grad:.2f}x); float32 product {t_prod32 * 1e3:.1f} ms; "
        f"float64 block of {a.k} {t_block64 * 1e3:.1f} ms"
    )
    print(f"  plain Lanczos (float64) reaches it at m = {ms} products (seeds 0..{a.seeds - 1})")
    if m_floor is not None:
        floor = m_floor * t_prod
        line = f"  floor: {m_floor} x {t_prod * 1e3:.1f} ms = {floor * 1e3:.0f} ms"
        if eig:
            line += f" = {floor / eig:.2f}x curvlinops+eigsh ({eig:.2f} s in {a.results})"
        print(line)
    known32 = [m for m in mixed if m is not None]
    if known32:
        m32 = min(known32)
        mixed_t = m32 * t_prod32 + t_block64
        line = (
            f"  mixed: float32 Lanczos m = {mixed} then one float64 block of {a.k}: "
            f"{m32} x {t_prod32 * 1e3:.1f} ms + {t_block64 * 1e3:.0f} ms = "
            f"{mixed_t * 1e3:.0f} ms"
        )
        if eig:
            line += f" = {mixed_t / eig:.2f}x"
        print(line)
    else:
        print(f"  mixed: not reached within m = {a.max_m} ({mixed})")


if __name__ == "__main__":
    main()
