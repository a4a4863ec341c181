"""Stochastic Lanczos quadrature: quadrature identities, moments, smoothing with outliers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hessian_spectra.algorithms import spectral_density
from hessian_spectra.operators.base import LambdaOperator
from reference import sym_matrix_with_spectrum

Z = 4.5


class _Counting(LambdaOperator):
    def __init__(self, A):
        self.calls = 0

        def mm(V):
            self.calls += 1
            return V @ A

        super().__init__(matmat=mm, size=A.shape[0], dtype=A.dtype)


def _matrix(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sym_matrix_with_spectrum(
        torch.randn(n, generator=g, dtype=torch.float64) + 1.0, seed=seed
    )


def test_quadrature_structure_and_one_block_per_step():
    A = _matrix()
    op = _Counting(A)
    res = spectral_density(op, num_runs=8, lanczos_steps=30, seed=0)
    assert res.nodes.shape == (8, 30) and res.weights.shape == (8, 30)
    assert torch.allclose(res.weights.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-12)
    assert bool((res.weights >= 0).all())
    ev = torch.linalg.eigvalsh(A)  # Ritz values interlace: inside [lambda_min, lambda_max]
    assert (
        float(res.nodes.min()) >= float(ev[0]) - 1e-10
        and float(res.nodes.max()) <= float(ev[-1]) + 1e-10
    )
    assert res.num_matvecs == 8 * 30 == op.num_matvecs
    assert op.calls == 30  # all runs advance together: one matmat per Lanczos step
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1.0) < 1e-6
    assert bool((torch.diff(res.grid) > 0).all())
    json.dumps(res.to_dict())


def test_slq_moments_match_traces_of_powers():
    """E[sum_j w_j theta_j^p] = tr(A^p) / n for normalized Rademacher probes."""
    A, runs = _matrix(seed=1), 200
    n = A.shape[0]
    res = spectral_density(A, num_runs=runs, lanczos_steps=10, seed=0)
    for p in (1, 2, 3):
        per_run = (res.weights * res.nodes**p).sum(1)
        exact = float(torch.trace(torch.linalg.matrix_power(A, p))) / n
        se = float(per_run.std()) / math.sqrt(runs)
        assert abs(float(per_run.mean()) - exact) <= Z * se


def test_full_length_runs_are_exact_quadratures():
    A = _matrix(n=40, seed=2)
    res = spectral_density(A, num_runs=3, lanczos_steps=100, seed=1)  # capped at n = 40
    assert res.nodes.shape == (3, 40) and res.num_matvecs == 120
    ev = torch.linalg.eigvalsh(A)
    for r in range(3):
        assert torch.allclose(res.nodes[r].sort().values, ev, atol=1e-9)


def test_invariant_subspace_ends_runs_early():
    D = torch.diag(torch.tensor([1.0, 2.0, 4.0] * 20, dtype=torch.float64))
    res = spectral_density(D, num_runs=4, lanczos_steps=20, seed=0)
    assert res.info["steps_per_run"] == [3, 3, 3, 3]
    values = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    live = res.nodes[res.weights > 0]
    assert float((live[:, None] - values[None]).abs().min(1).values.max()) < 1e-9
    for value in (1.0, 2.0, 4.0):  # each value carries weight 1/3 on average
        w = res.weights[(res.nodes - value).abs() < 1e-6].sum() / 4
        assert abs(float(w) - 1 / 3) < 0.15
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1.0) < 1e-6


def test_bulk_stays_visible_next_to_huge_outliers():
    n = 400
    g = torch.Generator().manual_seed(3)
    bulk = torch.rand(n - 5, generator=g, dtype=torch.float64)  # uniform density 1 on [0, 1]
    eigs = torch.cat([torch.tensor([1e4, 5e3, 2e3, 1e3, 500.0], dtype=torch.float64), bulk])
    A = sym_matrix_with_spectrum(eigs, seed=4)
    res = spectral_density(A, num_runs=16, lanczos_steps=60, seed=0)
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1.0) < 1e-6
    assert res.sigma < 0.05  # from the bulk's spread, not the range of 1e4
    inside = (res.grid > -0.2) & (res.grid < 1.2)
    mass = float(torch.trapezoid(res.density[inside], res.grid[inside]))
    assert mass > 0.95
    mid = (res.grid > 0.2) & (res.grid < 0.8)
    assert 0.5 < float(res.density[mid].min()) <= float(res.density[mid].max()) < 2.0  # true: 1
    top = (res.grid > 9e3) & (res.grid < 1.1e4)  # the outliers keep their own small peaks
    assert float(res.density[top].max()) > 0


def test_low_precision_operator_and_given_sigma():
    A = _matrix(seed=5)
    Ab = A.to(torch.bfloat16)
    op = LambdaOperator(matmat=lambda V: V @ Ab, size=200, dtype=torch.bfloat16)
    res = spectral_density(op, num_runs=4, lanczos_steps=20, sigma=0.1, seed=0)
    assert res.sigma == 0.1 and res.info["sigma_rule"] == "given"
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1.0) < 1e-6
    mean = float((res.weights * res.nodes).sum(1).mean())
    assert abs(mean - float(A.trace()) / 200) < 0.5


def test_seed_and_global_rng():
    A = _matrix(n=50)
    state = torch.get_rng_state()
    a = spectral_density(A, num_runs=2, lanczos_steps=5, seed=7)
    b = spectral_density(A, num_runs=2, lanczos_steps=5, seed=7)
    spectral_density(A, num_runs=2, lanczos_steps=5)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.density, b.density)


def test_bad_inputs():
    A = _matrix(n=10)
    with pytest.raises(ValueError, match="num_runs must be >= 1"):
        spectral_density(A, num_runs=0)
    with pytest.raises(ValueError, match="lanczos_steps must be >= 1"):
        spectral_density(A, lanczos_steps=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        spectral_density(A, sigma=-1.0)
    with pytest.raises(ValueError, match="grid_points must be >= 2"):
        spectral_density(A, grid_points=1)
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        spectral_density(LambdaOperator(matvec=lambda v: v, size=4, symmetric=False))
