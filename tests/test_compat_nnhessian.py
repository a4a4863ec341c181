"""NNHessian's README and API through hessian_spectra.compat.nnhessian, against dense references."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessian_spectra.compat.nnhessian import NNHessianCalculator
from reference import sym_matrix_with_spectrum, tol

F64 = torch.float64


def test_readme_example_runs_as_written() -> None:
    # --- the README, verbatim but for the import ---
    import torch
    import torch.nn as nn

    # Example model and loss
    model = nn.Linear(10, 1)
    loss_fn = nn.MSELoss()

    # Example dataloader
    data = torch.randn(100, 10)
    targets = torch.randn(100, 1)
    dataloader = [(data, targets)]

    # Create calculator
    calc = NNHessianCalculator(model, loss_fn, dataloader)

    # Estimate Hessian trace
    trace = calc.hutchinson_trace()
    print("Estimated trace:", trace)

    # Find max eigenvalue
    max_eig = calc.max_eigenvalue_power()
    print("Max eigenvalue:", max_eig)
    # --- end of the README ---

    # H = 2/N [X 1]^T [X 1] exactly (MSE of a linear model)
    Z = torch.cat([data, torch.ones(100, 1)], dim=1).double()
    H = 2 / 100 * Z.T @ Z
    ev = torch.linalg.eigvalsh(H)
    assert isinstance(trace, float) and isinstance(max_eig, float)
    assert max_eig == pytest.approx(float(ev[-1]), rel=1e-4)
    est, std, stderr = calc.hutchinson_trace(num_samples=50, seed=3, return_std=True)
    assert abs(est - float(H.trace())) <= 5 * stderr
    assert std == pytest.approx(stderr * 50**0.5, rel=1e-6)


class Quadratic(nn.Module):
    """forward returns the parameter w; with criterion 0.5 wᵀ A w the Hessian is exactly A."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return self.w + 0 * x.sum()


def quad_loss(out: Tensor, A: Tensor) -> Tensor:
    A = A[0] if A.dim() == 3 else A
    return 0.5 * out @ A @ out


def quad_calc(eigs: list[float], **kw) -> tuple[NNHessianCalculator, Tensor]:
    A = sym_matrix_with_spectrum(eigs, seed=5)
    model = Quadratic(len(eigs))
    return NNHessianCalculator(model, quad_loss, [(torch.zeros(1, 1, dtype=F64), A[None])], **kw), A


@pytest.mark.parametrize(
    ("eigs", "lm", "la"),
    [
        ([-5.0, -1.0, 0.5, 2.0, 3.0], -5.0, 3.0),  # indefinite, |lambda_min| > lambda_max
        ([-4.0, -3.0, -2.5, -1.0], -4.0, -1.0),  # negative definite
        ([0.5, 1.0, 2.0, 6.0], 6.0, 6.0),  # positive definite
    ],
)
def test_which_lm_and_la_against_known_spectra(eigs: list[float], lm: float, la: float) -> None:
    calc, A = quad_calc(eigs)
    assert calc.max_eigenvalue_power(which="lm", seed=0) == pytest.approx(lm, rel=1e-6)
    lam, v = calc.max_eigenvalue_power(which="la", seed=0, return_vec=True)
    assert lam == pytest.approx(la, rel=1e-6)
    assert v.shape == (len(eigs),)
    torch.testing.assert_close(A @ v, lam * v, rtol=0, atol=1e-4 * max(abs(e) for e in eigs))
    init = torch.ones(len(eigs), dtype=F64)
    assert calc.max_eigenvalue_power(which="LA", init_vec=init) == pytest.approx(la, rel=1e-6)


def mlp_problem(sizes: tuple[int, ...] = (30, 3)) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    batches = [(torch.randn(s, 3, dtype=F64), torch.randn(s, 1, dtype=F64)) for s in sizes]
    return model, batches


def mse_ref(model: nn.Module, batches: list, names: list[str] | None = None) -> Tensor:
    """Hessian of the sample-weighted mean MSE over ``batches`` (plain autograd, float64)."""
    m = copy.deepcopy(model).double()
    named = dict(m.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    total = sum(x.shape[0] for x, _ in batches)

    def f(v: Tensor) -> Tensor:
        parts = torch.split(v, [s.numel() for s in shapes])
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return sum(
            x.shape[0] / total * nn.functional.mse_loss(functional_call(m, p, (x,)), y)
            for x, y in batches
        )

    return torch.autograd.functional.hessian(f, theta)


def hutchinson_sigma(H: Tensor) -> float:
    """Standard deviation of one Rademacher probe zᵀHz: sqrt(2 (||H||_F² - Σ H_ii²))."""
    return float((2 * (H.pow(2).sum() - H.diagonal().pow(2).sum())).sqrt())


def test_mean_is_sample_weighted_over_unequal_batches() -> None:
    model, batches = mlp_problem((30, 3))
    H = mse_ref(model, batches)  # weights 30/33 and 3/33
    ev = torch.linalg.eigvalsh(H)
    calc = NNHessianCalculator(model, nn.MSELoss(), batches)
    lam = calc.max_eigenvalue_power(which="la", seed=0)
    assert lam == pytest.approx(float(ev[-1]), rel=1e-5)
    equal = 0.5 * (mse_ref(model, batches[:1]) + mse_ref(model, batches[1:]))
    assert abs(float(torch.linalg.eigvalsh(equal)[-1]) - lam) > 1e-3 * abs(
        lam
    )  # the weighting matters
    K = 200
    est, _, stderr = calc.hutchinson_trace(num_samples=K, seed=1, return_std=True)
    assert abs(est - float(H.trace())) <= 5 * hutchinson_sigma(H) / K**0.5
    assert stderr > 0


def test_aggregate_sum_is_num_batches_times_mean_for_equal_batches() -> None:
    model, batches = mlp_problem((8, 8, 8))
    mean = NNHessianCalculator(model, nn.MSELoss(), batches, aggregate_method="mean")
    total = NNHessianCalculator(model, nn.MSELoss(), batches, aggregate_method="sum")
    H = mse_ref(model, batches)
    assert total.max_eigenvalue_power(which="la", seed=0) == pytest.approx(
        3 * mean.max_eigenvalue_power(which="la", seed=0), rel=1e-6
    )
    assert mean.max_eigenvalue_power(which="la", seed=0) == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5
    )
    a = total.hutchinson_trace(num_samples=20, seed=4)
    b = mean.hutchinson_trace(num_samples=20, seed=4)
    assert a == pytest.approx(3 * b, rel=1e-9)
    # unequal batches: "sum" adds the per-batch mean losses, "mean" weights them by size
    model, batches = mlp_problem((10, 2))
    s = NNHessianCalculator(model, nn.MSELoss(), batches, aggregate_method="sum")
    Hs = mse_ref(model, batches[:1]) + mse_ref(model, batches[1:])
    assert s.max_eigenvalue_power(which="la", seed=0) == pytest.approx(
        float(torch.linalg.eigvalsh(Hs)[-1]), rel=1e-5
    )
    # "sum" keeps each batch's graph through a run as "mean" does: the same forward passes
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        counts = []
        for agg in ("mean", "sum"):
            forwards.clear()
            NNHessianCalculator(
                model, nn.MSELoss(), batches, aggregate_method=agg
            ).max_eigenvalue_power(which="la", seed=0)
            counts.append(len(forwards))
    finally:
        hook.remove()
    assert counts[0] == counts[1] < 10


def test_assigned_parameters_all_selector_kinds() -> None:
    model, batches = mlp_problem((12,))
    cases = {
        "exact": (["2.weight"], ["2.weight"]),
        "glob": (["*.bias"], ["0.bias", "2.bias"]),
        "regex": ([re.compile(r"^0\.")], ["0.weight", "0.bias"]),
        "re-string": (["re:weight$"], ["0.weight", "2.weight"]),
        "callable2": ([lambda name, p: p.dim() == 1], ["0.bias", "2.bias"]),
        "callable1": ([lambda name: name.startswith("2")], ["2.weight", "2.bias"]),
        "param": ([model[0].weight], ["0.weight"]),
        "mixed": (["2.bias", model[0].bias], ["0.bias", "2.bias"]),
    }
    for label, (selectors, names) in cases.items():
        calc = NNHessianCalculator(model, nn.MSELoss(), batches, assigned_parameters=selectors)
        assert list(calc.named_params) == names, label
        H = mse_ref(model, batches, names)
        assert calc.total_params == H.shape[0]
        lam = calc.max_eigenvalue_power(which="lm", seed=0, num_iters=100)
        ev = torch.linalg.eigvalsh(H)
        assert lam == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-5), label
    assert (
        NNHessianCalculator(model, nn.MSELoss(), batches, assigned_parameters=[]).total_params == 21
    )


def test_hutch_plus_plus_and_full_spectrum() -> None:
    model, batches = mlp_problem((16,))
    H = mse_ref(model, batches)
    n = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    calc = NNHessianCalculator(model, nn.MSELoss(), batches)
    est = calc.hutch_pp_trace_estimator(10, seed=0)
    assert isinstance(est, Tensor) and est.dim() == 0
    many = torch.stack([calc.hutch_pp_trace_estimator(10, seed=s) for s in range(40)])
    # the mean of 40 unbiased estimates within 5 standard errors of the exact trace
    assert abs(float(many.mean()) - float(H.trace())) <= 5 * float(many.std()) / 40**0.5 + tol(F64)

    values, weights = calc.get_full_spectrum(n_v=3, n_iter=n, seed=0)
    assert isinstance(values, np.ndarray) and isinstance(weights, np.ndarray)
    assert values.shape == weights.shape and values.ndim == 1
    assert weights.sum() == pytest.approx(3.0, rel=1e-8)  # each run's weights sum to 1
    assert values.max() == pytest.approx(float(ev[-1]), rel=1e-6)  # a full Krylov space is exact
    assert values.min() >= float(ev[0]) - 1e-6 * float(ev.abs().max())


def test_external_load_batch_func_and_dataloader_override() -> None:
    model, batches = mlp_problem((9, 9))
    dict_batches = [{"x": x, "y": y} for x, y in batches]

    def load(batch: dict, device: str) -> tuple[Tensor, Tensor, int]:
        return batch["x"].to(device), batch["y"].to(device), batch["x"].shape[0]

    calc = NNHessianCalculator(model, nn.MSELoss(), dict_batches, external_load_batch_func=load)
    H = mse_ref(model, batches)
    assert calc.max_eigenvalue_power(which="la", seed=0) == pytest.approx(
        float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5
    )
    other = NNHessianCalculator(model, nn.MSELoss())  # no dataloader at construction
    H1 = mse_ref(model, batches[:1])
    assert other.max_eigenvalue_power(dataloader=batches[:1], which="la", seed=0) == pytest.approx(
        float(torch.linalg.eigvalsh(H1)[-1]), rel=1e-5
    )


def test_model_left_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    batches = [(torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64))]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = copy.deepcopy(model.state_dict())
    calc = NNHessianCalculator(model, nn.MSELoss(), batches)
    calc.hutchinson_trace(num_samples=3, seed=0)
    calc.max_eigenvalue_power(num_iters=5, seed=0)
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_errors() -> None:
    model, batches = mlp_problem((5,))
    with pytest.raises(ValueError, match="aggregate_method must be one of"):
        NNHessianCalculator(model, nn.MSELoss(), batches, aggregate_method="median")
    with pytest.raises(TypeError, match="assigned_parameters takes names"):
        NNHessianCalculator(model, nn.MSELoss(), batches, assigned_parameters=[3])
    with pytest.raises(ValueError, match="no trainable parameter selected"):
        NNHessianCalculator(model, nn.MSELoss(), batches, assigned_parameters=["nothing.*"])
    with pytest.raises(TypeError, match="loss_fn must be a criterion"):
        NNHessianCalculator(model, None, batches)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        NNHessianCalculator(lambda x: x, nn.MSELoss(), batches)
    with pytest.raises(TypeError, match="external_load_batch_func must be callable"):
        NNHessianCalculator(model, nn.MSELoss(), batches, external_load_batch_func=3)
    bad = NNHessianCalculator(
        model, nn.MSELoss(), batches, external_load_batch_func=lambda b, d: b[0]
    )
    with pytest.raises(TypeError, match="external_load_batch_func must return"):
        bad.hutchinson_trace(num_samples=2)
    calc = NNHessianCalculator(model, nn.MSELoss(), batches)
    with pytest.raises(ValueError, match="num_iters must be an int >= 3"):
        calc.max_eigenvalue_power(num_iters=1)
    with pytest.raises(ValueError, match="which must be 'lm'"):
        calc.max_eigenvalue_power(which="sa")
    with pytest.raises(ValueError, match="distribution must be 'rademacher' or 'normal'"):
        calc.hutchinson_trace(distribution="uniform")
    with pytest.raises(ValueError, match="init_vec has 3 entries"):
        calc.max_eigenvalue_power(init_vec=torch.ones(3))
    with pytest.raises(ValueError, match="no dataloader"):
        NNHessianCalculator(model, nn.MSELoss()).hutchinson_trace()
    with pytest.raises(TypeError, match=r"must be an \(inputs, targets\) pair"):
        NNHessianCalculator(model, nn.MSELoss(), [torch.randn(4, 3)]).hutchinson_trace(
            num_samples=2
        )


def test_model_on_another_device_is_moved_with_a_warning() -> None:
    model, batches = mlp_problem((5,))
    with pytest.warns(UserWarning, match="moves the model from cpu to meta"):
        NNHessianCalculator(model, nn.MSELoss(), batches, device="meta")
    assert next(model.parameters()).device.type == "meta"
