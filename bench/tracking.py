"""Warm against cold measurements on the edge-of-stability run, and what tracking costs.

Usage::

    python bench/tracking.py [--lr 0.2] [--steps 1000] [--every 10] [--out bench/results/tracking.json]

Full-batch GD on 500 scikit-learn digits (``examples/edge_of_stability.py``'s tanh
MLP, float32). The same trajectory is trained four times (the tracker changes
nothing, so every run sees the same parameters at every step):

* ``none``: training alone;
* ``warm``: :class:`CurvatureTracker` with its defaults (tracking tolerance ``1e-3``,
  warm starts, multiplicity check every 10th measurement);
* ``cold``: the same tolerance, every measurement a fresh verified start
  (``lanczos(H, k=1, which="LA", tol=1e-3)``);
* ``cold_default``: ``lanczos(H, k=1, which="LA")`` at the float32 default tolerance
  (``1e-5``), what the tracker ran before it had a tracking tolerance.

For each: products per measurement, seconds of tracking against seconds of training,
and, after the timing, each measured eigenvalue's error against a tight reference
(``tol=1e-7``) at the same step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

from edge_of_stability import digits, mlp, square_loss  # noqa: E402

from hessian_spectra import CurvatureTracker, HessianOperator, lanczos  # noqa: E402


def run(kind: str, lr: float, steps: int, every: int) -> dict:
    data = [digits(500)]
    model = mlp()
    H = HessianOperator(model, data, square_loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = CurvatureTracker(H, k=1, every=every) if kind == "warm" else None
    train_s = track_s = 0.0
    rows = []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = square_loss(model, data[0])
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if kind == "none" or step % every:
            continue
        t0 = time.perf_counter()
        if tracker is not None:
            rec = tracker.measure(step)
            value, products, checked = rec.eigenvalues[0], rec.num_matvecs, rec.checked
        else:
            tol = 1e-3 if kind == "cold" else None
            res = lanczos(H, k=1, which="LA", tol=tol, seed=step)
            value, products, checked = float(res.eigenvalues[0]), res.num_matvecs, True
        track_s += time.perf_counter() - t0
        ref = float(lanczos(H, k=1, which="LA", tol=1e-7, seed=0).eigenvalues[0])  # not timed
        rows.append(
            {
                "step": step,
                "value": value,
                "products": products,
                "checked": checked,
                "rel_error": abs(value - ref) / abs(ref),
            }
        )
    return {"kind": kind, "train_s": train_s, "track_s": track_s, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracking.json")
    a = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    warnings.simplefilter("ignore")
    runs = [run(k, a.lr, a.steps, a.every) for k in ("none", "warm", "cold", "cold_default")]
    base = runs[0]["train_s"]
    print(
        f"GD lr={a.lr}, {a.steps} steps, a measurement every {a.every}; training alone {base:.2f} s"
    )
    print(
        "| measurement | products (mean) | unchecked / checked | max rel. error | tracking / training |"
    )
    print("|---|---|---|---|---|")
    cold = statistics.mean(r["products"] for r in runs[2]["rows"])
    for r in runs[1:]:
        prods = [x["products"] for x in r["rows"]]
        un = [x["products"] for x in r["rows"] if not x["checked"]]
        ch = [x["products"] for x in r["rows"] if x["checked"]]
        split = (
            f"{statistics.mean(un):.1f} / {statistics.mean(ch):.1f}"
            if un
            else f"- / {statistics.mean(ch):.1f}"
        )
        err = max(x["rel_error"] for x in r["rows"])
        print(
            f"| {r['kind']} | {statistics.mean(prods):.1f} ({statistics.mean(prods) / cold:.2f} of cold) "
            f"| {split} | {err:.1e} | {r['track_s'] / base:.0%} |"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
