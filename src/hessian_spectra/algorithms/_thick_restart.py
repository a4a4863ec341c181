"""Thick-restart Lanczos with full reorthogonalization (the engine behind :func:`lanczos`).

One run computes ``nwant`` extreme eigenpairs of the operator deflated against a
block of locked vectors ``L`` (rows orthonormal): every new basis vector is
orthogonalized (classical Gram-Schmidt, twice) against ``L`` and the basis, so
the run works with ``(I - L^T L) A (I - L^T L)`` on the complement of ``L``.

State (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric
eigenvalue problems"; Stewart's Krylov-Schur form): an orthonormal basis
``V = [v_0 .. v_{j-1}]`` of expanded vectors and one frontier vector ``v_j`` with

.. math::

    A V^T = V^T H_j + v_j b^T, \\qquad H_j = V A V^T \\ (j \\times j),

``H_j`` tridiagonal plus one arrow after a restart. Ritz pairs ``(theta_i, V^T y_i)``
of ``H_j`` have residual norm ``|b^T y_i|``. When the basis is full, the best
``l`` Ritz vectors are kept (``V <- Y_l^T V``, ``H <- diag(theta_l)``,
``b <- Y_l^T b``) and the expansion goes on from the frontier vector.

The small matrix ``H`` lives on the host in float64 whatever the operator dtype;
each step moves the ``j + 3`` new coefficients there in one transfer (one host
synchronisation per product, needed to detect breakdown). An invariant subspace
(``beta`` at rounding level) is continued with a random vector orthogonal to
everything, so the answer is exact once the basis spans the whole complement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import BlockApply, gram, norm64
from hessian_spectra.algorithms._random import gaussian
from hessian_spectra.algorithms._space import dimension

__all__ = ["RunResult", "orthonormalize_against", "thick_restart", "which_order"]

_CHUNK = 1 << 20  # columns per chunk when rotating the basis in place


def which_order(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from the most to the least wanted.

    ``"LA"`` largest algebraic first, ``"SA"`` smallest first, ``"LM"`` largest
    magnitude first, ``"BE"`` both ends alternately (largest, smallest, ...).
    """
    if which == "LA":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "SA":
        return torch.argsort(theta, stable=True)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)
    if which == "BE":
        asc = torch.argsort(theta, stable=True)
        out = torch.empty_like(asc)
        m = asc.numel()
        out[0::2] = asc.flip(0)[: (m + 1) // 2]
        out[1::2] = asc[: m // 2]
        return out
    raise ValueError(f"unknown which={which!r}")


def orthonormalize_against(w: Tensor, blocks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Two passes of classical Gram-Schmidt of the vector ``w`` against row blocks.

    Returns the projected vector and its norm (float64, not normalized).
    """
    for _ in range(2):
        for B in blocks:
            if B.shape[0]:
                w = w - _coeffs(B, w).to(w.dtype) @ B
    return w, norm64(w)


def _coeffs(B: Tensor, w: Tensor) -> Tensor:
    """``B @ w`` accumulated in float64."""
    return gram(B, w[None])[:, 0]


@dataclass
class RunResult:
    """Output of one :func:`thick_restart` run (all ``(w, n)`` blocks in work precision)."""

    theta: Tensor  # (nwant,) float64 host, most wanted first
    vectors: Tensor  # (nwant, n)
    estimates: Tensor  # (nwant,) float64 host, |b^T y|
    converged: bool
    exhausted: bool  # the basis spanned the whole complement: exact
    scale: float  # largest |Ritz value| seen
    restarts: int
    products: Tensor | None = None  # (nwant, n) A vectors from stored products, if kept


def _rotate_rows(V: Tensor, Y: Tensor, j: int, out_rows: int) -> None:
    """``V[:out_rows] <- Y^T V[:j]`` in column chunks (no second basis in memory)."""
    n = V.shape[1]
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        V[:out_rows, s:e] = Y.T @ V[:j, s:e]


def thick_restart(
    apply: BlockApply,
    v0: Tensor,
    *,
    locked: Tensor | None,
    nwant: int,
    which: str,
    tol: float,
    m_max: int,
    stop_at: int,
    generator: torch.Generator,
    scale: float = 0.0,
    accept: Callable[[Tensor, Tensor, float], bool] | None = None,
    keep_products: bool = False,
) -> RunResult:
    """Run thick-restart Lanczos until the ``nwant`` wanted Ritz pairs converge.

    Args:
        apply: counted products in work precision.
        v0: ``(n,)`` start vector (projected against ``locked``; random if it lies there).
        locked: ``(q, n)`` orthonormal rows to deflate, or ``None``.
        nwant: number of wanted pairs (``<= m_max``).
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"`` (see :func:`which_order`).
        tol: relative tolerance; a pair converges when ``|b^T y| <= tol * scale``.
        m_max: largest basis size (memory ``(m_max + 1) n``).
        stop_at: stop when ``apply.count`` reaches this many products.
        generator: for random continuation vectors.
        scale: a known lower bound for ``max |lambda|``.
        accept: optional early stop ``accept(theta_wanted, estimates, scale)``,
            asked whenever the wanted pairs have not all converged yet.
        keep_products: also store the raw product ``A v`` of every basis vector
            (rotated with the basis at restarts), so the result carries ``A x`` of
            its Ritz vectors (:attr:`RunResult.products`) without another product.
    """
    n, wd, dev = v0.shape[-1], v0.dtype, v0.device
    dim = dimension(n)  # the global length (n is this rank's slice of sharded vectors)
    L = locked if locked is not None else v0.new_zeros(0, n)
    q = L.shape[0]
    m_max = max(1, min(m_max, dim - q))
    nwant = min(nwant, m_max)
    eps = torch.finfo(wd).eps
    V = torch.empty(m_max + 1, n, dtype=wd, device=dev)
    AV = torch.empty(V.shape[0], n, dtype=wd, device=dev) if keep_products else None
    H = torch.zeros(m_max + 1, m_max + 1, dtype=torch.float64)
    norm_a = scale

    def random_direction(j: int) -> Tensor | None:
        """A random unit vector orthogonal to ``L`` and ``V[:j]`` (``None`` if none is left)."""
        for _ in range(3):
            r = gaussian(1, n, generator, dtype=wd, device=dev)[0]
            r, nr = orthonormalize_against(r, [L, V[:j]])
            if float(nr) > 1e-6 * dim**0.5:
                return r / nr
        return None

    if q >= dim:
        raise ValueError(f"nothing left to search: {q} locked vectors in dimension {dim}")
    v, nv = orthonormalize_against(v0.to(wd), [L])
    if float(nv) <= 1e-6 * float(norm64(v0)) or float(nv) == 0:
        r = random_direction(0)
        if r is None:
            raise RuntimeError("could not draw a start vector orthogonal to the locked ones")
        V[0] = r
    else:
        V[0] = v / nv
    j, restarts, exhausted = 0, 0, False
    while True:
        if j >= 1:
            T = H[:j, :j]
            theta, Y = torch.linalg.eigh((T + T.T) / 2)
            scale = max(scale, float(theta.abs().max()))
            order = which_order(theta, which)
            want = order[:nwant]
            est = (H[j, :j] @ Y).abs() if not exhausted else torch.zeros(j, dtype=torch.float64)
            done = j >= nwant and (
                exhausted
                or bool((est[want] <= tol * scale).all())
                or (accept is not None and accept(theta[want], est[want], scale))
            )
            if done or apply.count >= stop_at:
                Yw = Y[:, want].to(device=dev, dtype=wd)
                return RunResult(
                    theta=theta[want].clone(),
                    vectors=Yw.T @ V[:j],
                    estimates=est[want].clone(),
                    converged=done,
                    exhausted=exhausted,
                    scale=scale,
                    restarts=restarts,
                    products=None if AV is None else Yw.T @ AV[:j],
                )
            if j == m_max:  # thick restart: keep the best l Ritz vectors
                nconv = int((est[want] <= tol * scale).sum())
                keep = min(j - 1, max(nwant + 1, nconv + (j - nconv) // 2))
                keep = max(keep, 1)
                Yk = Y[:, order[:keep]]
                b = H[j, :j] @ Yk
                _rotate_rows(V, Yk.to(device=dev, dtype=wd), j, keep)
                if AV is not None:
                    _rotate_rows(AV, Yk.to(device=dev, dtype=wd), j, keep)
                V[keep] = V[j]
                H.zero_()
                H[:keep, :keep] = torch.diag(theta[order[:keep]])
                H[keep, :keep] = b
                H[:keep, keep] = b
                j = keep
                restarts += 1
        # expand the frontier vector V[j]
        w = apply(V[j : j + 1])[0]
        if AV is not None:
            AV[j] = w
        norm_av = norm64(w)
        Vj = V[: j + 1]
        c = _coeffs(Vj, w)
        w = w - c.to(wd) @ Vj
        if q:
            w = w - _coeffs(L, w).to(wd) @ L
        c2 = _coeffs(Vj, w)
        w = w - c2.to(wd) @ Vj
        if q:
            w = w - _coeffs(L, w).to(wd) @ L
        c = c + c2
        beta_t = norm64(w)
        stats = torch.cat([c, beta_t.view(1), norm_av.view(1)]).cpu()
        H[: j + 1, j] = stats[: j + 1]
        H[j, : j + 1] = stats[: j + 1]
        beta, norm_a = float(stats[-2]), max(norm_a, float(stats[-1]))
        j += 1
        H[j, :] = 0
        H[:, j] = 0
        if j + q >= dim:
            exhausted = True
            continue
        if beta <= 10 * eps * max(norm_a, scale):
            r = random_direction(j)
            if r is None:
                exhausted = True
                continue
            V[j] = r
        else:
            V[j] = w / beta
            H[j, j - 1] = beta
