"""Extra peak memory of a block product per row, against the bytes the graph saves.

For each benchmark workload (``workloads.py``), the Hessian operator with its rows
vmapped, and the GGN operator: the growth of the process's peak RSS (``VmHWM``,
reset between calls as in ``measure.py``) during one product of ``k`` rows, for
``k`` in ``--rows``, per row, next to the bytes each batch's graph saves (Hessian:
forward and ``create_graph`` backward; GGN: forward) and one parameter vector.
``operators/_chunks.py`` budgets a row from these. Run by hand (CPU, about a
minute)::

    python bench/block_memory.py
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import measure
import workloads

from hessian_spectra import GGNOperator, HessianOperator
from hessian_spectra.losses import supervised_forward, supervised_loss_of_output


def peak_growth_mib(op: object, V: torch.Tensor) -> float:
    gc.collect()
    base = measure._reset_peak()
    op @ V  # type: ignore[operator]
    peak = measure._status_kib("VmHWM")
    return float("nan") if base is None or peak is None else (peak - base) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(workloads.WORKLOADS))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        "| workload | operator | saved per batch (MiB) | vector (MiB) | extra peak per row (MiB), by rows |"
    )
    print("|---|---|---|---|---|")
    for name in a.workloads:
        w = workloads.build(name)
        H = HessianOperator(w.model, w.batches, w.loss_fn)
        H.block_mechanism, H.max_block = "vmap", max(a.rows)
        H.block_bytes = 2**40  # every row in one pass (the default budget is one row)
        G = GGNOperator(
            w.model, w.batches, supervised_forward(), supervised_loss_of_output(F.cross_entropy)
        )
        G.block_mechanisms.jvp = G.block_mechanisms.vjp = "vmap"
        G.max_block, G.block_bytes = max(a.rows), 2**40
        vec = H.size * 8 / 2**20
        for label, op in (("hessian", H), ("ggn", G)):
            with op.keep_graphs():  # graphs kept (Hessian), as inside a Krylov run
                op @ torch.randn(2, op.size, dtype=torch.float64)  # bytes counted
                if label == "hessian":
                    saved = op._graph_cache.nbytes / len(w.batches) / 2**20
                else:
                    saved = max(op._saved_bytes.values()) / 2**20  # one entry per batch shape
                per_row = []
                for k in a.rows:
                    grow = peak_growth_mib(op, torch.randn(k, op.size, dtype=torch.float64))
                    per_row.append(f"{k}: {grow / k:.2f}")
            print(
                f"| {name} | {label} | {saved:.2f} | {vec:.3f} | {', '.join(per_row)} |", flush=True
            )


if __name__ == "__main__":
    main()
