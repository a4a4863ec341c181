"""hesse's README and API through hessian_spectra.compat.hesse (only the import adapted)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hessian_spectra.compat import hesse
from reference import tol

F64 = torch.float64


def test_hesse_readme_example() -> None:
    # --- the README, verbatim but for the import ---
    class MimoModel(torch.nn.Module):
        """Multi-input, multi-output model."""

        def __init__(self, input_dim: int, output_dim: int) -> None:
            super().__init__()
            self.A = torch.nn.Parameter(torch.randn(input_dim, output_dim))
            self.B = torch.nn.Parameter(torch.randn(input_dim, output_dim))

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            rows_1 = torch.trace(self.A.T @ self.A) * x
            rows_2 = torch.trace(self.B.T @ self.B) * y
            return torch.hstack((rows_1, rows_2))

    input_dim = 2
    output_dim = 2
    model = MimoModel(input_dim, output_dim)

    x = torch.Tensor(
        [
            [1.0, 2.0],
            [3.0, 4.0],
        ]
    )
    y = -1.0 * x

    hessian = hesse.model_hessian_matrix(model=model, inputs=(x, y))

    model_output = model(x, y)
    expected = torch.zeros(model_output.shape + torch.Size([8, 8]))
    expected[0][0][:4, :4] = 2.0 * torch.eye(4)
    expected[0][1][:4, :4] = 4.0 * torch.eye(4)
    expected[0][2][4:, 4:] = -2.0 * torch.eye(4)
    expected[0][3][4:, 4:] = -4.0 * torch.eye(4)
    expected[1][0][:4, :4] = 6.0 * torch.eye(4)
    expected[1][1][:4, :4] = 8.0 * torch.eye(4)
    expected[1][2][4:, 4:] = -6.0 * torch.eye(4)
    expected[1][3][4:, 4:] = -8.0 * torch.eye(4)

    assert hessian.equal(expected), "Error in Hessian values"


class SumNormsSquared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A1 = nn.Parameter(torch.randn(2, 3, dtype=F64))
        self.A2 = nn.Parameter(torch.randn(2, 3, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return x * (torch.trace(self.A1.T @ self.A1) + torch.trace(self.A2.T @ self.A2))


def test_nested_dicts_and_frozen_names_like_hesse() -> None:
    model = SumNormsSquared()
    x = torch.tensor(2.0, dtype=F64)
    d = hesse.model_hessian_dict(model, x)
    assert set(d) == {"A1", "A2"} and set(d["A1"]) == {"A1", "A2"}
    torch.testing.assert_close(d["A1"]["A1"], 4.0 * torch.eye(6, dtype=F64).reshape(2, 3, 2, 3))
    assert torch.count_nonzero(d["A1"]["A2"]) == 0
    dd = hesse.model_hessian_dict(model, x, diagonal_only=True)
    assert set(dd) == {"A1", "A2"} and all(set(v) == {k} for k, v in dd.items())
    model.A1.requires_grad_(False)
    # hesse leaves a frozen parameter out even when it is named
    d2 = hesse.model_hessian_dict(model, x, params=["A1", "A2"])
    assert set(d2) == {"A2"}
    assert hesse.model_hessian_matrix(model, x).shape == (6, 6)
    with pytest.raises(ValueError, match="unknown parameter name"):
        hesse.model_hessian_matrix(model, x, params=["A3"])


def test_old_star_args_interface_and_batches() -> None:
    model = SumNormsSquared()
    xs = torch.tensor([1.0, -0.5], dtype=F64)
    h = hesse.batch_model_hessian(model, xs)
    torch.testing.assert_close(
        h["A2"]["A2"],
        2 * xs[:, None, None, None, None] * torch.eye(6, dtype=F64).reshape(2, 3, 2, 3),
    )
    torch.testing.assert_close(hesse.model_hessian(model, xs[0])["A1"]["A1"], h["A1"]["A1"][0])
    lin = nn.Linear(3, 1).double()
    X, Y = torch.randn(5, 3, dtype=F64), torch.randn(5, 1, dtype=F64)
    Z = torch.cat([X, torch.ones(5, 1, dtype=F64)], 1)
    lh = hesse.loss_hessian(lin, nn.MSELoss(), X, target=Y)
    torch.testing.assert_close(
        lh["weight"]["bias"].reshape(3, 1), 2 / 5 * (Z.T @ Z)[:3, 3:], rtol=tol(F64), atol=tol(F64)
    )
    blh = hesse.batch_loss_hessian(lin, nn.MSELoss(), X, batch_target=Y)
    torch.testing.assert_close(blh["bias"]["bias"].reshape(5), torch.full((5,), 2.0, dtype=F64))
    M = hesse.batch_loss_hessian_matrix(lin, nn.MSELoss(), X, Y)
    torch.testing.assert_close(M, 2 * Z[:, :, None] * Z[:, None, :], rtol=tol(F64), atol=tol(F64))
    torch.testing.assert_close(
        hesse.loss_hessian_matrix(lin, nn.MSELoss(), X, Y),
        2 / 5 * Z.T @ Z,
        rtol=tol(F64),
        atol=tol(F64),
    )
    bd = hesse.batch_loss_hessian_dict(lin, nn.MSELoss(), X, Y)
    torch.testing.assert_close(bd["weight"]["weight"].reshape(5, 3, 3), M[:, :3, :3])
    assert hesse.batch_model_hessian_dict(lin, X)["weight"]["bias"].shape == (5, 1, 1, 3, 1)
    assert hesse.batch_model_hessian_matrix(lin, X).shape == (5, 1, 4, 4)
    assert set(hesse.loss_hessian_dict(lin, nn.MSELoss(), X, Y)) == {"weight", "bias"}


def test_linear_with_bias_and_diagonal_only_fixed() -> None:
    """Both hesse faults: nn.Linear with bias (ranks differ) and diagonal-only block offsets."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, Y = torch.randn(6, 3, dtype=F64), torch.randn(6, 1, dtype=F64)
    full = hesse.loss_hessian_matrix(model, nn.MSELoss(), X, Y)
    diag = hesse.loss_hessian_matrix(model, nn.MSELoss(), X, Y, diagonal_only=True)
    off = 0
    for p in model.parameters():
        s = slice(off, off + p.numel())
        torch.testing.assert_close(diag[s, s], full[s, s])
        off += p.numel()
    assert torch.count_nonzero(diag) == sum(
        int(torch.count_nonzero(full[o : o + p.numel(), o : o + p.numel()]))
        for o, p in zip(torch.tensor([0, 12, 16, 20]).tolist(), model.parameters(), strict=True)
    )


def test_sharpness_functions() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X, Y = torch.randn(6, 3, dtype=F64), torch.randn(6, 1, dtype=F64)
    H = hesse.loss_hessian_matrix(model, nn.MSELoss(), X, Y)
    torch.testing.assert_close(
        hesse.loss_sharpness(model, nn.MSELoss(), X, Y), torch.linalg.eigvalsh(H).abs().max()
    )
    Hd = hesse.loss_hessian_matrix(model, nn.MSELoss(), X, Y, diagonal_only=True)
    torch.testing.assert_close(
        hesse.loss_sharpness(model, nn.MSELoss(), X, Y, diagonal_only=True),
        torch.linalg.eigvalsh(Hd).abs().max(),
    )
    Hb = hesse.batch_loss_hessian_matrix(model, nn.MSELoss(), X, Y)
    torch.testing.assert_close(
        hesse.batch_loss_sharpness(model, nn.MSELoss(), X, Y),
        torch.linalg.eigvalsh(Hb).abs().amax(-1),
    )
    M = hesse.model_hessian_matrix(model, X[0])
    torch.testing.assert_close(
        hesse.model_sharpness(model, X[0]), torch.linalg.eigvalsh(M).abs().amax(-1)
    )
    Mb = hesse.batch_model_hessian_matrix(model, X)
    torch.testing.assert_close(
        hesse.batch_model_sharpness(model, X), torch.linalg.eigvalsh(Mb).abs().amax(-1)
    )
    torch.testing.assert_close(hesse.sharpness(H), torch.linalg.eigvalsh(H).abs().max())
