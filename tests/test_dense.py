"""Dense model and loss Hessians against closed forms and plain-autograd flat Hessians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessian_spectra.dense import (
    batch_loss_hessian_dict,
    batch_loss_hessian_matrix,
    batch_loss_sharpness,
    batch_model_hessian_dict,
    batch_model_hessian_matrix,
    batch_model_sharpness,
    loss_hessian_dict,
    loss_hessian_matrix,
    loss_sharpness,
    model_hessian_dict,
    model_hessian_matrix,
    model_sharpness,
    sharpness,
)
from reference import tol

F64 = torch.float64


# -- models with hand-derived Hessians -------------------------------------------------------


class MimoModel(nn.Module):
    """hesse's README model: [tr(A^T A) x, tr(B^T B) y]; d2/dA2 of out[i, j<k] = 2 x_ij I."""

    def __init__(self, input_dim: int, output_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(input_dim, output_dim, dtype=dtype))
        self.B = nn.Parameter(torch.randn(input_dim, output_dim, dtype=dtype))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.hstack(
            (torch.trace(self.A.T @ self.A) * x, torch.trace(self.B.T @ self.B) * y)
        )


class SumNormsSquared(nn.Module):
    """x (|A1|_F^2 + |A2|_F^2): Hessian 2 x I."""

    def __init__(self) -> None:
        super().__init__()
        self.A1 = nn.Parameter(torch.randn(2, 3, dtype=F64))
        self.A2 = nn.Parameter(torch.randn(2, 3, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.A1.pow(2).sum() + self.A2.pow(2).sum())


class DoubleBilinear(nn.Module):
    """x1^T B1 B2 x2: d2/dB1_ab dB2_b'c = x1_a delta_bb' x2_c, diagonal blocks zero."""

    def __init__(self, m: int = 2, n: int = 3, p: int = 4) -> None:
        super().__init__()
        self.B1 = nn.Parameter(torch.randn(m, n, dtype=F64))
        self.B2 = nn.Parameter(torch.randn(n, p, dtype=F64))

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return (x1 @ self.B1) @ (self.B2 @ x2)


def mlp(dtype: torch.dtype = F64, out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(dtype)


def _flat(model: nn.Module, names: list[str] | None = None):
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def params(vec: Tensor) -> dict[str, Tensor]:
        parts = torch.split(vec, [math.prod(s) for s in shapes])
        return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}

    return theta, params


def flat_model_hessian(model: nn.Module, inputs: tuple) -> Tensor:
    """Independent reference: torch.autograd.functional.hessian of each output entry of
    theta -> model(*inputs) on a flat vector (plain autograd, no torch.func)."""
    theta, params = _flat(model)
    shape = model(*inputs).shape
    rows = [
        torch.autograd.functional.hessian(
            lambda v, s=s: functional_call(model, params(v), inputs).reshape(-1)[s], theta
        )
        for s in range(math.prod(shape))
    ]
    return torch.stack(rows).reshape(*shape, theta.numel(), theta.numel())


def flat_loss_hessian(model: nn.Module, crit, x: Tensor, y: Tensor) -> Tensor:
    """Independent reference: torch.autograd.functional.hessian of theta -> crit(model(x), y)."""
    theta, params = _flat(model)
    return torch.autograd.functional.hessian(
        lambda v: crit(functional_call(model, params(v), (x,)), y), theta
    )


def hesse_readme() -> tuple[nn.Module, tuple[Tensor, Tensor], Tensor]:
    model = MimoModel(2, 2)
    x = torch.Tensor([[1.0, 2.0], [3.0, 4.0]])
    y = -1.0 * x
    expected = torch.zeros(model(x, y).shape + torch.Size([8, 8]))
    expected[0][0][:4, :4] = 2.0 * torch.eye(4)
    expected[0][1][:4, :4] = 4.0 * torch.eye(4)
    expected[0][2][4:, 4:] = -2.0 * torch.eye(4)
    expected[0][3][4:, 4:] = -4.0 * torch.eye(4)
    expected[1][0][:4, :4] = 6.0 * torch.eye(4)
    expected[1][1][:4, :4] = 8.0 * torch.eye(4)
    expected[1][2][4:, 4:] = -6.0 * torch.eye(4)
    expected[1][3][4:, 4:] = -8.0 * torch.eye(4)
    return model, (x, y), expected


# -- closed forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("diagonal_only", [False, True])
def test_hesse_readme_example_is_exact(diagonal_only: bool) -> None:
    model, inputs, expected = hesse_readme()
    hessian = model_hessian_matrix(model=model, inputs=inputs, diagonal_only=diagonal_only)
    assert hessian.equal(expected), "Error in Hessian values"


def test_mimo_closed_form_random_inputs() -> None:
    model = MimoModel(3, 2, dtype=F64)
    x = torch.randn(4, 2, dtype=F64)
    y = torch.randn(4, 2, dtype=F64)
    H = model_hessian_matrix(model, (x, y))
    assert H.shape == (4, 4, 12, 12)
    eye = torch.eye(6, dtype=F64)
    expected = torch.zeros(4, 4, 12, 12, dtype=F64)
    for i in range(4):
        for j in range(2):
            expected[i, j, :6, :6] = 2 * x[i, j] * eye
            expected[i, 2 + j, 6:, 6:] = 2 * y[i, j] * eye
    torch.testing.assert_close(H, expected, rtol=tol(F64), atol=tol(F64))


def test_sum_norms_squared_closed_form_single_and_per_sample() -> None:
    model = SumNormsSquared()
    x = torch.tensor(1.5, dtype=F64)
    H = model_hessian_matrix(model, x)
    torch.testing.assert_close(H, 3.0 * torch.eye(12, dtype=F64))
    xs = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    Hb = batch_model_hessian_matrix(model, xs)
    assert Hb.shape == (3, 12, 12)
    torch.testing.assert_close(Hb, 2 * xs[:, None, None] * torch.eye(12, dtype=F64))
    blocks = model_hessian_dict(model, x)
    assert set(blocks) == {("A1", "A1"), ("A1", "A2"), ("A2", "A1"), ("A2", "A2")}
    assert blocks[("A1", "A2")].shape == (2, 3, 2, 3)
    assert torch.count_nonzero(blocks[("A1", "A2")]) == 0


@pytest.mark.parametrize("diagonal_only", [False, True])
def test_double_bilinear_closed_form(diagonal_only: bool) -> None:
    m, n, p = 2, 3, 4
    model = DoubleBilinear(m, n, p)
    x1, x2 = torch.randn(5, m, dtype=F64), torch.randn(5, p, dtype=F64)
    H = batch_model_hessian_matrix(model, (x1, x2), diagonal_only=diagonal_only)
    assert H.shape == (5, m * n + n * p, m * n + n * p)
    for b in range(5):
        h12 = torch.einsum("a,bd,c->abdc", x1[b], torch.eye(n, dtype=F64), x2[b]).reshape(
            m * n, n * p
        )
        expected = torch.zeros(m * n + n * p, m * n + n * p, dtype=F64)
        if not diagonal_only:
            expected[: m * n, m * n :] = h12
            expected[m * n :, : m * n] = h12.T
        torch.testing.assert_close(H[b], expected, rtol=tol(F64), atol=tol(F64))


def test_least_squares_loss_hessian_with_bias() -> None:
    """nn.Linear with a bias (parameters of different rank): H = 2/N [X 1]^T [X 1]."""
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(7, 3, dtype=F64), torch.randn(7, 1, dtype=F64)
    Z = torch.cat([x, torch.ones(7, 1, dtype=F64)], dim=1)
    H = loss_hessian_matrix(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(H, 2 / 7 * Z.T @ Z, rtol=tol(F64), atol=tol(F64))
    Hs = batch_loss_hessian_matrix(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(Hs, 2 * Z[:, :, None] * Z[:, None, :], rtol=tol(F64), atol=tol(F64))
    torch.testing.assert_close(Hs.mean(0), H, rtol=tol(F64), atol=tol(F64))


# -- against torch.autograd.functional.hessian of a flat function ---------------------------


def test_model_hessian_matches_flat_reference_mlp() -> None:
    model = mlp()
    x = torch.randn(5, 3, dtype=F64)
    H = model_hessian_matrix(model, x)
    torch.testing.assert_close(H, flat_model_hessian(model, (x,)), rtol=tol(F64), atol=tol(F64))
    Hb = batch_model_hessian_matrix(model, x)
    for b in range(5):
        torch.testing.assert_close(
            Hb[b], flat_model_hessian(model, (x[b],)), rtol=tol(F64), atol=tol(F64)
        )


def test_loss_hessian_matches_reference() -> None:
    model = mlp()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    H = loss_hessian_matrix(model, nn.MSELoss(), x, y)
    ref = flat_loss_hessian(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(H, ref, rtol=tol(F64), atol=tol(F64))
    Hb = batch_loss_hessian_matrix(model, nn.MSELoss(), x, y)
    for b in range(6):
        ref_b = flat_loss_hessian(model, nn.MSELoss(), x[b], y[b])
        torch.testing.assert_close(Hb[b], ref_b, rtol=tol(F64), atol=tol(F64))


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm-train"])
def test_normalization_layers_match_plain_autograd(norm: str) -> None:
    """torch.func.hessian is off by ~0.15 here in torch 2.13; the dense module must not be."""
    layer = nn.LayerNorm(4) if norm == "layernorm" else nn.BatchNorm1d(4, track_running_stats=False)
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64)
    H = loss_hessian_matrix(model, nn.MSELoss(), x, y, eval_mode=False)
    torch.testing.assert_close(
        H, flat_loss_hessian(model, nn.MSELoss(), x, y), rtol=tol(F64), atol=tol(F64)
    )
    M = model_hessian_matrix(model, x, eval_mode=False)
    torch.testing.assert_close(M, flat_model_hessian(model, (x,)), rtol=tol(F64), atol=tol(F64))
    if norm == "layernorm":
        Hb = batch_loss_hessian_matrix(model, nn.MSELoss(), x, y)
        for b in range(4):
            torch.testing.assert_close(
                Hb[b],
                flat_loss_hessian(model, nn.MSELoss(), x[b], y[b]),
                rtol=tol(F64),
                atol=tol(F64),
            )


def test_diagonal_only_places_blocks_at_their_offsets() -> None:
    """Blocks of different sizes (weight 4x3, bias 4, weight 2x4, bias 2) keep their offsets."""
    model = mlp()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    full = loss_hessian_matrix(model, nn.MSELoss(), x, y)
    diag = loss_hessian_matrix(model, nn.MSELoss(), x, y, diagonal_only=True)
    mask = torch.zeros_like(full, dtype=torch.bool)
    off = 0
    for p in model.parameters():
        mask[off : off + p.numel(), off : off + p.numel()] = True
        off += p.numel()
    torch.testing.assert_close(
        diag, torch.where(mask, full, torch.zeros_like(full)), rtol=tol(F64), atol=tol(F64)
    )
    assert torch.count_nonzero(diag[~mask]) == 0
    blocks = loss_hessian_dict(model, nn.MSELoss(), x, y, diagonal_only=True)
    assert set(blocks) == {(n, n) for n, _ in model.named_parameters()}
    dm = model_hessian_matrix(model, x, diagonal_only=True)
    fm = model_hessian_matrix(model, x)
    torch.testing.assert_close(
        dm, torch.where(mask, fm, torch.zeros_like(fm)), rtol=tol(F64), atol=tol(F64)
    )


def test_frozen_parameters_left_out_and_selection() -> None:
    model = mlp()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    full = loss_hessian_matrix(model, nn.MSELoss(), x, y)
    model[0].weight.requires_grad_(False)
    H = loss_hessian_matrix(model, nn.MSELoss(), x, y)
    assert H.shape == (26 - 12, 26 - 12)
    torch.testing.assert_close(H, full[12:, 12:], rtol=tol(F64), atol=tol(F64))
    blocks = loss_hessian_dict(model, nn.MSELoss(), x, y)
    assert all("0.weight" not in k for k in blocks)
    by_name = loss_hessian_matrix(model, nn.MSELoss(), x, y, params=["2.weight"])
    torch.testing.assert_close(by_name, full[16:24, 16:24], rtol=tol(F64), atol=tol(F64))
    by_filter = loss_hessian_matrix(
        model, nn.MSELoss(), x, y, params=lambda n, p: n.endswith("bias")
    )
    idx = torch.cat([torch.arange(12, 16), torch.arange(24, 26)])
    torch.testing.assert_close(by_filter, full[idx][:, idx], rtol=tol(F64), atol=tol(F64))


# -- shapes ---------------------------------------------------------------------------------


class Shaped(nn.Module):
    """Output of a chosen shape per sample: () / (3,) / (2, 3)."""

    def __init__(self, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = out_shape
        self.lin = nn.Linear(4, max(1, math.prod(out_shape)))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return h.reshape(x.shape[:-1] + self.out_shape)


@pytest.mark.parametrize("out_shape", [(), (3,), (2, 3)])
def test_shapes_for_every_batch_and_output_combination(out_shape: tuple[int, ...]) -> None:
    model = Shaped(out_shape)
    n = sum(p.numel() for p in model.parameters())
    B = 5
    x1, xb = torch.randn(4), torch.randn(B, 4)
    assert model_hessian_matrix(model, x1).shape == (*out_shape, n, n)
    assert model_hessian_matrix(model, xb).shape == (
        B,
        *out_shape,
        n,
        n,
    )  # batch dim is an output dim
    assert batch_model_hessian_matrix(model, xb).shape == (B, *out_shape, n, n)
    blocks = batch_model_hessian_dict(model, xb)
    assert blocks[("lin.weight", "lin.bias")].shape == (
        B,
        *out_shape,
        *model.lin.weight.shape,
        *model.lin.bias.shape,
    )
    assert model_sharpness(model, x1).shape == out_shape
    assert batch_model_sharpness(model, xb).shape == (B, *out_shape)
    target = torch.randn(B, *out_shape)
    assert loss_hessian_matrix(model, nn.MSELoss(), xb, target).shape == (n, n)
    assert batch_loss_hessian_matrix(model, nn.MSELoss(), xb, target).shape == (B, n, n)
    assert batch_loss_hessian_dict(model, nn.MSELoss(), xb, target)[
        ("lin.bias", "lin.bias")
    ].shape == (B, *model.lin.bias.shape, *model.lin.bias.shape)
    assert loss_sharpness(model, nn.MSELoss(), xb, target).shape == ()
    assert batch_loss_sharpness(model, nn.MSELoss(), xb, target).shape == (B,)


def test_vectorize_false_equals_vmap() -> None:
    model = mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    a = batch_loss_hessian_matrix(model, nn.MSELoss(), x, y)
    b = batch_loss_hessian_matrix(model, nn.MSELoss(), x, y, vectorize=False)
    torch.testing.assert_close(a, b, rtol=tol(F64), atol=tol(F64))
    c = batch_model_hessian_matrix(model, x, vectorize=False)
    torch.testing.assert_close(
        c, batch_model_hessian_matrix(model, x), rtol=tol(F64), atol=tol(F64)
    )


# -- dtype, device, model untouched ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_kept(dtype: torch.dtype) -> None:
    model = mlp(dtype)
    x, y = torch.randn(4, 3, dtype=dtype), torch.randn(4, 2, dtype=dtype)
    assert loss_hessian_matrix(model, nn.MSELoss(), x, y).dtype == dtype
    assert model_hessian_matrix(model, x, diagonal_only=True).dtype == dtype
    assert batch_loss_sharpness(model, nn.MSELoss(), x, y).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_kept_cuda() -> None:
    model = mlp(torch.float32).cuda()
    x, y = torch.randn(4, 3, device="cuda"), torch.randn(4, 2, device="cuda")
    H = loss_hessian_matrix(model, nn.MSELoss(), x, y, diagonal_only=True)
    assert H.device.type == "cuda"
    ref = loss_hessian_matrix(
        copy.deepcopy(model).cpu(), nn.MSELoss(), x.cpu(), y.cpu(), diagonal_only=True
    )
    torch.testing.assert_close(H.cpu(), ref, rtol=1e-4, atol=1e-5)
    assert batch_model_hessian_matrix(model, x).device.type == "cuda"


def test_model_left_untouched_and_works_under_no_grad() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 1)
    )
    model.train()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        H = loss_hessian_matrix(model, nn.MSELoss(), x, y)
    assert torch.isfinite(H).all()
    assert model.training and model[1].training and model[2].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # eval_mode=True (default) means the eval-mode function: equal to the reference in eval mode
    ev = copy.deepcopy(model).eval()
    ref = flat_loss_hessian(ev.double(), nn.MSELoss(), x.double(), y.double())
    torch.testing.assert_close(H.double(), ref, rtol=1e-4, atol=1e-5)


# -- sharpness --------------------------------------------------------------------------------


def test_sharpness_of_matrices() -> None:
    from reference import sym_matrix_with_spectrum

    A = sym_matrix_with_spectrum([-5.0, 1.0, 2.0, 3.0])
    B = sym_matrix_with_spectrum([0.5, -0.25, 4.0, 1.0], seed=1)
    s = sharpness(torch.stack([A, B]))
    torch.testing.assert_close(s, torch.tensor([5.0, 4.0], dtype=F64))


def test_loss_sharpness_dense_matches_eigendecomposition_and_sign() -> None:
    model = mlp()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)

    def neg_mse(out: Tensor, t: Tensor) -> Tensor:
        return -nn.functional.mse_loss(out, t)

    for crit in (nn.MSELoss(), neg_mse):
        H = loss_hessian_matrix(model, crit, x, y)
        ev = torch.linalg.eigvalsh(H)
        torch.testing.assert_close(
            loss_sharpness(model, crit, x, y, method="dense"), ev.abs().max()
        )
        off = 0
        per_block = []
        for p in model.parameters():
            blk = H[off : off + p.numel(), off : off + p.numel()]
            per_block.append(torch.linalg.eigvalsh(blk).abs().max())
            off += p.numel()
        torch.testing.assert_close(
            loss_sharpness(model, crit, x, y, diagonal_only=True), torch.stack(per_block).max()
        )
    # -MSE of a linear model: negative semidefinite, sharpness = |lambda_min|
    lin = nn.Linear(3, 1).double()
    H = loss_hessian_matrix(lin, neg_mse, x, y[:, :1])
    ev = torch.linalg.eigvalsh(H)
    assert ev.max() <= tol(F64) * ev.abs().max()
    torch.testing.assert_close(loss_sharpness(lin, neg_mse, x, y[:, :1]), -ev.min())


def test_batch_sharpness_matches_per_sample_matrices() -> None:
    model = mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    Hb = batch_loss_hessian_matrix(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(
        batch_loss_sharpness(model, nn.MSELoss(), x, y), torch.linalg.eigvalsh(Hb).abs().amax(-1)
    )
    Mb = batch_model_hessian_matrix(model, x)
    torch.testing.assert_close(
        batch_model_sharpness(model, x), torch.linalg.eigvalsh(Mb).abs().amax(-1)
    )
    Md = batch_model_hessian_matrix(model, x, diagonal_only=True)
    torch.testing.assert_close(
        batch_model_sharpness(model, x, diagonal_only=True),
        torch.linalg.eigvalsh(Md).abs().amax(-1),
    )


@pytest.mark.parametrize("diagonal_only", [False, True])
def test_lanczos_sharpness_matches_dense(diagonal_only: bool) -> None:
    model = mlp()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    for crit in (nn.MSELoss(), lambda o, t: -nn.functional.mse_loss(o, t)):
        dense = loss_sharpness(model, crit, x, y, method="dense", diagonal_only=diagonal_only)
        free = loss_sharpness(
            model, crit, x, y, method="lanczos", diagonal_only=diagonal_only, tol=1e-10
        )
        torch.testing.assert_close(free, dense, rtol=1e-7, atol=1e-9)
    dense = model_sharpness(model, x[0], method="dense", diagonal_only=diagonal_only)
    free = model_sharpness(model, x[0], method="lanczos", diagonal_only=diagonal_only, tol=1e-10)
    torch.testing.assert_close(free, dense, rtol=1e-7, atol=1e-9)
    free_b = batch_loss_sharpness(
        model, nn.MSELoss(), x[:2], y[:2], method="lanczos", tol=1e-10, diagonal_only=diagonal_only
    )
    torch.testing.assert_close(
        free_b,
        batch_loss_sharpness(model, nn.MSELoss(), x[:2], y[:2], diagonal_only=diagonal_only),
        rtol=1e-7,
        atol=1e-9,
    )


# -- errors ---------------------------------------------------------------------------------


def test_errors() -> None:
    model = mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="unknown parameter name"):
        loss_hessian_matrix(model, nn.MSELoss(), x, y, params=["nope"])
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        loss_hessian_matrix(model, nn.MSELoss(), x, y, params=["0.bias"])
    with pytest.raises(TypeError, match="params must be None"):
        loss_hessian_matrix(model, nn.MSELoss(), x, y, params=3)
    with pytest.raises(TypeError, match="parameter names must be strings"):
        loss_hessian_matrix(model, nn.MSELoss(), x, y, params=[1])
    with pytest.raises(ValueError, match="needs a scalar loss"):
        loss_hessian_matrix(model, nn.MSELoss(reduction="none"), x, y)
    with pytest.raises(TypeError, match="criterion must be callable"):
        loss_hessian_matrix(model, "mse", x, y)
    with pytest.raises(ValueError, match="disagree in their leading"):
        batch_loss_hessian_matrix(model, nn.MSELoss(), x, y[:3])
    with pytest.raises(TypeError, match="map over the leading dimension"):
        batch_model_hessian_matrix(model, [x])
    with pytest.raises(ValueError, match="0-d tensor"):
        batch_model_hessian_matrix(SumNormsSquared(), torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match="no batch inputs given"):
        batch_model_hessian_matrix(model, ())
    with pytest.raises(ValueError, match="method must be one of"):
        loss_sharpness(model, nn.MSELoss(), x, y, method="eigsh")
    with pytest.raises(ValueError, match=r"square matrices of shape \(\.\.\., n, n\)"):
        sharpness(torch.ones(2, 3))

    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x * self.w, x

    with pytest.raises(TypeError, match="needs a tensor output"):
        model_hessian_matrix(TupleOut(), torch.ones(2))
