"""Plain (non-restarted) Lanczos for a block of independent start vectors at once.

All ``R`` runs advance together: step ``i`` multiplies the ``(R, n)`` block of
current vectors with one ``matmat`` (one data pass for all runs), then each run
does its own three-term recurrence and, optionally, full reorthogonalization
against its own earlier vectors (one classical Gram-Schmidt pass after the
three-term step, which removed the large components already). Used by
:func:`~hessian_spectra.algorithms.lanczos.lanczos_tridiagonal` (``R = 1``) and
:func:`~hessian_spectra.algorithms.density.spectral_density`.

A run whose new residual norm ``beta`` falls to rounding level has found an
invariant subspace; it stops there (its length is recorded) and later steps
send only the live runs to the operator. Breakdown is detected on the device
and looked at on the host every ``check_every`` steps, not at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hessian_spectra.algorithms._common import BlockApply
from hessian_spectra.algorithms._space import allreduce_sum, dimension, sharded

__all__ = ["LanczosRuns", "lanczos_runs"]


@dataclass
class LanczosRuns:
    """Coefficients of ``R`` Lanczos runs (host float64) and, if kept, their bases.

    ``alphas[r, :lengths[r]]`` is the diagonal and ``betas[r, :lengths[r] - 1]`` the
    off-diagonal of run ``r``'s tridiagonal matrix; ``betas[r, lengths[r] - 1]`` is
    the norm of the residual left after its last step. ``basis`` is
    ``(steps, R, n)`` in work precision (rows past a run's length are zero).
    """

    alphas: Tensor
    betas: Tensor
    lengths: Tensor
    basis: Tensor | None

    def tridiagonal(self, r: int) -> Tensor:
        """The ``(m, m)`` float64 tridiagonal matrix of run ``r``."""
        m = int(self.lengths[r])
        a, b = self.alphas[r, :m], self.betas[r, : m - 1]
        return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def _row_norms(X: Tensor) -> Tensor:
    """Norms of the rows of ``X`` (over every rank's slice of sharded vectors)."""
    if not sharded():
        return torch.linalg.vector_norm(X, dim=1)
    return allreduce_sum(X.double().pow(2).sum(1)).sqrt().to(X.dtype)


def lanczos_runs(
    apply: BlockApply,
    V0: Tensor,
    steps: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    check_every: int = 8,
) -> LanczosRuns:
    """Run ``steps`` Lanczos steps from each row of ``V0`` (``(R, n)``, work precision)."""
    R, n = V0.shape
    steps = max(1, min(steps, dimension(n)))
    wd, dev = V0.dtype, V0.device
    eps = torch.finfo(wd).eps
    norms = _row_norms(V0)[:, None]
    V = V0 / norms.clamp_min(torch.finfo(wd).tiny)
    store = reorthogonalize or keep_basis
    basis = torch.zeros(steps, R, n, dtype=wd, device=dev) if store else None
    alphas = torch.zeros(steps, R, dtype=torch.float64, device=dev)
    betas = torch.zeros(steps, R, dtype=torch.float64, device=dev)
    lengths = torch.full((R,), steps, dtype=torch.long, device=dev)
    dead = torch.zeros(R, dtype=torch.bool, device=dev)
    norm_a = torch.zeros(R, dtype=wd, device=dev)
    v_prev = torch.zeros_like(V)
    beta_prev = torch.zeros(R, dtype=wd, device=dev)
    alive: Tensor | None = None  # indices of live runs once some have stopped
    done = steps
    for i in range(steps):
        if basis is not None:
            basis[i] = V
        if alive is None:
            W = apply(V)
        else:
            W = torch.zeros_like(V)
            W[alive] = apply(V[alive])
        norm_a = torch.maximum(norm_a, _row_norms(W))
        alpha = allreduce_sum((V * W).sum(dim=1))
        W = W - alpha[:, None] * V - beta_prev[:, None] * v_prev
        if reorthogonalize and basis is not None:
            # the three-term step was the first Gram-Schmidt pass against the two
            # latest vectors; one classical pass against all makes it "twice"
            B = basis[: i + 1]
            C = allreduce_sum(torch.einsum("irn,rn->ir", B, W))
            W = W - torch.einsum("ir,irn->rn", C, B)
        beta = _row_norms(W)
        newly = (~dead) & (beta <= 10 * eps * norm_a)
        lengths = torch.where(newly, torch.full_like(lengths, i + 1), lengths)
        dead = dead | newly
        alphas[i], betas[i] = alpha.double(), beta.double()
        v_prev, beta_prev = V, beta
        V = torch.where(
            dead[:, None], torch.zeros_like(W), W / beta.clamp_min(torch.finfo(wd).tiny)[:, None]
        )
        if (i + 1) % check_every == 0 and i + 1 < steps:
            dead_host = dead.cpu()
            if bool(dead_host.all()):
                done = i + 1
                break
            if bool(dead_host.any()):
                alive = torch.nonzero(~dead_host).squeeze(1).to(dev)
    lengths = torch.clamp(lengths, max=done)
    return LanczosRuns(
        alphas=alphas[:done].T.contiguous().cpu(),
        betas=betas[:done].T.contiguous().cpu(),
        lengths=lengths.cpu(),
        basis=basis[:done] if basis is not None else None,
    )
