"""Block products against single ones and a training step: time per vector and peak memory.

For each model (the benchmark's ``mlp``, ``cnn`` and ``lm`` from ``workloads.py``,
and the CNN with BatchNorm and GPT-2-style LM of ``gpu_check.py``, ``--small`` or
full size), in float32 on the CPU: one training step (forward and backward), one
Hessian product, and a block of 8 products with the operator's defaults and with
the rows forced through one vmapped pass or a loop; each built afresh (no kept
graphs) and, with ``--kept``, inside ``keep_graphs`` with the graphs kept. Times
are medians of ``--reps`` calls after a warm-up of the process's CPU time (all
threads; less sensitive to other work on a shared machine than wall time), per
vector relative to the training step; peaks are the growth of the process's peak RSS (``VmHWM``, reset
before each call) relative to the training step's. ``operators/_chunks.py`` and
``operators/_mechanism.py`` cite these figures. Run by hand::

    python bench/block_choice.py --threads 2 [--full] [--kept]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import gpu_check
import measure
import workloads

from hessian_spectra import HessianOperator


def peak_mib(fn: Any) -> float:
    gc.collect()
    base = measure._reset_peak()
    fn()
    peak = measure._status_kib("VmHWM")
    return float("nan") if base is None or peak is None else (peak - base) / 1024


def median_s(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def models(full: bool) -> list[tuple[str, Any, list[Any], Any]]:
    out = []
    for name in ("mlp", "cnn", "lm"):
        w = workloads.build(name, dtype=torch.float32)
        out.append((name, w.model, w.batches[:1], w.loss_fn))
    for name, model, data, loss_fn in gpu_check.workloads("cpu", small=not full):
        out.append((f"{name}-{'full' if full else 'small'}", model, data, loss_fn))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--full", action="store_true")
    p.add_argument("--kept", action="store_true")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--settings", nargs="*", default=["default", "loop", "vmap"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        "| model | params | step ms | step MiB | product t/step, MiB/step | "
        "block 8: setting | rows | per vector t/step | peak/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, data, loss_fn in models(a.full):
        if a.only and name not in a.only:
            continue
        one(a, name, model, data, loss_fn)


def one(a: argparse.Namespace, name: str, model: Any, data: list[Any], loss_fn: Any) -> None:
    """The rows of one model."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def step() -> Any:
        return torch.autograd.grad(loss_fn(model, data[0]), params)

    t_step, m_step = median_s(step, a.reps), peak_mib(step)
    v = torch.randn(n)
    V8 = torch.randn(8, n)
    op = HessianOperator(model, data, loss_fn)
    t1, m1 = median_s(lambda: op @ v, a.reps), peak_mib(lambda: op @ v)
    head = f"| {name} | {n} | {1e3 * t_step:.1f} | {m_step:.1f} | {t1 / t_step:.2f}, {m1 / m_step:.2f} "
    settings: list[tuple[str, str | None, int | None]] = [
        ("default", None, None),
        ("loop", "loop", None),
        ("vmap, 8 rows", "vmap", 2**40),
    ]
    for kept in (False, True) if a.kept else (False,):
        for label, mech, budget in settings:
            if label.split(",")[0] not in a.settings:
                continue
            blk = HessianOperator(model, data, loss_fn)
            if mech is not None:
                blk.block_mechanism = mech
            if budget is not None:
                blk.block_bytes = budget

            def run(blk: HessianOperator = blk) -> Any:
                return blk @ V8

            if kept:
                with blk.keep_graphs():
                    run()
                    t8, m8 = median_s(run, a.reps), peak_mib(run)
            else:
                t8, m8 = median_s(run, a.reps), peak_mib(run)
            tag = label + (" (kept graphs)" if kept else "")
            print(
                f"{head}| {tag} [{blk.block_mechanism}] | {blk.block_rows} | "
                f"{t8 / 8 / t_step:.2f} | {m8 / m_step:.2f} |",
                flush=True,
            )
            head = "| | | | | "


if __name__ == "__main__":
    main()
