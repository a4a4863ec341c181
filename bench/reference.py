"""Tight references for the benchmark, independent of every tool compared.

The reference Hessian is built column by column with plain
``torch.autograd.grad`` double backward in float64 (one graph per batch,
reused for all ``n`` columns), weighted by each batch's sample count:

.. math::

    H e_i = \\sum_b \\frac{n_b}{N} \\nabla^2 L_b(\\theta) e_i .

From the dense ``H``: the exact trace, ``||H||_F^2`` (for the density's second
moment), and the eigenvalues, from ``torch.linalg.eigvalsh`` (all of them) when
``n <= dense_max``, else from ARPACK ``eigsh`` on the dense matrix with
``tol=0`` (machine precision). This costs ``n`` products, once: results are
cached in ``bench/results/reference.json`` keyed by the workload's
fingerprint (config + parameter, buffer and data bytes), so a later run with the
same workload reuses them and a changed workload recomputes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workloads import Workload

__all__ = ["CACHE", "dense_hessian", "reference"]

CACHE = Path(__file__).parent / "results" / "reference.json"
TOP = 20


def dense_hessian(w: Workload, progress: bool = False) -> torch.Tensor:
    """The float64 ``(n, n)`` Hessian of the sample-weighted mean loss of ``w``."""
    params = [p for p in w.model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    H = torch.zeros(n, n, dtype=torch.float64)
    offsets = np.cumsum([0] + [p.numel() for p in params])
    for bi, batch in enumerate(w.batches):
        weight = batch[0].shape[0] / w.num_samples
        loss = w.loss_fn(w.model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        units = [torch.zeros_like(p) for p in params]
        t0 = time.perf_counter()
        for j, p in enumerate(params):
            flat = units[j].view(-1)
            for i in range(p.numel()):
                flat[i] = 1.0
                cols = torch.autograd.grad(grads, params, units, retain_graph=True, allow_unused=True)
                flat[i] = 0.0
                col = torch.cat([
                    (c if c is not None else torch.zeros_like(q)).reshape(-1).to(torch.float64)
                    for c, q in zip(cols, params, strict=True)
                ])
                H[offsets[j] + i].add_(col, alpha=weight)
            if progress:
                done = offsets[j + 1]
                el = time.perf_counter() - t0
                print(f"  [{w.name}] batch {bi + 1}/{len(w.batches)}: {done}/{n} columns, {el:.0f}s", flush=True)
        del grads, loss
    return H


def _load() -> dict[str, Any]:
    if CACHE.exists():
        return json.loads(CACHE.read_text())
    return {}


def reference(w: Workload, *, dense_max: int = 16000, recompute: bool = False, progress: bool = True) -> dict[str, Any]:
    """Reference eigenvalues (top ``TOP``, descending), trace and Frobenius norm of ``w``'s Hessian.

    Cached in :data:`CACHE` by ``w.fingerprint()``.
    """
    key = f"{w.name}:{w.fingerprint()}"
    cache = _load()
    if key in cache and not recompute:
        return cache[key]
    if w.model.training:
        raise ValueError("reference expects the model in eval mode")
    t0 = time.perf_counter()
    H = dense_hessian(w, progress=progress)
    t_build = time.perf_counter() - t0
    asym = float((H - H.T).abs().max() / H.abs().max())
    H = 0.5 * (H + H.T)
    trace = float(H.diagonal().sum())
    fro2 = float((H * H).sum())
    t1 = time.perf_counter()
    n = H.shape[0]
    if n <= dense_max:
        ev = torch.linalg.eigvalsh(H)
        method = "torch.linalg.eigvalsh(dense float64 H)"
        top = ev.flip(0)[:TOP].tolist()
        lam_min = float(ev[0])
    else:
        from scipy.sparse.linalg import eigsh

        Hn = H.numpy()
        top = sorted(eigsh(Hn, k=TOP, which="LA", tol=0, return_eigenvectors=False).tolist(), reverse=True)
        lam_min = float(eigsh(Hn, k=1, which="SA", tol=0, return_eigenvectors=False)[0])
        method = "scipy eigsh(dense float64 H, tol=0)"
    t_eig = time.perf_counter() - t1
    entry = {
        "workload": w.name,
        "fingerprint": w.fingerprint(),
        "n": n,
        "top": top,
        "lambda_min": lam_min,
        "trace": trace,
        "fro2": fro2,
        "asymmetry": asym,
        "method": method,
        "seconds_build": round(t_build, 1),
        "seconds_eig": round(t_eig, 1),
        "torch": torch.__version__,
    }
    cache = _load()  # re-read: another workload may have been added meanwhile
    cache[key] = entry
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(cache, indent=1))
    return entry


if __name__ == "__main__":  # python bench/reference.py [names...]: fill the cache
    import sys

    import workloads

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    for name in sys.argv[1:] or list(workloads.WORKLOADS):
        wl = workloads.build(name)
        r = reference(wl)
        print(name, {k: r[k] for k in ("n", "trace", "lambda_min", "method", "seconds_build", "seconds_eig")})
        print("  top:", [f"{v:.10g}" for v in r["top"][:12]])
