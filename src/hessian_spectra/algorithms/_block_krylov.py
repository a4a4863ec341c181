"""Thick-restart block Lanczos with full reorthogonalization (the engine behind
:func:`~hessian_spectra.algorithms.block.block_lanczos`).

The block form of :mod:`._thick_restart`: an orthonormal basis ``V`` of ``j`` rows
and a frontier block ``F`` of ``f <= b`` orthonormal rows, orthogonal to ``V`` and
to the locked rows ``L``, with the block Krylov-Schur relation (Stewart 2001;
Zhou & Saad 2008, "Block Krylov-Schur method for large symmetric eigenvalue
problems")

.. math::

    A V^T = V^T H_j + F^T B, \\qquad H_j = V A V^T \\ (j \\times j), \\quad B = F A V^T,

so a Ritz pair ``(theta_i, V^T y_i)`` of ``H_j`` has residual norm ``||B y_i||``.
One step multiplies the whole frontier (``A F^T``, one ``matmat`` of ``f`` rows),
orthogonalizes the result twice against ``V``, ``F`` and ``L`` (block classical
Gram-Schmidt, coefficients in float64) and orthonormalizes what is left by an
eigendecomposition of its Gram matrix (SVQB, Stathopoulos & Wu 2002; a second pass
when that block is ill-conditioned). Directions at rounding level are replaced by
random vectors orthogonal to everything (coupling zero), so the block never
shrinks: a Krylov space grown from ``b`` independent vectors holds ``b`` copies of
a repeated eigenvalue. When the basis is full, the best ``l`` Ritz vectors are kept
(``V <- Y_l^T V``, ``H <- diag(theta_l)``, ``B <- B Y_l``).

The small matrix lives on the host in float64; each step moves its new
coefficients there in one transfer (one host synchronisation per block product).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import BlockApply, gram, norm64
from hessian_spectra.algorithms._random import gaussian
from hessian_spectra.algorithms._space import dimension
from hessian_spectra.algorithms._thick_restart import RunResult, _rotate_rows, which_order

__all__ = ["block_thick_restart", "orthonormal_block"]

_ILL = 1e-4  # Gram eigenvalue ratio below which a second SVQB pass runs (cond > 100)


def _project(W: Tensor, blocks: list[Tensor]) -> Tensor:
    """``W`` minus its components along the row blocks (one classical Gram-Schmidt pass)."""
    for B in blocks:
        if B.shape[0]:
            W = W - gram(B, W).T.to(W.dtype) @ B
    return W


def _svqb(W: Tensor, thresh: float, G: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal rows ``F`` and ``M`` with ``W ~= M^T F``, dropping directions whose
    singular value is ``<= thresh``; also the kept squared singular values (host).
    ``G``: the Gram matrix ``W W^T`` on the host, if already there."""
    S, U = torch.linalg.eigh(gram(W, W).cpu() if G is None else G)
    S, U = S.flip(0), U.flip(1)
    keep = max(thresh, 0.0) ** 2 < S
    S, U = S[keep], U[:, keep]
    s = S.sqrt()
    Ud = U.to(device=W.device, dtype=W.dtype)
    F = (Ud.T @ W) / s.to(device=W.device, dtype=W.dtype)[:, None]
    return F, s[:, None] * U.T, S


def orthonormal_block(
    W: Tensor,
    against: list[Tensor],
    width: int,
    thresh: float,
    generator: torch.Generator,
    G: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``width`` orthonormal rows ``F`` orthogonal to ``against`` and ``M`` with
    ``P W ~= M^T F`` (``P`` the projector on the complement of ``against``, ``W``
    already projected by the caller). Directions of ``W`` at or below ``thresh``
    are replaced by random ones (zero rows of ``M``). Returns ``(F, M)``, ``M`` of
    shape ``(width, W.shape[0])`` on the host in float64. ``G``: ``W W^T`` on the
    host if known (saves a synchronisation).
    """
    wd, dev, n = W.dtype, W.device, W.shape[1]
    F, M, S = _svqb(W, thresh, G)
    if S.numel() and float(S[-1]) < _ILL * float(S[0]):  # ill-conditioned: once more
        F = _project(F, against)
        F2, M2, _ = _svqb(F, 0.0)
        F, M = F2, M2 @ M
    F, M = F[:width], M[:width]
    for _ in range(3):
        missing = width - F.shape[0]
        if missing <= 0:
            break
        R = gaussian(missing, n, generator, dtype=wd, device=dev)
        for _ in range(2):
            R = _project(R, [*against, F])
        Rq, _, _ = _svqb(R, 1e-6 * dimension(n) ** 0.5)
        F = torch.cat([F, Rq])
        M = torch.cat([M, torch.zeros(Rq.shape[0], M.shape[1], dtype=torch.float64)])
    return F, M


def block_thick_restart(
    apply: BlockApply,
    X0: Tensor,
    *,
    locked: Tensor | None,
    nwant: int,
    which: str,
    tol: float,
    m_max: int,
    block: int,
    stop_at: int,
    generator: torch.Generator,
    scale: float = 0.0,
    AX0: Tensor | None = None,
    accept: Callable[[Tensor, Tensor, float], bool] | None = None,
    keep_products: bool = False,
) -> RunResult:
    """Run thick-restart block Lanczos until the ``nwant`` wanted Ritz pairs converge.

    Args:
        apply: counted products in work precision.
        X0: ``(b0, n)`` start rows (projected against ``locked``; completed with
            random rows up to ``block``).
        locked: ``(q, n)`` orthonormal rows to deflate, or ``None``.
        nwant: number of wanted pairs.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        tol: relative tolerance; a pair converges when ``||B y|| <= tol * scale``.
        m_max: largest basis size (rows of ``V``; memory ``(m_max + block) n``).
        block: block size ``b``.
        stop_at: stop before a product that would take ``apply.count`` past this.
        generator: for the random rows.
        scale: a known lower bound for ``max |lambda|``.
        AX0: products of ``X0`` when already known; only used when ``X0`` has
            ``block`` orthonormal rows and nothing is locked.
        accept: optional early stop ``accept(theta_wanted, estimates, scale)``.
        keep_products: also store the raw products ``A V`` (rotated with the basis
            at restarts), so the result carries ``A x`` of its Ritz vectors.
    """
    n, wd, dev = X0.shape[-1], X0.dtype, X0.device
    dim = dimension(n)  # the global length (n is this rank's slice of sharded vectors)
    L = locked if locked is not None else X0.new_zeros(0, n)
    q = L.shape[0]
    if q >= dim:
        raise ValueError(f"nothing left to search: {q} locked vectors in dimension {dim}")
    b = max(1, min(block, dim - q))
    m_max = max(1, min(m_max, dim - q))
    nwant = min(nwant, m_max)
    eps = torch.finfo(wd).eps
    V = torch.empty(m_max + b, n, dtype=wd, device=dev)
    AV = torch.empty(V.shape[0], n, dtype=wd, device=dev) if keep_products else None
    H = torch.zeros(m_max + b, m_max + b, dtype=torch.float64)
    norm_a = scale
    pending = None
    if AX0 is not None and q == 0 and X0.shape[0] == b:
        F, pending = X0, AX0
    else:
        X = X0.to(wd)[:b]
        for _ in range(2):
            X = _project(X, [L])
        F, _ = orthonormal_block(X, [L], b, 1e-6 * float(norm64(X0).clamp_min(1e-300)), generator)
    f = F.shape[0]
    V[:f] = F
    j, restarts, exhausted = 0, 0, False
    while True:
        if j >= 1:
            T = H[:j, :j]
            theta, Y = torch.linalg.eigh((T + T.T) / 2)
            scale = max(scale, float(theta.abs().max()))
            order = which_order(theta, which)
            want = order[:nwant]
            if exhausted or f == 0:
                est = torch.zeros(j, dtype=torch.float64)
            else:
                est = torch.linalg.vector_norm(H[j : j + f, :j] @ Y, dim=0)
            done = j >= nwant and (
                exhausted
                or bool((est[want] <= tol * scale).all())
                or (accept is not None and accept(theta[want], est[want], scale))
            )
            if done or apply.count + f > stop_at:
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
            if j + f > m_max:  # thick restart: keep the best l Ritz vectors
                keep = max(nwant + b, (2 * j) // 3)  # measured best of five rules
                keep = max(1, min(keep, j - 1, m_max - f))
                Yk = Y[:, order[:keep]]
                Bk = H[j : j + f, :j] @ Yk
                front = V[j : j + f].clone()
                _rotate_rows(V, Yk.to(device=dev, dtype=wd), j, keep)
                if AV is not None:
                    _rotate_rows(AV, Yk.to(device=dev, dtype=wd), j, keep)
                V[keep : keep + f] = front
                H.zero_()
                H[:keep, :keep] = torch.diag(theta[order[:keep]])
                H[keep : keep + f, :keep] = Bk
                H[:keep, keep : keep + f] = Bk.T
                j = keep
                restarts += 1
        elif apply.count + f > stop_at:
            return RunResult(
                theta=torch.zeros(0, dtype=torch.float64),
                vectors=V[:0].clone(),
                estimates=torch.zeros(0, dtype=torch.float64),
                converged=False,
                exhausted=False,
                scale=scale,
                restarts=0,
            )
        # expand the frontier block V[j : j + f]
        W = pending if pending is not None else apply(V[j : j + f])
        pending = None
        if AV is not None:
            AV[j : j + f] = W
        Vp = V[: j + f]
        norms = norm64(W, dim=1)
        C = gram(Vp, W)
        W = W - C.T.to(wd) @ Vp
        W = _project(W, [L])
        C2 = gram(Vp, W)
        W = W - C2.T.to(wd) @ Vp
        W = _project(W, [L])
        G = gram(W, W)
        stats = torch.cat([(C + C2).flatten(), G.flatten(), norms]).cpu()  # one transfer
        C = stats[: (j + f) * f].view(j + f, f)
        G = stats[(j + f) * f : (j + f + f) * f].view(f, f)
        norm_a = max(norm_a, float(stats[(j + f + f) * f :].max()))
        H[: j + f, j : j + f] = C
        H[j : j + f, : j + f] = C.T
        T = H[j : j + f, j : j + f]
        H[j : j + f, j : j + f] = (T + T.T) / 2
        f_old = f
        j += f
        f = min(b, dim - q - j)
        H[j:, :] = 0
        H[:, j:] = 0
        if f <= 0:
            exhausted, f = True, 0
            continue
        thresh = 2 * eps * max(norm_a, scale)  # well below any tol: est stays honest
        F, M = orthonormal_block(W, [L, V[:j]], f, thresh, generator, G)
        if F.shape[0] < f:  # nothing independent left to draw: the complement is spanned
            exhausted, f = True, 0
            continue
        V[j : j + f] = F
        H[j : j + f, j - f_old : j] = M
        H[j - f_old : j, j : j + f] = M.T
