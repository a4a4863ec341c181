"""Hostile inputs to the numerics: each gives the right answer or says it cannot.

Integer/complex operators are refused; a NaN sample or an infinite loss raises
:class:`NonFiniteError` naming the batch (every model operator, the model left
bit-identical); an asymmetric matrix is flagged not converged by ``dense_eigh``;
the spectral density integrates to 1 when nearly all eigenvalues are one value;
eigenvalues near 1e-200 or 1e200 come out right.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hessian_spectra import (
    ConvergenceWarning,
    CurvatureTracker,
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MCFisherOperator,
    NonFiniteError,
    block_lanczos,
    dense_eigh,
    diagonal,
    eigenpairs,
    hutch_plus_plus,
    lanczos,
    power_iteration,
    spectral_density,
    trace,
)
from hessian_spectra.losses import supervised_forward, supervised_loss, supervised_loss_of_output
from hessian_spectra.operators._finite import all_finite
from reference import check_pairs, sym_matrix_with_spectrum, tol
from test_model_state import snapshot

F64 = torch.float64


# -- item: integer and complex operators ------------------------------------------------------
def _algorithms():
    return {
        "lanczos": lambda A: lanczos(A, k=1, seed=0),
        "block_lanczos": lambda A: block_lanczos(A, k=1, seed=0),
        "eigenpairs": lambda A: eigenpairs(A, k=1, seed=0),
        "power": lambda A: power_iteration(A, seed=0),
        "hutch++": lambda A: hutch_plus_plus(A, seed=0),
        "trace": lambda A: trace(A, method="exact"),
        "diagonal": lambda A: diagonal(A, seed=0),
        "density": lambda A: spectral_density(A, seed=0),
        "dense_eigh": lambda A: dense_eigh(A),
    }


@pytest.mark.parametrize("alg", list(_algorithms()))
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.diag(torch.arange(1, 9)),
        lambda: DenseOperator(torch.diag(torch.arange(1, 9))),
        lambda: torch.diag(torch.arange(1.0, 9.0)).to(torch.complex128),
        lambda: LambdaOperator(matvec=lambda v: 2 * v, size=8, dtype=torch.int64),
        lambda: torch.eye(8, dtype=torch.bool),
    ],
    ids=["int-tensor", "int-dense", "complex", "int-lambda", "bool"],
)
def test_integer_and_complex_operators_are_refused(alg, make):
    with pytest.raises(TypeError, match=r"expected an operator of a real floating-point dtype"):
        _algorithms()[alg](make())


# -- item: non-finite products --------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(bad: int | None = None, how: str = "nan"):
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(6, 4, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g))
        for _ in range(4)
    ]
    if bad is not None and how == "nan":
        data[bad][0][3, 1] = float("nan")  # one sample of batch `bad`
    return data


def _inf_loss(bad: int):
    """Per-sample cross-entropy over ``c``, with ``c = 0`` (an infinite loss) on batch ``bad``."""
    data = [
        (x, y, torch.full((6,), 0.0 if i == bad else 1.0, dtype=F64))
        for i, (x, y) in enumerate(_data())
    ]

    def loss(m, b):
        return (F.cross_entropy(m(b[0]), b[1], reduction="none") / b[2]).mean()

    return data, loss


def _model_operator(kind: str, model, data, loss=None):
    ce = F.cross_entropy
    loss = loss or supervised_loss(ce)
    fwd, lof = supervised_forward(), supervised_loss_of_output(ce)
    if kind == "hessian":
        return HessianOperator(model, data, loss)
    if kind == "finite_difference":
        return HessianOperator(model, data, loss, method="finite_difference")
    if kind == "ggn":
        return GGNOperator(model, data, fwd, lof)
    if kind == "empirical_fisher":
        return EmpiricalFisherOperator(model, data, loss)
    return MCFisherOperator(model, data, fwd, lof)


KINDS = ["hessian", "finite_difference", "ggn", "empirical_fisher", "mc_fisher"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0, 2])
def test_a_nan_sample_raises_naming_the_batch_and_the_model_is_untouched(kind, bad):
    model = _mlp()
    op = _model_operator(kind, model, _data(bad))
    before = snapshot(model)
    what = "model output" if kind in ("ggn", "mc_fisher") else "loss is nan"
    with pytest.raises(NonFiniteError, match=rf"{type(op).__name__}: .*from batch {bad}: .*{what}"):
        lanczos(op, k=2, seed=0)
    assert snapshot(model) == before


@pytest.mark.parametrize("kind", ["hessian", "finite_difference", "empirical_fisher"])
def test_an_infinite_loss_on_one_batch_is_named(kind):
    model = _mlp()
    data, loss = _inf_loss(3)
    op = _model_operator(kind, model, data, loss=loss)
    with pytest.raises(NonFiniteError, match=r"from batch 3: its loss is inf"):
        op @ torch.ones(op.size, dtype=F64)


def test_every_algorithm_and_the_tracker_raise_nonfinite_before_the_algebra():
    model = _mlp()
    op = HessianOperator(model, _data(1), supervised_loss(F.cross_entropy))
    runs = {
        **{k: f for k, f in _algorithms().items() if k != "density"},
        "density": lambda A: spectral_density(A, num_runs=2, lanczos_steps=5, seed=0),
        "tracker": lambda A: CurvatureTracker(A, k=1).measure(),
    }
    for name, run in runs.items():
        with pytest.raises(NonFiniteError, match=r"from batch 1: its loss is nan"):
            run(op)
        assert name  # every one raised


def test_finite_difference_blames_the_perturbed_gradient_not_the_vector():
    """The loss and gradient are finite at theta but not at theta + eps v: the message
    says so (before, the next product blamed its input vector)."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e-3, 1.0]], dtype=F64))
    data = [(torch.eye(2, dtype=F64), torch.zeros(2, 1, dtype=F64))] * 2

    def loss(m, b):  # sqrt(w0) is undefined for w0 < 0: theta - eps v leaves the domain
        return torch.sqrt(m.weight[0, 0]) + (m(b[0]) ** 2).mean()

    op = HessianOperator(model, data, loss, method="finite_difference", fd_eps=1e-2)
    with pytest.raises(NonFiniteError, match=r"batch 0: its loss and gradient are finite.*fd_eps"):
        op @ torch.tensor([1.0, 0.0], dtype=F64)


def test_microbatches_are_named():
    model = _mlp()
    op = HessianOperator(model, _data(2), supervised_loss(F.cross_entropy), microbatch_size=2)
    with pytest.raises(NonFiniteError, match=r"from batch 2 \(microbatch 1\)"):
        op @ torch.ones(op.size, dtype=F64)  # the NaN sample is row 3: the second microbatch


@pytest.mark.parametrize(
    "make",
    [
        lambda: DenseOperator(
            torch.diag(torch.tensor([1.0, math.nan, 2.0], dtype=F64)), symmetric=True
        ),
        lambda: LambdaOperator(matvec=lambda v: v / 0.0, size=3, dtype=F64),
    ],
    ids=["dense-nan", "lambda-inf"],
)
def test_non_model_operators_raise_on_a_non_finite_product(make):
    for run in _algorithms().values():
        with pytest.raises(NonFiniteError, match=r"(product of a finite block|matrix) holds NaN"):
            run(make())
    op = make()
    with pytest.raises(
        NonFiniteError, match=r"the block multiplied holds NaN or inf \(rows \[1\]\)"
    ):
        op @ torch.tensor([[1.0, 0, 0], [math.inf, 0, 0]], dtype=F64)


def test_nonfinite_error_is_a_value_error():
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_the_product_check_sees_every_nan_and_inf_and_no_finite_overflow(dtype):
    big = torch.finfo(dtype).max
    x = torch.full((3, 50), big, dtype=dtype)  # finite, but its sum overflows
    assert all_finite(x) and all_finite(-x) and all_finite(torch.zeros(0, 5, dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[2, 17] = bad
        assert not all_finite(y)
    z = torch.ones(2, 4, dtype=dtype)
    z[0, 0], z[1, 1] = math.inf, -math.inf  # their sum is NaN
    assert not all_finite(z)


# -- item: dense_eigh of a non-symmetric operator -------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_dense_eigh_flags_an_asymmetric_matrix(dtype):
    A = sym_matrix_with_spectrum(torch.linspace(1, 4, 12), seed=0)
    B = A.clone()
    B[0, 5] += 0.17  # e.g. a wrong double backward
    op = LambdaOperator(matmat=lambda V: V @ B.T.to(dtype), size=12, dtype=dtype)
    with pytest.warns(ConvergenceWarning, match=r"not symmetric .* flagged converged=False"):
        res = dense_eigh(op)
    assert not res.converged and not bool(res.converged_mask.any())
    assert res.info["asymmetry"] > res.info["asymmetry_tol"]
    # rounding-level asymmetry of the same dtype stays converged, without a warning
    noise = torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=F64)
    C = A + 4 * torch.finfo(dtype).eps * noise
    op = LambdaOperator(matmat=lambda V: V @ C.T.to(dtype), size=12, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = dense_eigh(op)
    assert res.converged
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(A), atol=4 * tol(dtype))


# -- item: spectral density normalised ------------------------------------------------------
def _spectra():
    return {
        "990 zeros + 10": torch.cat([torch.zeros(990), torch.linspace(1, 10, 10)]),
        "990 threes + 10": torch.cat([3 * torch.ones(990), torch.linspace(1, 10, 10)]),
        "999 threes + 1e-3": torch.cat([3 * torch.ones(999), torch.tensor([1e-3])]),
        "all zero": torch.zeros(1000),
        "990 zeros + 1e6": torch.cat([torch.zeros(990), 1e6 * torch.ones(10)]),
    }


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", list(_spectra()))
def test_spectral_density_integrates_to_one_when_the_spectrum_is_nearly_one_value(name, dtype):
    A = sym_matrix_with_spectrum(_spectra()[name], seed=0, dtype=dtype)
    res = spectral_density(A, num_runs=4, lanczos_steps=30, seed=0)
    integral = float(torch.trapezoid(res.density, res.grid))
    assert abs(integral - 1) < 1e-6, integral
    assert res.info["integral"] == integral


def test_spectral_density_raises_a_sigma_below_the_grid_resolution():
    A = sym_matrix_with_spectrum(torch.linspace(1, 3, 50), seed=1)
    with pytest.warns(UserWarning, match=r"sigma=1e-20 is below what a float64 grid resolves"):
        res = spectral_density(A, num_runs=2, lanczos_steps=20, sigma=1e-20, seed=0)
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-6


# -- item: extreme scales -------------------------------------------------------------------
SOLVERS = {
    "lanczos": lambda A, which: lanczos(A, k=3, which=which, seed=0),
    "block_lanczos": lambda A, which: block_lanczos(A, k=3, which=which, seed=0),
    "eigenpairs": lambda A, which: eigenpairs(A, k=3, which=which, seed=0),
    "power": lambda A, which: power_iteration(A, seed=0),
}


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e160, 1e200])
@pytest.mark.parametrize(
    ("solver", "which"),
    # power iteration finds the largest magnitude only: no "SA" for it
    [(s, w) for s in SOLVERS for w in ("LA", "SA") if not (s == "power" and w == "SA")],
)
def test_eigenvalues_at_extreme_scales(solver, scale, which):
    spectrum = torch.linspace(1, 10, 40, dtype=F64)
    spectrum[-1] = 20.0  # a gap, so power iteration converges within its budget
    A = sym_matrix_with_spectrum(spectrum, seed=2)
    res = SOLVERS[solver](A * scale, which)
    assert res.converged
    k = res.eigenvalues.numel()
    unit = dataclasses.replace(res, eigenvalues=res.eigenvalues / scale)
    check_pairs(A, unit, k, "LM" if solver == "power" else which)
    X = res.eigenvectors
    true = torch.linalg.vector_norm(X @ A - unit.eigenvalues[:, None] * X, dim=1)
    # residuals are reported in the operator's units: the true ones, to rounding
    assert torch.allclose(res.residuals / scale, true, rtol=0, atol=1e-10)
    assert bool((true <= res.tol * 20).all())


@pytest.mark.parametrize("scale", [1e-200, 1e200])
def test_spectral_density_at_extreme_scales(scale):
    A = sym_matrix_with_spectrum(torch.linspace(1, 10, 60, dtype=F64), seed=3)
    ref = spectral_density(A, num_runs=3, lanczos_steps=15, seed=0)
    res = spectral_density(A * scale, num_runs=3, lanczos_steps=15, seed=0)
    assert torch.allclose(res.nodes / scale, ref.nodes, rtol=1e-9, atol=0)
    assert torch.allclose(res.weights, ref.weights, rtol=0, atol=1e-9)
    assert abs(float(torch.trapezoid(res.density, res.grid)) - 1) < 1e-6
