"""The Oxford loss-landscapes guide through compat.oxford, against dense references."""

# The guide's blocks run verbatim, unused names and closures over loop variables included.
# ruff: noqa: RUF059, B007, B023

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessian_spectra.algorithms.results import ConvergenceWarning
from hessian_spectra.compat.oxford import (
    CudaFallbackWarning,
    ModelWrapper,
    hessian_trace,
    install_import_aliases,
    min_max_hessian_eigs,
)
from reference import sym_matrix_with_spectrum

F64 = torch.float64


def dense_hessian(model: nn.Module, loss_of_params) -> Tensor:
    """float64 Hessian (plain autograd) of loss_of_params(param_dict), trainable parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().double().reshape(-1) for n in names])

    def f(vec: Tensor) -> Tensor:
        parts = torch.split(vec, [s.numel() for s in shapes])
        return loss_of_params(
            {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        )

    return torch.autograd.functional.hessian(f, theta)


def output_loss_hessian(model: nn.Module, X: Tensor, loss_of_output) -> Tensor:
    m = copy.deepcopy(model).double()
    Xd = X.double()
    return dense_hessian(m, lambda p: loss_of_output(functional_call(m, p, (Xd,))))


def hutchinson_bound(H: Tensor, K: int, z: float = 5.0) -> float:
    """z standard errors of the mean of K Rademacher probes: sqrt(2 (||H||_F² - Σ H_ii²) / K)."""
    return z * float((2 * (H.pow(2).sum() - H.diagonal().pow(2).sum()) / K).sqrt())


@pytest.fixture
def aliases():
    saved = {k: v for k, v in sys.modules.items() if k.startswith("oxford_loss_landscapes")}
    install_import_aliases()
    yield
    for k in [k for k in sys.modules if k.startswith("oxford_loss_landscapes")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_guide_basic_usage_verbatim(aliases, capsys) -> None:
    # --- the guide's "Basic Usage", verbatim (its imports resolve through the aliases) ---
    import torch
    import torch.nn as nn
    from oxford_loss_landscapes.hessian.hessian import min_max_hessian_eigs
    from oxford_loss_landscapes.hessian.hessian_trace import hessian_trace
    from oxford_loss_landscapes.model_interface.model_wrapper import ModelWrapper

    # 1. Create your model
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 1))

    # 2. Prepare data
    X = torch.randn(100, 4)
    y = torch.randn(100, 1)

    # 3. Define loss function
    def loss_fn(model_output):
        return nn.MSELoss()(model_output, y)

    # 4. Wrap your model
    model_wrapper = ModelWrapper(model, loss_fn, X)

    # 5. Compute Hessian eigenvalues
    min_eig, max_eig, min_eigvec, max_eigvec = min_max_hessian_eigs(
        model_wrapper, use_cuda=torch.cuda.is_available()
    )

    # 6. Estimate Hessian trace
    trace = hessian_trace(model_wrapper, num_random_vectors=50)

    print(f"Minimum eigenvalue: {min_eig}")
    print(f"Maximum eigenvalue: {max_eig}")
    print(f"Condition number: {max_eig / min_eig if min_eig > 0 else 'inf'}")
    print(f"Hessian trace estimate: {trace}")
    # --- end of the guide's block ---

    H = output_loss_hessian(model, X, lambda out: nn.functional.mse_loss(out, y.double()))
    ev = torch.linalg.eigvalsh(H)
    scale = float(ev.abs().max())
    assert min_eig <= max_eig
    assert max_eig == pytest.approx(float(ev[-1]), rel=1e-3)
    assert abs(min_eig - float(ev[0])) <= 1e-3 * scale
    assert abs(trace - float(H.trace())) <= hutchinson_bound(H, 50)
    assert "Maximum eigenvalue" in capsys.readouterr().out


def mlp_setup():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    X = torch.randn(64, 4)
    y = torch.randn(64, 1)

    def loss_fn(model_output):
        return nn.MSELoss()(model_output, y)

    return model, X, y, loss_fn


def test_guide_workflows_model_analysis_and_training_monitoring(capsys) -> None:
    model, X, y, loss_fn = mlp_setup()
    num_epochs = 21
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    # --- Workflow 1: Model Analysis (the guide's loop body is a comment: a `pass` added) ---
    model.train()
    for epoch in range(num_epochs):
        # ... training loop ...
        pass

    # Analyze the trained model
    model.eval()
    model_wrapper = ModelWrapper(model, loss_fn, X)

    # Compute Hessian properties
    min_eig, max_eig, _, _ = min_max_hessian_eigs(model_wrapper)
    trace = hessian_trace(model_wrapper)

    # Interpret results
    condition_number = max_eig / min_eig if min_eig > 0 else float("inf")
    print("Model sharpness analysis:")
    print(f"  Condition number: {condition_number:.2f}")
    print(f"  Loss landscape sharpness: {trace:.4f}")

    # --- Workflow 2: Training Monitoring (a real training step where the guide has a comment) ---
    eigenvalue_history = []

    for epoch in range(num_epochs):
        # ... training step ...
        opt.zero_grad()
        loss_fn(model(X)).backward()
        opt.step()

        if epoch % 10 == 0:  # Check every 10 epochs
            model_wrapper = ModelWrapper(model, loss_fn, X)
            min_eig, max_eig, _, _ = min_max_hessian_eigs(model_wrapper)
            eigenvalue_history.append((epoch, min_eig, max_eig))

            H = output_loss_hessian(model, X, lambda out: nn.functional.mse_loss(out, y.double()))
            ev = torch.linalg.eigvalsh(H)
            assert max_eig == pytest.approx(float(ev[-1]), rel=1e-3)
            assert abs(min_eig - float(ev[0])) <= 1e-3 * float(ev.abs().max())

    # Analyze training dynamics
    for epoch, min_eig, max_eig in eigenvalue_history:
        condition = max_eig / min_eig if min_eig > 0 else float("inf")
        print(f"Epoch {epoch}: Condition number = {condition:.2f}")

    assert [e for e, _, _ in eigenvalue_history] == [0, 10, 20]
    assert "Epoch 20" in capsys.readouterr().out


def test_guide_custom_loss_function() -> None:
    model, X, y, _ = mlp_setup()

    # --- the guide's "Custom Loss Functions", verbatim ---
    def custom_loss_fn(model_output):
        # Your custom loss computation
        mse_loss = nn.MSELoss()(model_output, y)
        regularization = 0.01 * sum(p.norm() for p in model.parameters())
        return mse_loss + regularization

    model_wrapper = ModelWrapper(model, custom_loss_fn, X)
    # --- end ---

    min_eig, max_eig, min_vec, max_vec = min_max_hessian_eigs(model_wrapper, tol=1e-6, max_iter=300)
    m = copy.deepcopy(model).double()
    yd, Xd = y.double(), X.double()
    H = dense_hessian(
        m,
        lambda p: (
            nn.functional.mse_loss(functional_call(m, p, (Xd,)), yd)
            + 0.01 * sum(t.norm() for t in p.values())
        ),
    )
    ev = torch.linalg.eigvalsh(H)
    assert max_eig == pytest.approx(float(ev[-1]), rel=1e-5)
    assert min_eig == pytest.approx(float(ev[0]), rel=1e-5, abs=1e-6 * float(ev.abs().max()))
    Hf = H.float()
    assert float((Hf @ max_vec - max_eig * max_vec).norm()) <= 1e-4 * float(ev.abs().max())
    # the regularizer's Hessian is part of it: without it the spectrum differs
    H0 = output_loss_hessian(model, X, lambda out: nn.functional.mse_loss(out, yd))
    assert abs(float(torch.linalg.eigvalsh(H0)[0]) - min_eig) > 1e-4
    # loss_fn= overrides the wrapper's loss
    mn, mx, _, _ = min_max_hessian_eigs(
        model_wrapper, loss_fn=lambda out: nn.MSELoss()(out, y), tol=1e-6, max_iter=300
    )
    assert mx == pytest.approx(float(torch.linalg.eigvalsh(H0)[-1]), rel=1e-5)


def test_guide_batch_processing() -> None:
    model, X, y, _ = mlp_setup()

    # --- the guide's "Batch Processing", verbatim ---
    # For large datasets, use batched analysis
    batch_size = 32
    results = []

    for i in range(0, len(X), batch_size):
        X_batch = X[i : i + batch_size]
        y_batch = y[i : i + batch_size]

        def batch_loss_fn(model_output):
            return nn.MSELoss()(model_output, y_batch)

        wrapper = ModelWrapper(model, batch_loss_fn, X_batch)
        min_eig, max_eig, _, _ = min_max_hessian_eigs(wrapper)
        results.append((min_eig, max_eig))

    # Analyze batch results
    avg_min_eig = sum(r[0] for r in results) / len(results)
    avg_max_eig = sum(r[1] for r in results) / len(results)
    # --- end ---

    assert len(results) == 2
    for (mn, mx), i in zip(results, range(0, len(X), batch_size), strict=True):
        H = output_loss_hessian(
            model,
            X[i : i + batch_size],
            lambda out, i=i: nn.functional.mse_loss(out, y[i : i + batch_size].double()),
        )
        ev = torch.linalg.eigvalsh(H)
        assert mn <= mx
        assert mx == pytest.approx(float(ev[-1]), rel=1e-3)
        assert abs(mn - float(ev[0])) <= 1e-3 * float(ev.abs().max())
    assert avg_min_eig <= avg_max_eig


class Quadratic(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return self.w + 0 * x.sum()


@pytest.mark.parametrize(
    "eigs",
    [[0.5, 1.0, 2.0, 5.0], [-3.0, -0.5, 0.5, 2.0], [-5.0, -2.0, -1.5, -1.0]],
    ids=["positive-definite", "indefinite", "negative-definite"],
)
def test_min_max_for_every_sign_pattern(eigs: list[float]) -> None:
    A = sym_matrix_with_spectrum(eigs, seed=2)
    model = Quadratic(len(eigs))
    wrapper = ModelWrapper(model, lambda w: 0.5 * w @ A @ w, torch.zeros(1, dtype=F64))
    min_eig, max_eig, min_vec, max_vec = min_max_hessian_eigs(wrapper, tol=1e-8)
    assert min_eig <= max_eig
    assert min_eig == pytest.approx(min(eigs), rel=1e-6)
    assert max_eig == pytest.approx(max(eigs), rel=1e-6)
    torch.testing.assert_close(A @ min_vec, min_eig * min_vec, rtol=0, atol=1e-6)
    torch.testing.assert_close(A @ max_vec, max_eig * max_vec, rtol=0, atol=1e-6)
    K = 400
    est = hessian_trace(wrapper, num_random_vectors=K, seed=0)
    assert abs(est - sum(eigs)) <= hutchinson_bound(A, K)


def test_negative_mse_is_negative_definite_and_signs_kept() -> None:
    lin = nn.Linear(3, 1)
    X, y = torch.randn(40, 3), torch.randn(40, 1)
    wrapper = ModelWrapper(lin, lambda out: -nn.MSELoss()(out, y), X)
    min_eig, max_eig, _, _ = min_max_hessian_eigs(wrapper, tol=1e-6)
    Z = torch.cat([X, torch.ones(40, 1)], 1).double()
    ev = torch.linalg.eigvalsh(-2 / 40 * Z.T @ Z)
    assert min_eig < max_eig < 0
    assert min_eig == pytest.approx(float(ev[0]), rel=1e-4)
    assert max_eig == pytest.approx(float(ev[-1]), rel=1e-4)


def test_use_cuda_falls_back_with_a_warning_and_model_untouched() -> None:
    model, X, y, loss_fn = mlp_setup()
    model.train()
    before = copy.deepcopy(model.state_dict())
    wrapper = ModelWrapper(model, loss_fn, X)
    with pytest.warns(CudaFallbackWarning, match="computing on the CPU"):
        hessian_trace(wrapper, num_random_vectors=4, use_cuda=True, seed=0)
    with pytest.warns(CudaFallbackWarning):
        min_max_hessian_eigs(wrapper, use_cuda=True)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors_and_wrapper() -> None:
    model, X, y, loss_fn = mlp_setup()
    with pytest.raises(TypeError, match=r"ModelWrapper needs an nn\.Module"):
        ModelWrapper(lambda x: x, loss_fn, X)
    with pytest.raises(TypeError, match=r"loss_fn must be callable as loss_fn\(model_output\)"):
        ModelWrapper(model, None, X)
    with pytest.raises(TypeError, match="expected a ModelWrapper"):
        min_max_hessian_eigs(model)
    w = ModelWrapper(model, loss_fn, X)
    with pytest.raises(TypeError, match=r"loss_fn must be callable as loss_fn\(model_output\)"):
        hessian_trace(w, loss_fn=3)
    torch.testing.assert_close(w.loss(), loss_fn(model(X)))
    assert w().shape == (64, 1)
    with pytest.warns(ConvergenceWarning, match="raise max_iter"):
        min_max_hessian_eigs(w, max_iter=2, tol=1e-12)


def test_aliases_refuse_to_shadow_a_real_package(monkeypatch) -> None:
    import types

    fake = types.ModuleType("oxford_loss_landscapes")
    fake.__file__ = "/somewhere/oxford_loss_landscapes/__init__.py"
    monkeypatch.setitem(sys.modules, "oxford_loss_landscapes", fake)
    with pytest.raises(RuntimeError, match="would shadow"):
        install_import_aliases()
