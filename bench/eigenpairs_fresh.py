"""``eigenpairs`` on a fresh operator: what its first call costs, probe included.

The benchmark (``run.py``) keeps one operator per workload, so only its first call
pays for the operator's vmap-or-loop measurement and ``eigenpairs``' probe. Here
every call gets a new ``HessianOperator``, as a user's first call does: time,
products, the solver chosen and the mechanism kept, for top-1 and top-10, over
``--reps`` seeds. Compare two versions of the library by running it with each on
``PYTHONPATH`` (e.g. a ``git worktree`` of an older commit's ``src``)::

    python bench/eigenpairs_fresh.py --workloads cnn lm mlp
    PYTHONPATH=/tmp/old/src python bench/eigenpairs_fresh.py --workloads cnn lm mlp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import workloads

import hessian_spectra
from hessian_spectra import HessianOperator, eigenpairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["cnn", "lm", "mlp"], choices=list(workloads.WORKLOADS))
    p.add_argument("--ks", nargs="+", type=int, default=[1, 10])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"library: {Path(hessian_spectra.__file__).parent}")
    print("| workload | k | seconds | products | chosen | mechanism |")
    print("|---|---|---|---|---|---|")
    for name in a.workloads:
        w = workloads.build(name)
        for k in a.ks:
            for rep in range(a.reps):
                op = HessianOperator(w.model, w.batches, w.loss_fn)
                t0 = time.perf_counter()
                r = eigenpairs(op, k, seed=rep)
                t = time.perf_counter() - t0
                print(f"| {name} | {k} | {t:.2f} | {r.num_matvecs} | {r.info['chosen']} | {op.block_mechanism} |", flush=True)


if __name__ == "__main__":
    main()
