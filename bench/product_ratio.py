"""Regenerate ``eigenpairs.PRODUCT_RATIO``: products of ``block_lanczos(block_size=b)``
over those of ``lanczos``, both with their defaults (``tol=1e-6``), top-k.

On the float64 Hessians of the benchmark's MLP and causal transformer LM
(``workloads.py``), mean over workloads and ``--seeds`` seeds. Only product counts
matter here (not times), so the result does not depend on the machine.

Run by hand (a few minutes on 2 cores)::

    python bench/product_ratio.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import workloads

from hessian_spectra import HessianOperator, block_lanczos, lanczos

KS = (1, 5, 10, 20)
BS = (2, 4, 8, 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--workloads", nargs="+", default=["mlp", "lm"])
    args = p.parse_args()
    torch.set_num_threads(2)
    ratios: dict[int, dict[int, list[float]]] = {k: {b: [] for b in BS} for k in KS}
    for name in args.workloads:
        w = workloads.build(name)
        op = HessianOperator(w.model, w.batches, w.loss_fn)
        for k in KS:
            for seed in range(args.seeds):
                single = lanczos(op, k, seed=seed)
                assert single.converged
                for b in BS:
                    blk = block_lanczos(op, k, block_size=b, seed=seed)
                    assert blk.converged
                    ratios[k][b].append(blk.num_matvecs / single.num_matvecs)
                    print(
                        f"{name} k={k} seed={seed} b={b}: {blk.num_matvecs} / {single.num_matvecs}",
                        flush=True,
                    )
    print("PRODUCT_RATIO = {")
    for k in KS:
        row = ", ".join(f"{b}: {statistics.fmean(ratios[k][b]):.2f}" for b in BS)
        print(f"    {k}: {{{row}}},")
    print("}")


if __name__ == "__main__":
    main()
