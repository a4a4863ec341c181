"""Adapters that run each tool on a :class:`~workloads.Workload` the same way.

Every adapter counts the Hessian products it is asked for (a block of ``k``
counts ``k``) by wrapping the tool's own product function, and offers:

* ``topk(k, **setting) -> (eigenvalues descending, info)``
* ``trace(num_matvecs, seed, **setting) -> (estimate, info)``
* ``density(num_runs, steps, seed) -> (summary, info)``
* ``matvec()`` and ``block8()``: one product and eight products (the tool's own
  way: a native block where it has one, else eight single products).

Tools and their products:

* **ours** (hessian-spectra): ``HessianOperator(model, batches, loss_fn)``;
  ``op.num_matvecs`` counts.
* **curvlinops** 3.0.1: ``HessianLinearOperator(model, criterion, params, batches,
  check_deterministic=False)`` (its determinism probe, a few products, is
  skipped and not timed); ``eigsh`` goes through ``to_scipy()`` (float64 NumPy
  in and out, one vector per call); trace and density use its own
  ``hutchpp_trace`` and ``lanczos_approximate_spectrum`` on the torch operator.
  Counted by wrapping ``_matmat`` (columns of the block).
* **eigenthings** (hessian-eigenthings 1.0.0a5): its ``HessianOperator`` and
  ``lanczos`` / ``trace`` / ``spectral_density``; counted by wrapping ``matvec``.
  It averages batches with equal weights; the workloads' batches are all the
  same size, so that is the same matrix here.
* **pyhessian** 0.1: ``hessian(model, criterion, dataloader=batches, cuda=False)``;
  its power iteration, Hutchinson and SLQ draw from torch's global RNG, so each
  call runs under ``torch.random.fork_rng`` with ``torch.manual_seed(seed)``
  and ``torch.set_default_dtype(model dtype)`` (its vectors are made with
  ``torch.randn(p.size())``, the default dtype). Counted by wrapping
  ``dataloader_hv_product`` (one full-data product per call).

Construction (building the operator) is not timed for any tool.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workloads import Workload

__all__ = ["ADAPTERS", "Adapter", "Curvlinops", "Eigenthings", "Ours", "PyHessian", "gradient_fn"]


def gradient_fn(w: Workload) -> Callable[[], Any]:
    """One full-data gradient (the unit for product costs): a forward and backward per batch."""
    params = [p for p in w.model.parameters() if p.requires_grad]

    def grad() -> Any:
        acc = [torch.zeros_like(p) for p in params]
        for batch in w.batches:
            g = torch.autograd.grad(w.loss_fn(w.model, batch), params)
            wt = batch[0].shape[0] / w.num_samples
            for a, gi in zip(acc, g, strict=True):
                a.add_(gi, alpha=wt)
        return acc

    return grad


@contextlib.contextmanager
def _seeded(seed: int, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Global-RNG tools: a fixed seed, the global state restored afterwards."""
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


def _first_moment_from_grid(grid: Tensor, density: Tensor) -> float:
    g, d = grid.double(), density.double()
    mass = torch.trapezoid(d, g)
    return float(torch.trapezoid(d * g, g) / mass)


class Adapter:
    """Common parts: the workload, the product counter."""

    name = "?"
    #: what one ``block8()`` is: "native" (one block call) or "loop" (8 single products)
    block_kind = "loop"

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.n = w.num_params
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def _rand(self, k: int, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        p = next(self.w.model.parameters())
        return torch.randn(k, self.n, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)


# -- hessian-spectra ----------------------------------------------------------------------
class Ours(Adapter):
    name = "ours"

    @property
    def block_kind(self) -> str:  # type: ignore[override]
        """``native``, with the second-backward mechanism the operator measured and chose."""
        mech = getattr(self.op, "block_mechanism", None) if hasattr(self, "op") else None
        return "native" if mech in (None, "auto") else f"native, {mech}"

    @staticmethod
    def has(solver: str) -> bool:
        """Whether this version of the library has ``solver`` ("block_lanczos", "eigenpairs")."""
        import importlib

        module = {"block_lanczos": "block", "eigenpairs": "eigenpairs"}[solver]
        try:
            return hasattr(importlib.import_module(f"hessian_spectra.algorithms.{module}"), solver)
        except ImportError:
            return False

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        from hessian_spectra.operators.hessian import HessianOperator

        self.op = HessianOperator(w.model, w.batches, w.loss_fn, seed=0)
        if hasattr(self.op, "keep_graphs"):  # products in the steady state of a Krylov run
            self._graphs = self.op.keep_graphs()
            self._graphs.__enter__()

    def reset(self) -> None:
        """Zero the counter and drop the graphs the operator keeps between products, so
        every timed call pays for building them, as a user's first call does."""
        self.count = 0
        if hasattr(self, "op") and hasattr(self.op, "clear_graphs"):
            self.op.clear_graphs()

    @property
    def count(self) -> int:  # type: ignore[override]
        return self.op.num_matvecs if hasattr(self, "op") else 0

    @count.setter
    def count(self, value: int) -> None:
        if hasattr(self, "op"):
            self.op.num_matvecs = value

    def topk(
        self, k: int, *, tol: float | None = None, seed: int = 0, solver: str = "lanczos", **kw: Any
    ) -> tuple[list[float], dict]:
        if solver == "block_lanczos":
            from hessian_spectra.algorithms.block import block_lanczos as fn
        elif solver == "eigenpairs":
            from hessian_spectra.algorithms.eigenpairs import eigenpairs as fn
        else:
            from hessian_spectra.algorithms.lanczos import lanczos as fn

        res = fn(self.op, k, which="LA", tol=tol, seed=seed, **kw)
        info = {
            "converged": bool(res.converged),
            "method": res.method,
            "solver": solver,
            "tol": res.tol,
            "max_residual": float(res.residuals.max()),
            "result_info": {k2: v for k2, v in res.info.items() if isinstance(v, (int, float, str, bool, dict))},
        }
        return sorted(res.eigenvalues.tolist(), reverse=True), info

    def trace(self, num_matvecs: int, seed: int, method: str = "hutch++") -> tuple[float, dict]:
        from hessian_spectra.algorithms.trace import hutch_plus_plus, hutchinson

        fn = {"hutch++": hutch_plus_plus, "hutchinson": hutchinson}[method]
        res = fn(self.op, num_matvecs=num_matvecs, seed=seed)
        return float(res.estimate), {"stderr": float(res.stderr), "method": res.method}

    def density(self, num_runs: int, steps: int, seed: int) -> tuple[dict, dict]:
        from hessian_spectra.algorithms.density import spectral_density

        res = spectral_density(self.op, num_runs=num_runs, lanczos_steps=steps, seed=seed)
        nodes, weights = res.nodes.double(), res.weights.double()
        ok = torch.isfinite(nodes)
        nodes0 = torch.where(ok, nodes, torch.zeros_like(nodes))
        m1 = float((weights * nodes0).sum(1).mean())
        m2 = float((weights * nodes0**2).sum(1).mean())
        return (
            {"mean": m1, "second_moment": m2, "returns": "nodes+weights per run, smoothed density on a grid"},
            {"grid_points": int(res.grid.numel())},
        )

    def matvec(self) -> Any:
        return self.op.matvec(self._rand(1)[0])

    def block8(self) -> Any:
        return self.op.matmat(self._rand(8))

    def matvec_cold(self) -> Any:
        """One product that rebuilds the graphs first (forward and first backward included)."""
        self.op.clear_graphs()
        return self.op.matvec(self._rand(1)[0])


# -- curvlinops + scipy eigsh ------------------------------------------------------------------
class Curvlinops(Adapter):
    name = "curvlinops"
    block_kind = "native"

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        from curvlinops import HessianLinearOperator

        params = [p for p in w.model.parameters() if p.requires_grad]
        self.A = HessianLinearOperator(
            w.model, w.criterion, params, w.batches, check_deterministic=False, num_data=w.num_samples
        )
        inner = self.A._matmat

        def counted(M: list[Tensor]) -> list[Tensor]:
            self.count += int(M[0].shape[-1])
            return inner(M)

        self.A._matmat = counted  # type: ignore[method-assign]
        self.S = self.A.to_scipy()

    def topk(self, k: int, *, tol: float = 0.0, seed: int = 0, **kw: Any) -> tuple[list[float], dict]:
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(self.n)
        vals, _ = eigsh(self.S, k=k, which="LA", tol=tol, v0=v0, **kw)
        return sorted(vals.tolist(), reverse=True), {"tol": tol}

    def trace(self, num_matvecs: int, seed: int, method: str = "hutch++") -> tuple[float, dict]:
        from curvlinops import hutchpp_trace

        with _seeded(seed):
            est = hutchpp_trace(self.A, num_matvecs)
        return float(est), {"method": "hutchpp_trace"}

    def density(self, num_runs: int, steps: int, seed: int) -> tuple[dict, dict]:
        from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

        with _seeded(seed):
            grid, dens = lanczos_approximate_spectrum(self.A, ncv=steps, num_repeats=num_runs)
        return (
            {"mean": _first_moment_from_grid(grid, dens), "second_moment": None,
             "returns": "smoothed density on a grid (no nodes/weights); spectrum bounds from eigsh(tol=1e-2)"},
            {"grid_points": int(grid.numel())},
        )

    def matvec(self) -> Any:
        return self.A @ self._rand(1)[0]

    def block8(self) -> Any:
        return self.A @ self._rand(8).T.contiguous()

    def matvec_scipy(self) -> Any:
        """The path ``eigsh`` takes: NumPy float64 in and out."""
        return self.S.matvec(self._rand(1)[0].double().numpy())


# -- hessian-eigenthings 1.0.0a5 -----------------------------------------------------------------
class Eigenthings(Adapter):
    name = "eigenthings"

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        import hessian_eigenthings as et

        self.et = et
        self.op = et.HessianOperator(w.model, w.batches, w.loss_fn)
        inner = self.op.matvec

        def counted(v: Tensor) -> Tensor:
            self.count += 1
            return inner(v)

        self.op.matvec = counted  # type: ignore[method-assign]

    def topk(self, k: int, *, seed: int = 0, **kw: Any) -> tuple[list[float], dict]:
        res = self.et.lanczos(self.op, k=k, seed=seed, **kw)
        conv = res.converged
        return sorted(res.eigenvalues.tolist(), reverse=True), {
            "converged_flags": bool(conv.all()) if isinstance(conv, Tensor) else bool(conv),
            "iterations": int(res.iterations),
        }

    def trace(self, num_matvecs: int, seed: int, method: str = "hutch++") -> tuple[float, dict]:
        res = self.et.trace(self.op, num_matvecs=num_matvecs, method=method, seed=seed)
        return float(res.estimate), {"stderr": float(res.stderr), "method": method}

    def density(self, num_runs: int, steps: int, seed: int) -> tuple[dict, dict]:
        res = self.et.spectral_density(self.op, num_runs=num_runs, lanczos_steps=steps, seed=seed)
        nodes = torch.nan_to_num(res.raw_eigenvalues.double())
        weights = res.raw_weights.double()
        m1 = float((weights * nodes).sum(1).mean())
        m2 = float((weights * nodes**2).sum(1).mean())
        return (
            {"mean": m1, "second_moment": m2, "returns": "nodes+weights per run, smoothed density on a 10000-point grid"},
            {"grid_points": int(res.grid.numel())},
        )

    def matvec(self) -> Any:
        return self.op.matvec(self._rand(1)[0])

    def block8(self) -> Any:
        return [self.op.matvec(v) for v in self._rand(8)]


# -- PyHessian 0.1 ----------------------------------------------------------------------------
class PyHessian(Adapter):
    name = "pyhessian"

    def __init__(self, w: Workload) -> None:
        super().__init__(w)
        from pyhessian import hessian

        self.dtype = next(w.model.parameters()).dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cuda = next(w.model.parameters()).is_cuda
            self.h = hessian(w.model, w.criterion, dataloader=w.batches, cuda=cuda)
        inner = self.h.dataloader_hv_product

        def counted(v: list[Tensor]) -> Any:
            self.count += 1
            return inner(v)

        self.h.dataloader_hv_product = counted  # type: ignore[method-assign]

    def _v(self, seed: int = 0) -> list[Tensor]:
        flat = self._rand(1, seed)[0]
        out, i = [], 0
        for p in self.h.params:
            out.append(flat[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def topk(self, k: int, *, seed: int = 0, **kw: Any) -> tuple[list[float], dict]:
        with _seeded(seed, self.dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vals, _ = self.h.eigenvalues(top_n=k, **kw)
        return sorted((float(v) for v in vals), reverse=True), {"found_order": [float(v) for v in vals]}

    def trace(self, num_matvecs: int | None, seed: int, method: str = "hutchinson") -> tuple[float, dict]:
        kw = {} if num_matvecs is None else {"maxIter": num_matvecs, "tol": 0.0}
        with _seeded(seed, self.dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = self.h.trace(**kw)
        return float(np.mean(samples)), {
            "method": "hutchinson (default stopping rule)" if num_matvecs is None else "hutchinson"
        }

    def density(self, num_runs: int, steps: int, seed: int) -> tuple[dict, dict]:
        with _seeded(seed, self.dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nodes, weights = self.h.density(iter=steps, n_v=num_runs)
        nodes_t, w_t = torch.tensor(nodes, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
        return (
            {"mean": float((nodes_t * w_t).sum(1).mean()), "second_moment": float((nodes_t**2 * w_t).sum(1).mean()),
             "returns": "nodes+weights per run (no smoothing)"},
            {},
        )

    def matvec(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.h.dataloader_hv_product(self._v())

    def block8(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [self.h.dataloader_hv_product(self._v(s)) for s in range(8)]


ADAPTERS: dict[str, type[Adapter]] = {
    "ours": Ours,
    "curvlinops": Curvlinops,
    "eigenthings": Eigenthings,
    "pyhessian": PyHessian,
}


def max_rel_error(values: list[float], ref: list[float]) -> float:
    """``max_i |λ_i − λ*_i| / |λ*_i|`` over the ``k`` wanted eigenvalues (both descending)."""
    k = len(values)
    if k == 0 or any(not math.isfinite(v) for v in values):
        return math.inf
    return max(abs(v - r) / abs(r) for v, r in zip(values, ref[:k], strict=False))
