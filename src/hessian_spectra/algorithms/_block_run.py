"""The block solver behind :func:`~hessian_spectra.algorithms.block.block_lanczos`.

:func:`run_block_lanczos` runs the shared search-check-verify loop
(:mod:`._driver`) with the block engine (:mod:`._block_krylov`) for the searches,
checking for missed copies of repeated eigenvalues only where a block may not
have seen them (:func:`cluster_edge`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hessian_spectra.algorithms._block_krylov import block_thick_restart
from hessian_spectra.algorithms._common import BlockApply
from hessian_spectra.algorithms._driver import Solver, solve
from hessian_spectra.algorithms._lanczos_pool import Pool, better, clearly_worse
from hessian_spectra.algorithms._random import gaussian
from hessian_spectra.algorithms._space import dimension
from hessian_spectra.algorithms.results import EigenResult

__all__ = [
    "CLUSTER",
    "SEARCH_MARGIN",
    "CountingApply",
    "cluster_edge",
    "run_block_lanczos",
]

SEARCH_MARGIN = 0.5
"""The search stops when the Ritz estimates reach ``SEARCH_MARGIN * tol``: the true
residual adds the products' rounding (about ``2e-7 max|lambda|`` for float32
Hessians of small networks) to the estimate, and a margin is cheaper than another
search after a failed true-residual check."""

CLUSTER = 1e-3
"""Relative width (of ``max |lambda|``) within which eigenvalues count as one cluster
for the multiplicity check."""


class CountingApply(BlockApply):
    """:class:`BlockApply` that also counts its ``matmat`` calls (:attr:`calls`)."""

    calls = 0

    def __call__(self, V: Tensor) -> Tensor:
        self.calls += 1
        return super().__call__(V)


def cluster_edge(theta: Tensor, size: int, width: float, which: str, kth: float) -> float | None:
    """How far a check for missed copies of repeated eigenvalues must look.

    A Krylov space grown from ``size`` random vectors holds ``size`` copies of a
    repeated eigenvalue, so only a value that already has ``size`` or more copies
    (``size`` values of ``theta`` within ``width``: a cluster) can have more that
    were missed, and a missed copy matters only if it beats the k-th value
    ``kth`` by more than ``width``. Returns the least wanted such cluster value,
    moved by ``width`` towards the less wanted side (for ``"LM"`` its magnitude),
    or ``None`` when no cluster matters (no check needed).
    """
    if size > theta.numel():
        return None
    s = theta.sort().values
    member = torch.zeros(s.numel(), dtype=torch.bool)
    spread = s[size - 1 :] - s[: s.numel() - size + 1]
    for i in torch.nonzero(spread <= width).squeeze(1).tolist():
        member[i : i + size] = True
    vals = [float(v) for v in s[member] if better(float(v), kth, which, width)]
    if not vals:
        return None
    if which == "LA":
        return min(vals) - width
    if which == "SA":
        return max(vals) + width
    return min(abs(v) for v in vals) - width


def run_block_lanczos(
    apply: BlockApply,
    n: int,
    k: int,
    which: str,
    tol: float,
    b: int,
    ncv: int,
    max_matvecs: int,
    B0: Tensor | None,
    gen: torch.Generator,
    *,
    X0: Tensor | None = None,
    AX0: Tensor | None = None,
    AB0: Tensor | None = None,
    keep_products: bool = True,
) -> EigenResult:
    """The solver behind :func:`block_lanczos` on counted products ``apply``.

    ``X0``/``AX0``: an orthonormal ``(b, n)`` random start block and its products,
    already spent; ``AB0``: the products of the warm-start rows ``B0``, if already
    spent (both used by :func:`~hessian_spectra.algorithms.eigenpairs.eigenpairs`).
    """
    wd, dev = apply.wd, apply.op.device
    probe = {"X": X0, "AX": AX0}  # the probe block starts the first fresh search

    def search(starts: Tensor | None, pool: Pool, need: int, scale: float, stop_at: int):
        pre = None
        if starts is None and probe["X"] is not None and len(pool) == 0:
            start, pre = probe["X"], probe["AX"]
        else:
            start = starts if starts is not None else gaussian(b, n, gen, dtype=wd, device=dev)
        probe["X"] = probe["AX"] = None
        width = max(b, start.shape[0])  # a warm start refines all its vectors at once
        return block_thick_restart(
            apply,
            start,
            locked=pool.X if len(pool) else None,
            nwant=need,
            which=which,
            tol=tol * SEARCH_MARGIN,
            m_max=max(ncv - len(pool), need + 2 * width),
            block=width,
            stop_at=stop_at,
            generator=gen,
            scale=scale,
            AX0=pre,
            keep_products=keep_products,
        )

    def edge(pool: Pool, kth: float, scale: float) -> float | None:
        return cluster_edge(pool.theta, b, CLUSTER * scale, which, kth)

    def check(pool: Pool, kth: float, scale: float, stop_at: int):
        nw = 2 if which == "LM" and dimension(n) - len(pool) >= 2 else 1
        e = edge(pool, kth, scale)
        assert e is not None
        return block_thick_restart(
            apply,
            gaussian(b, n, gen, dtype=wd, device=dev),
            locked=pool.X,
            nwant=nw,
            which="BE" if which == "LM" else which,
            tol=tol,
            m_max=max(ncv - k, nw + 3 * b),
            block=b,
            stop_at=stop_at,
            generator=gen,
            scale=scale,
            accept=clearly_worse(e, which, tol),
            keep_products=keep_products,
        )

    solver = Solver(
        "block_lanczos",
        search,
        check,
        needs_check=lambda pool, kth, scale: edge(pool, kth, scale) is not None,
        reserve=b,
        keep_products=keep_products,
        info={"block_size": b, "ncv": ncv},
    )
    res = solve(apply, solver, n, k, which, tol, max_matvecs, B0, AB0)
    res.info["blocks"] = getattr(apply, "calls", None)
    return res
