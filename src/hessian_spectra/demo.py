"""The built-in demo: Hessian spectrum of a small MLP trained on scikit-learn's digits.

Runs offline (the digits data ships inside scikit-learn) in about a minute on
two CPU cores: trains the MLP, then reports the top Hessian eigenvalues with
their true residuals, the Hutch++ trace with its standard error, and a
stochastic-Lanczos-quadrature spectral density (written as a PNG), all saved
to a JSON report.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessian_spectra.algorithms.density import spectral_density
from hessian_spectra.algorithms.lanczos import lanczos
from hessian_spectra.algorithms.trace import trace
from hessian_spectra.operators.hessian import HessianOperator
from hessian_spectra.report import density_summary, format_eigen, format_trace, plot_density

__all__ = ["load_digits_data", "run_demo"]

log = logging.getLogger(__name__)


_NUM_PARAMETERS = 64 * 32 + 32 + 32 * 10 + 10  # the demo MLP 64-32-10


def load_digits_data(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80/20 with a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the demo needs scikit-learn: pip install 'hessian-spectra[demo]'"
        ) from err
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=dtype) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return X[tr], y[tr], X[te], y[te]


def _train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (256,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn(model(X), y))


def run_demo(
    out_dir: str | Path = "hessian-spectra-demo",
    *,
    seed: int = 0,
    k: int = 5,
    train_steps: int = 300,
    trace_matvecs: int = 150,
    density_runs: int = 8,
    density_steps: int = 80,
    verify: bool = True,
    echo: Any = print,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train the digits MLP and analyse its loss Hessian; returns the report dict.

    Args:
        out_dir: where ``density.png`` and ``report.json`` are written.
        seed: seeds the data split, the initialisation, training and every
            estimator, so a rerun gives the same numbers.
        k: number of top eigenpairs (at most the MLP's 2410 parameters).
        verify: also form the dense Hessian and report the errors of the
            eigenvalues and of the trace estimate against it.
        echo: a ``print``-like callable for the report lines (``None``: silent).
        progress: progress bars of the products of each step (default: on unless
            ``HESSIAN_SPECTRA_PROGRESS=0``).

    Raises:
        ValueError: ``out_dir`` is an existing file, ``seed`` is outside
            ``[0, 2**63)``, or ``k`` is not between 1 and the number of parameters.
    """
    from hessian_spectra.progress import operator_progress

    say = echo or (lambda *a, **kw: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"out_dir {str(out)!r} exists and is not a directory; give a directory (new or "
            "existing) for density.png and report.json"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= _NUM_PARAMETERS:
        raise ValueError(
            f"k must be an int from 1 to {_NUM_PARAMETERS} (the demo MLP's number of "
            f"parameters), got {k!r}"
        )
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = load_digits_data(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    train_loss = _train(model, Xtr, ytr, train_steps, seed)
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).double().mean())
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"digits MLP 64-32-10 ({n_params} parameters, float64): train loss {train_loss:.4f}, "
        f"test accuracy {acc:.3f} [{time.perf_counter() - t0:.1f} s]"
    )

    # Batches of 256: the last one is smaller, and the operator weights by sample count.
    batches = [(Xtr[i : i + 256], ytr[i : i + 256]) for i in range(0, len(ytr), 256)]
    H = HessianOperator(model, batches, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    say(f"Hessian over {len(ytr)} training samples in {len(batches)} batches: {H.size} x {H.size}")

    t1 = time.perf_counter()
    with operator_progress(H, progress, total=2 * max(2 * k + 1, 20), desc="top eigenvalues"):
        eig = lanczos(H, k=k, which="LA", seed=seed)
    say(
        format_eigen(eig, title=f"top-{k} Hessian eigenvalues")
        + f"  [{time.perf_counter() - t1:.1f} s]"
    )

    t2 = time.perf_counter()
    with operator_progress(H, progress, total=trace_matvecs, desc="trace"):
        tr = trace(H, num_matvecs=trace_matvecs, method="hutch++", seed=seed)
    say(format_trace(tr) + f"  [{time.perf_counter() - t2:.1f} s]")

    t3 = time.perf_counter()
    with operator_progress(H, progress, total=density_runs * density_steps, desc="density"):
        dens = spectral_density(H, num_runs=density_runs, lanczos_steps=density_steps, seed=seed)
    summary = density_summary(dens)
    png = plot_density(
        dens,
        out / "density.png",
        markers=eig.eigenvalues.tolist(),
        title="digits MLP: Hessian spectral density (SLQ)",
    )
    say(
        "spectral density (SLQ, {num_runs} runs, {num_matvecs} products): support [{min:.3e}, {max:.3e}], "
        "bulk 5-95% [{q05:.2e}, {q95:.2e}], negative mass {negative_mass:.3f}".format(**summary)
        + f"  [{time.perf_counter() - t3:.1f} s]"
    )
    check: dict[str, Any] = {}
    if verify:
        # small enough to form: compare with the exact spectrum of the dense float64 Hessian
        t4 = time.perf_counter()
        with operator_progress(H, progress, total=H.size, desc="dense check"):
            dense = H.to_dense()
        exact = torch.linalg.eigvalsh(dense).flip(0)
        eig_err = float(((eig.eigenvalues - exact[:k]).abs() / exact[:k].abs()).max())
        tr_exact = float(exact.sum())
        z = (tr.estimate - tr_exact) / tr.stderr if tr.stderr > 0 else float("inf")
        check = {"max_rel_error_top_k": eig_err, "exact_trace": tr_exact, "trace_z_score": z}
        say(
            f"check against the dense Hessian ({H.size} products): top-{k} max relative error "
            f"{eig_err:.1e}; exact trace {tr_exact:.6e}, estimate off by {z:+.2f} s.e."
            f"  [{time.perf_counter() - t4:.1f} s]"
        )
    report = {
        "model": "MLP 64-32-10 (tanh), float64",
        "num_parameters": n_params,
        "train_loss": train_loss,
        "test_accuracy": acc,
        "num_samples": len(ytr),
        "top_eigenvalues": eig.to_dict(),
        "trace": tr.to_dict(),
        "density_summary": summary,
        "dense_check": check,
        "density": {"grid": dens.grid.tolist(), "density": dens.density.tolist()},
        "seconds": time.perf_counter() - t0,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    say(f"wrote {png} and {out / 'report.json'}  [total {report['seconds']:.1f} s]")
    return report
