"""Progressive sharpening and the edge of stability, on scikit-learn's bundled digits.

Run (a few minutes on 2 CPU cores)::

    python examples/edge_of_stability.py --out eos            # GD at lr 0.2 and 0.1
    python examples/edge_of_stability.py --adam --out eos     # + Adam, preconditioned sharpness

Full-batch gradient descent on a tanh MLP (squared loss on one-hot targets, 500 digits)
with learning rate ``lr``: the top Hessian eigenvalue (the sharpness) rises during
training until it reaches ``2 / lr``, and then hovers there while the loss keeps going
down non-monotonically (Cohen, Kaur, Li, Kolter, Talwalkar 2021, "Gradient descent on
neural networks typically occurs at the edge of stability"). With ``--adam`` the same
network trained by Adam: its *preconditioned* sharpness ``lambda_max(P^-1 H)`` settles
at ``(2 + 2 beta1) / ((1 - beta1) lr)`` = ``38 / lr`` (Cohen et al. 2022).

The sharpness is measured every ``--every`` steps by a :class:`CurvatureTracker`,
warm-started from the last Ritz vectors (with ``--adam`` also the preconditioned
sharpness, ``P`` read from the optimizer's state at each measurement). Writes
``<out>/eos.json`` (every record) and, with matplotlib, ``<out>/eos.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra import (
    CurvatureTracker,
    HessianOperator,
    stability_threshold,
)


def digits(num: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num`` digits (64 pixels scaled to [0, 1]) and one-hot targets."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X[:num] / 16.0, dtype=torch.float32)
    return x, F.one_hot(torch.tensor(y[:num]), 10).float()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    )


def square_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, t = batch
    return 0.5 * ((model(x) - t) ** 2).sum(1).mean()


def run(
    lr: float, steps: int, every: int, *, adam: bool = False, num: int = 500, tol: float = 1e-3
) -> dict[str, Any]:
    """Train and track; returns the thresholds and one row per measurement."""
    data = [digits(num)]
    model = mlp()
    H = HessianOperator(model, data, square_loss)
    # with Adam, also lambda_max(P^-1 H), P read from the optimizer at each measurement
    tracker = CurvatureTracker(H, k=1, every=every, tol=tol, preconditioned=adam)
    if adam:
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        threshold = stability_threshold(lr, beta1=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        threshold = stability_threshold(lr)
    rows, t0 = [], time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        loss = square_loss(model, data[0])
        loss.backward()
        opt.step()
        rec = tracker.maybe_measure(step, optimizer=opt)
        if rec is None:
            continue
        row = {
            "step": step,
            "loss": float(loss.detach()),
            "sharpness": rec.eigenvalues[0],
            "products": rec.num_matvecs,
            "warm": rec.warm_started,
        }
        if adam:
            row["preconditioned_sharpness"] = rec.extra["preconditioned_lambda_1"]
        rows.append(row)
    return {
        "lr": lr,
        "optimizer": "adam" if adam else "gd",
        "threshold": threshold,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        steps = [row["step"] for row in r["rows"]]
        key = "preconditioned_sharpness" if r["optimizer"] == "adam" else "sharpness"
        (line,) = axes[0].plot(
            steps, [row[key] for row in r["rows"]], label=f"{r['optimizer']} lr={r['lr']:g}"
        )
        axes[0].axhline(r["threshold"], color=line.get_color(), ls="--", lw=1)
        axes[1].plot(steps, [row["loss"] for row in r["rows"]], color=line.get_color())
    axes[0].set(xlabel="step", ylabel="sharpness (dashed: 2/lr or 38/lr)", yscale="log")
    axes[1].set(xlabel="step", ylabel="training loss", yscale="log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.2, 0.1])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--adam", action="store_true", help="also train with Adam (lr 2e-3)")
    p.add_argument("--out", type=Path, default=Path("eos"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = [run(lr, a.steps, a.every) for lr in a.lrs]
    if a.adam:
        runs.append(run(2e-3, a.steps, a.every, adam=True))
    for r in runs:
        last = r["rows"][-5:]
        key = "preconditioned_sharpness" if r["optimizer"] == "adam" else "sharpness"
        print(
            f"{r['optimizer']} lr={r['lr']:g}: threshold {r['threshold']:.4g}, sharpness over the "
            f"last {len(last)} measurements {[round(row[key], 3) for row in last]}, "
            f"{r['seconds']:.0f} s"
        )
    (a.out / "eos.json").write_text(json.dumps(runs, indent=1))
    try:
        plot(runs, a.out / "eos.png")
    except ImportError:
        print("matplotlib is not installed: no figure")


if __name__ == "__main__":
    main()
