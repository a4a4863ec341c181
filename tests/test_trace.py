"""Hutchinson, Hutch++ and diagonal estimators, tested statistically against exact values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hessian_spectra.algorithms import diagonal, hutch_plus_plus, hutchinson, trace
from hessian_spectra.operators.base import LambdaOperator
from reference import sym_matrix_with_spectrum

Z = 4.5  # a mean within this many standard errors: fails with probability < 1e-5


def _matrix(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sym_matrix_with_spectrum(
        torch.randn(n, generator=g, dtype=torch.float64) + 0.5, seed=seed
    )


def _low_rank_plus_noise(n=200, rank=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat(
        [
            100.0 + 10 * torch.rand(rank, generator=g, dtype=torch.float64),
            0.05 * torch.randn(n - rank, generator=g, dtype=torch.float64),
        ]
    )
    return sym_matrix_with_spectrum(eigs, seed=seed)


class _Counting(LambdaOperator):
    def __init__(self, A):
        self.calls = 0

        def mm(V):
            self.calls += 1
            return V @ A.to(V.dtype)

        super().__init__(matmat=mm, size=A.shape[0], dtype=A.dtype)


def test_exact_trace():
    A = _matrix()
    res = trace(A, method="exact")
    assert math.isclose(res.estimate, float(A.trace()), rel_tol=1e-12)
    assert res.stderr == 0.0 and res.num_matvecs == 60 and res.method == "exact"


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_with_honest_stderr(distribution):
    A, runs = _matrix(), 300
    exact = float(A.trace())
    est = torch.tensor(
        [hutchinson(A, 10, distribution=distribution, seed=s).estimate for s in range(runs)]
    )
    ses = torch.tensor(
        [hutchinson(A, 10, distribution=distribution, seed=s).stderr for s in range(runs)]
    )
    assert abs(float(est.mean()) - exact) <= Z * float(est.std()) / math.sqrt(runs)
    # the reported standard error matches the spread of the estimates
    ratio = float(ses.pow(2).mean().sqrt()) / float(est.std())
    assert 0.8 < ratio < 1.25
    if distribution == "rademacher":  # variance per probe: 2 * sum_{i != j} A_ij^2
        theory = math.sqrt(2 * float((A**2).sum() - (A.diagonal() ** 2).sum()) / 10)
        assert 0.8 < float(est.std()) / theory < 1.25


def test_hutch_plus_plus_unbiased_and_beats_hutchinson():
    A = _low_rank_plus_noise()
    exact, runs, m = float(A.trace()), 100, 45  # sketch of 15 > rank 10
    hpp = [hutch_plus_plus(A, m, seed=s) for s in range(runs)]
    hut = [hutchinson(A, m, seed=s) for s in range(runs)]
    e_hpp = torch.tensor([r.estimate for r in hpp])
    e_hut = torch.tensor([r.estimate for r in hut])
    assert abs(float(e_hpp.mean()) - exact) <= Z * float(e_hpp.std()) / math.sqrt(runs)
    assert abs(float(e_hut.mean()) - exact) <= Z * float(e_hut.std()) / math.sqrt(runs)
    mse_hpp = float(((e_hpp - exact) ** 2).mean())
    mse_hut = float(((e_hut - exact) ** 2).mean())
    assert mse_hpp < 0.01 * mse_hut
    ses = torch.tensor([r.stderr for r in hpp])
    assert 0.7 < float(ses.pow(2).mean().sqrt()) / float(e_hpp.std()) < 1.4
    assert all(r.num_matvecs == m for r in hpp)
    assert hpp[0].info["sketch_size"] == 15 and hpp[0].info["hutchinson_probes"] == 15


def test_hutch_plus_plus_split_and_products():
    A = _low_rank_plus_noise(n=50)
    op = _Counting(A)
    res = hutch_plus_plus(op, 11, seed=0, block_size=3)
    assert res.info["sketch_size"] == 3 and res.info["hutchinson_probes"] == 5
    assert op.num_matvecs == 11 == res.num_matvecs
    assert op.calls == 1 + 1 + 2  # ceil(3/3) + ceil(3/3) + ceil(5/3) blocks


def test_products_in_blocks():
    A = _matrix()
    op = _Counting(A)
    res = hutchinson(op, 20, seed=0, block_size=7)
    assert op.calls == 3 and op.num_matvecs == 20 == res.num_matvecs
    op2 = _Counting(A)
    hutchinson(op2, 20, seed=0)  # default: one block
    assert op2.calls == 1


def test_diagonal_estimate_within_bounds():
    A = _matrix(n=40, seed=3)
    for distribution in ("rademacher", "gaussian"):
        res = diagonal(A, 4000, distribution=distribution, seed=0)
        assert res.estimate.shape == (40,) and res.num_matvecs == 4000
        assert bool(((res.estimate - A.diagonal()).abs() <= Z * res.stderr).all())
    runs = 200
    out = [diagonal(A, 20, seed=s) for s in range(runs)]
    est = torch.stack([r.estimate for r in out])
    se = torch.stack([r.stderr for r in out])
    assert bool(((est.mean(0) - A.diagonal()).abs() <= Z * est.std(0) / math.sqrt(runs)).all())
    ratio = se.pow(2).mean(0).sqrt() / est.std(0)
    assert 0.85 < float(ratio.mean()) < 1.15


def test_diagonal_of_diagonal_matrix_is_exact_with_rademacher():
    D = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    res = diagonal(D, 5, seed=0)
    assert torch.allclose(res.estimate, D.diagonal()) and float(res.stderr.max()) < 1e-12


def test_bf16_operator():
    A = _matrix(seed=4)
    Ab = A.to(torch.bfloat16)
    op = LambdaOperator(matmat=lambda V: V @ Ab, size=60, dtype=torch.bfloat16)
    res = hutch_plus_plus(op, 300, seed=0)
    assert math.isfinite(res.estimate)
    assert abs(res.estimate - float(A.trace())) <= Z * res.stderr + 0.02 * float(A.abs().sum()) / 60


def test_seed_and_global_rng():
    A = _matrix()
    state = torch.get_rng_state()
    assert hutchinson(A, 5, seed=1).estimate == hutchinson(A, 5, seed=1).estimate
    assert (
        hutch_plus_plus(A, 9, seed=torch.Generator().manual_seed(2)).estimate
        == hutch_plus_plus(A, 9, seed=2).estimate
    )
    trace(A)
    diagonal(A, 3)
    assert torch.equal(state, torch.get_rng_state())
    json.dumps(trace(A, seed=0).to_dict())
    json.dumps(diagonal(A, 3, seed=0).to_dict(include_vectors=True))


def test_bad_inputs():
    A = _matrix(n=10)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        hutchinson(A, 0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        hutchinson(A, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples and num_matvecs are the same count"):
        hutchinson(A, 5, num_matvecs=6)
    with pytest.raises(ValueError, match="num_matvecs must be >= 3"):
        hutch_plus_plus(A, 2)
    with pytest.raises(ValueError, match="distribution must be 'rademacher' or 'gaussian'"):
        hutchinson(A, 4, distribution="uniform")
    with pytest.raises(ValueError, match="method must be one of"):
        trace(A, method="slq")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        diagonal(A, 4, block_size=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        trace(A, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DenseOperator needs a square"):
        trace(torch.ones(3, 4))
