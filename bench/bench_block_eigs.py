"""Top-1 and top-10 Hessian eigenvalues: lanczos vs block_lanczos vs eigenpairs(auto).

On the ~10k-parameter MLP and the small transformer (``nn.TransformerEncoderLayer``
+ head) of ``bench_hessian_block.py``, float32, ``tol=1e-6``: wall time (median of
``--repeat`` runs with seeds 0, 1, ...), products and ``matmat`` calls of each
solver, and the largest eigenvalue error relative to ``max |lambda|`` against a
float64 reference (``lanczos`` on the float64 model with ``tol=1e-10``). A solver
whose error exceeds ``1e-6`` in any run is a miss (not timed); ``converged`` counts
the runs whose true residuals met ``tol`` (float32 products leave a floor of a few
``1e-7``, so a run may stop just above it and say so). Also
the time of one product and of one block of 8 (``cost ratio`` = block / 8 singles).

``--lobpcg`` adds the measurement behind the choice of block Lanczos over LOBPCG:
on the float64 Hessians, products, ``matmat`` calls and time to ``tol=1e-6`` of
``block_lanczos`` and of a LOBPCG with soft locking (Knyazev 2001; basis
``[X, R, P]`` orthonormalized by SVQB with dropping, as Duersch et al. 2018
recommend; converged columns stop contributing residual and search directions).

Run by hand:

    OMP_NUM_THREADS=1 python bench/bench_block_eigs.py
    python bench/bench_block_eigs.py --repeat 5 --workloads mlp
    OMP_NUM_THREADS=1 python bench/bench_block_eigs.py --lobpcg
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_hessian_block import _mlp, _transformer

from hessian_spectra.algorithms import block_lanczos, eigenpairs, lanczos
from hessian_spectra.algorithms._block_krylov import orthonormal_block
from hessian_spectra.algorithms._common import BlockApply, gram, norm64
from hessian_spectra.operators.hessian import HessianOperator

_WORKLOADS = {"mlp": _mlp, "transformer": _transformer}


def _operator(model: torch.nn.Module, data: list, loss_fn: Callable) -> HessianOperator:
    return HessianOperator(model, data, loss_fn)


def _reference(model: torch.nn.Module, data: list, loss_fn: Callable, k: int) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    d64 = [(x.double(), y) for x, y in data]
    res = lanczos(_operator(m64, d64, loss_fn), k=k, tol=1e-10, seed=123)
    assert res.converged, "the float64 reference did not converge"
    return res.eigenvalues.cpu()


def _product_costs(op: HessianOperator, repeat: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    V = torch.randn(8, op.size, generator=g)
    op.matmat(V)  # warm-up

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: op.matvec(V[0])), best(lambda: op.matmat(V))


def lobpcg(op: HessianOperator, k: int, b: int, tol: float, max_mv: int, seed: int) -> tuple:
    """Top-``k`` by LOBPCG with block ``b >= k``; ``(theta, products, calls)``."""
    gen = torch.Generator().manual_seed(seed)
    apply = BlockApply(op, op.dtype)
    calls = 0

    def mm(V: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return apply(V)

    def rayleigh_ritz(S: torch.Tensor, AS: torch.Tensor) -> tuple:
        g, U = torch.linalg.eigh(gram(S, S))
        keep = g > 1e-14 * g.max()
        T = (U[:, keep] / g[keep].sqrt()).T  # S-orthonormalizing transform
        M = T @ gram(S, AS) @ T.T
        th, Z = torch.linalg.eigh((M + M.T) / 2)
        return th.flip(0), (T.T @ Z).flip(1)

    X = torch.randn(b, op.size, generator=gen, dtype=op.dtype)
    X, _ = orthonormal_block(X, [], b, 0.0, gen)
    AX = mm(X)
    th, Z = rayleigh_ritz(X, AX)
    X, AX = Z.T.to(X.dtype) @ X, Z.T.to(X.dtype) @ AX
    P = AP = None
    scale = 0.0
    while apply.count < max_mv:
        R = AX - th[:, None].to(X.dtype) * X
        scale = max(scale, float(th.abs().max()))
        active = norm64(R, dim=1) > tol * scale
        if not bool(active[:k].any()):
            break
        blocks = [X] + ([P] if P is not None else [])
        Ra = R[active]
        for _ in range(2):
            for B in blocks:
                Ra = Ra - gram(B, Ra).T.to(Ra.dtype) @ B
        Ra, _ = orthonormal_block(Ra, blocks, Ra.shape[0], 1e-12 * scale, gen)
        S = torch.cat([X, Ra] + ([P] if P is not None else []))
        AS = torch.cat([AX, mm(Ra)] + ([AP] if AP is not None else []))
        th2, Z = rayleigh_ritz(S, AS)
        Zb = Z[:, :b].to(X.dtype)
        Zp = Zb.clone()
        Zp[:b] = 0  # the new search directions: the part outside the old X
        X, AX, P, AP, th = Zb.T @ S, Zb.T @ AS, Zp.T @ S, Zp.T @ AS, th2[:b]
    return th[:k].cpu(), apply.count, calls


def compare_lobpcg(name: str, model: torch.nn.Module, data: list, loss_fn: Callable) -> None:
    m64 = copy.deepcopy(model).double()
    op = _operator(m64, [(x.double(), y) for x, y in data], loss_fn)
    for k, sizes in ((1, (1, 2, 4)), (10, (10, 12, 16))):
        ref = _reference(model, data, loss_fn, k)
        scale = float(ref.abs().max())
        runs: list[tuple[str, Callable[[], object]]] = [
            (f"block_lanczos b={b}", partial(block_lanczos, op, k=k, block_size=b, seed=0))
            for b in ((1, 2, 4) if k == 1 else (4, 8, 16))
        ]
        runs += [(f"lobpcg b={b}", partial(lobpcg, op, k, b, 1e-6, 3000, 0)) for b in sizes]
        for label, run in runs:
            op.reset_counter()
            t0 = time.perf_counter()
            out = run()
            t = time.perf_counter() - t0
            if isinstance(out, tuple):
                theta, prods, calls = out
            else:
                theta, prods, calls = out.eigenvalues.cpu(), out.num_matvecs, out.info["blocks"]
            err = float((theta - ref).abs().max()) / scale
            print(
                f"| {name} | {k} | {label} | {prods} | {calls} | {t:.2f} | {err:.1e} |", flush=True
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(_WORKLOADS), choices=list(_WORKLOADS))
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--lobpcg", action="store_true", help="block Lanczos vs LOBPCG instead")
    args = ap.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if args.lobpcg:
        print("| workload | k | solver (float64) | products | matmat calls | time (s) | error |")
        print("|---|---|---|---|---|---|---|")
        for name in args.workloads:
            torch.manual_seed(0)
            compare_lobpcg(name, *_WORKLOADS[name]())
        return
    solvers: dict[str, Callable[..., object]] = {
        "lanczos": lambda op, k, s: lanczos(op, k=k, seed=s),
        "block_lanczos": lambda op, k, s: block_lanczos(op, k=k, seed=s),
        "eigenpairs(auto)": lambda op, k, s: eigenpairs(op, k=k, seed=s),
    }
    header = (
        "| workload | n | k | solver | time (s) | vs lanczos | products | matmat calls "
        "| max rel. error | converged | choice |"
    )
    rows = [header, "|" + "---|" * 11]
    for name in args.workloads:
        torch.manual_seed(0)
        model, data, loss_fn = _WORKLOADS[name]()
        op0 = _operator(model, data, loss_fn)
        t1, t8 = _product_costs(op0, 5)
        print(
            f"{name}: n={op0.size}, one product {t1 * 1e3:.2f} ms, block of 8 {t8 * 1e3:.2f} ms, "
            f"cost ratio {t8 / (8 * t1):.2f}"
        )
        for k in args.ks:
            ref = _reference(model, data, loss_fn, k)
            scale = float(ref.abs().max())
            base = None
            for label, solve in solvers.items():
                times, prods, calls, errs, conv, choice = [], [], [], [], [], []
                for seed in range(args.repeat):
                    op = _operator(model, data, loss_fn)
                    counter = {"calls": 0}
                    inner = op._matmat

                    def counted(V: torch.Tensor, _inner=inner, _c=counter) -> torch.Tensor:
                        _c["calls"] += 1
                        return _inner(V)

                    op._matmat = counted  # type: ignore[method-assign]
                    op.matmat(torch.zeros(1, op.size))  # warm-up (data cache), not counted below
                    op.reset_counter()
                    counter["calls"] = 0
                    t0 = time.perf_counter()
                    res = solve(op, k, seed)
                    times.append(time.perf_counter() - t0)
                    prods.append(res.num_matvecs)  # type: ignore[attr-defined]
                    calls.append(counter["calls"])
                    err = (res.eigenvalues.cpu() - ref).abs().max() / scale  # type: ignore[attr-defined]
                    errs.append(float(err))
                    conv.append(bool(res.converged))  # type: ignore[attr-defined]
                    info = res.info  # type: ignore[attr-defined]
                    if "chosen" in info:
                        b = info.get("block_size")
                        choice.append(info["chosen"] + (f" b={b}" if b else ""))
                    elif "block_size" in info:
                        choice.append(f"b={info['block_size']}")
                miss = max(errs) > 1e-6
                t = statistics.median(times)
                if label == "lanczos":
                    base = t
                rows.append(
                    f"| {name} | {op0.size} | {k} | {label} | "
                    + ("miss" if miss else f"{t:.2f}")
                    + f" | {'' if miss or base is None else f'{t / base:.2f}'} | "
                    f"{statistics.median(prods):.0f} | {statistics.median(calls):.0f} | "
                    f"{max(errs):.1e} | {sum(conv)}/{len(conv)} | "
                    f"{', '.join(sorted(set(choice)))} |"
                )
                print(rows[-1], flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
