"""What keeping each batch's gradient graph buys a Krylov run, and what products cost outside one.

``HessianOperator`` keeps each batch's differentiable gradient (its forward and first
backward) only inside one algorithm call or an explicit ``with op.keep_graphs():`` block.
This script times, per workload:

* ``lanczos(op, k=10)`` on a fresh operator (as a user's call runs);
* a second ``lanczos(op, k=10)`` on the same operator;
* 20 single products ``op @ v`` outside any algorithm, and (where the library has
  ``keep_graphs``) the same 20 inside ``with op.keep_graphs():``.

Forward passes are counted through the loss. Each timing is the median (and min) of
``--reps`` runs; the Lanczos runs must converge and agree with the first run's
eigenvalues to 1e-8 (relative) before their times are printed. Compare two versions by
running it with each on ``PYTHONPATH``::

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/graph_scope.py
    OMP_NUM_THREADS=2 PYTHONPATH=/tmp/old/src python bench/graph_scope.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import workloads

import hessian_spectra
from hessian_spectra import HessianOperator, lanczos


class Counted:
    """The workload's loss, counting its calls (one per batch forward)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, model, batch):
        self.calls += 1
        return self.fn(model, batch)


def _row(name: str, what: str, times: list[float], forwards: int, extra: str = "") -> None:
    med, best = statistics.median(times), min(times)
    print(f"| {name} | {what} | {med:.3f} | {best:.3f} | {forwards} | {extra} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--workloads", nargs="+", default=["mlp", "cnn"], choices=list(workloads.WORKLOADS)
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--products", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"library: {Path(hessian_spectra.__file__).parent}, threads: {a.threads}")
    print("| workload | run | median s | min s | forwards per run | notes |")
    print("|---|---|---|---|---|---|")
    for name in a.workloads:
        w = workloads.build(name)
        loss = Counted(w.loss_fn)
        nb = len(w.batches)
        ref = None
        fresh, again, fwd_fresh, fwd_again = [], [], 0, 0
        for rep in range(a.reps):
            op = HessianOperator(w.model, w.batches, loss)
            op.block_mechanism = "vmap"  # no mechanism measurement in the timings
            for times in (fresh, again):
                c0, t0 = loss.calls, time.perf_counter()
                r = lanczos(op, k=10, seed=rep)
                times.append(time.perf_counter() - t0)
                forwards = loss.calls - c0
                if times is fresh:
                    fwd_fresh = forwards
                else:
                    fwd_again = forwards
                ev = r.eigenvalues.double()
                if ref is None:
                    ref = ev
                if not r.converged or float((ev - ref).abs().max() / ref.abs().max()) > 1e-8:
                    raise SystemExit(f"{name}: lanczos did not converge to the first run's values")
            products = r.num_matvecs
        _row(
            name,
            "lanczos k=10, fresh operator",
            fresh,
            fwd_fresh,
            f"{products} products, {nb} batches",
        )
        _row(name, "lanczos k=10, same operator again", again, fwd_again, "")
        op = HessianOperator(w.model, w.batches, loss)
        op.block_mechanism = "vmap"
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(0), dtype=op.dtype)
        scopes = [("outside any scope", None)]
        if hasattr(op, "keep_graphs"):
            scopes.append(("inside op.keep_graphs()", op.keep_graphs))
        for label, scope in scopes:
            times = []
            for _ in range(a.reps):
                c0, t0 = loss.calls, time.perf_counter()
                if scope is None:
                    for _ in range(a.products):
                        op @ v
                else:
                    with scope():
                        for _ in range(a.products):
                            op @ v
                times.append(time.perf_counter() - t0)
            _row(name, f"{a.products} single products, {label}", times, loss.calls - c0, "")


if __name__ == "__main__":
    main()
