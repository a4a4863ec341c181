"""Which aten operators a block of Hessian products spends its time in.

Builds a benchmark workload (``workloads.py``), keeps one ``HessianOperator`` with
the second-backward mechanism forced (``--mechanism vmap|loop``), and prints the
``torch.profiler`` table of one block of ``--rows`` products (after a warm-up
block), by self CPU time. Run by hand::

    python bench/profile_product.py --workload cnn --mechanism loop
    python bench/profile_product.py --workload cnn --mechanism vmap
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))

import workloads  # noqa: E402

from hessian_spectra import HessianOperator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="cnn", choices=list(workloads.WORKLOADS))
    p.add_argument("--mechanism", default="loop", choices=["vmap", "loop"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    w = workloads.build(a.workload)
    op = HessianOperator(w.model, w.batches, w.loss_fn)
    op.block_mechanism = a.mechanism
    op.block_bytes = 2**40  # the block in one pass (vmap), not the default one row
    op.graph_cache_bytes = 0  # profile the whole product: forward, first and second backward
    V = torch.randn(a.rows, op.size, dtype=next(w.model.parameters()).dtype)
    op @ V
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        op @ V
    print(f"{a.workload}: one block of {a.rows} products ({a.mechanism}), {w.num_samples} samples")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
