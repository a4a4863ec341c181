"""How far the top eigenvectors move between measurements at the edge of stability, and
what the warm block's size costs.

Usage::

    python bench/tracking_subspace.py [--lr 0.2] [--steps 1000] [--every 10]

The run of ``bench/tracking.py`` (full-batch GD on 500 scikit-learn digits, the tanh MLP
of ``examples/edge_of_stability.py``). Every ``every`` steps the top 8 eigenpairs to
``tol=1e-7`` are taken as the reference. Prints:

* the top eigenvalues at a few steps (the cluster near ``2/lr``);
* how much of the new top eigenvector the span of the previous measurement's top ``p``
  eigenvectors holds (mean and worst over the run), for ``p`` = 1, 2, 4, 8;
* :class:`CurvatureTracker` at its defaults with warm blocks of ``1 + extra`` vectors
  (``WARM_EXTRA``): products per unchecked measurement and the largest eigenvalue error.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

from edge_of_stability import digits, mlp, square_loss  # noqa: E402

import hessian_spectra.tracking as tracking  # noqa: E402
from hessian_spectra import CurvatureTracker, HessianOperator, lanczos  # noqa: E402


def trajectory(lr: float, steps: int, every: int) -> list[dict]:
    """The parameters and top-8 reference pairs at every measurement step."""
    data = [digits(500)]
    model = mlp()
    H = HessianOperator(model, data, square_loss)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        opt.zero_grad()
        square_loss(model, data[0]).backward()
        opt.step()
        if step % every == 0:
            ref = lanczos(H, k=8, which="LA", tol=1e-7, seed=0)
            theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
            out.append(
                {"step": step, "theta": theta, "evals": ref.eigenvalues, "evecs": ref.eigenvectors}
            )
    return out


def captured(prev: torch.Tensor, v: torch.Tensor) -> float:
    """Norm of the unit vector ``v``'s projection on the span of the rows of ``prev``."""
    Q, _ = torch.linalg.qr(prev.double().T)
    return float((Q.T @ v.double()).norm())


def tracked(snaps: list[dict], extra: int) -> tuple[float, float]:
    """Mean products of unchecked measurements and the largest relative error."""
    model = mlp()
    H = HessianOperator(model, [digits(500)], square_loss)
    tracking.WARM_EXTRA, saved = extra, tracking.WARM_EXTRA
    try:
        tracker = CurvatureTracker(H, k=1)
        prods, errs = [], []
        for s in snaps:
            torch.nn.utils.vector_to_parameters(s["theta"], model.parameters())
            rec = tracker.measure(s["step"])
            ref = float(s["evals"][0])
            errs.append(abs(rec.eigenvalues[0] - ref) / ref)
            if not rec.checked:
                prods.append(rec.num_matvecs)
    finally:
        tracking.WARM_EXTRA = saved
    return statistics.mean(prods), max(errs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    snaps = trajectory(a.lr, a.steps, a.every)
    print(f"GD lr={a.lr} (2/lr = {2 / a.lr:g}), top eigenvalues:")
    for s in snaps[:: max(1, len(snaps) // 5)]:
        print(f"  step {s['step']:5d}: " + " ".join(f"{x:.2f}" for x in s["evals"].tolist()))
    print("| previous top p | new top eigenvector held (mean) | worst |")
    print("|---|---|---|")
    for q in (1, 2, 4, 8):
        c = [captured(x["evecs"][:q], y["evecs"][0]) for x, y in itertools.pairwise(snaps)]
        print(f"| {q} | {statistics.mean(c):.3f} | {min(c):.3f} |")
    print("| warm block (vectors) | products per unchecked measurement | max rel. error |")
    print("|---|---|---|")
    for extra in (1, 2, 3, 5, 7):
        prods, err = tracked(snaps, extra)
        print(f"| {1 + extra} | {prods:.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
