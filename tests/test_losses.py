"""Loss helpers: closed-form output Hessians against autograd in float64, MC Fisher expectations."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra.losses import (
    LossCurvatureWarning,
    LossOfOutput,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
)
from reference import tol

D = torch.float64
G = torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=G, dtype=D)


def _labels(C, *shape, ignore=None):
    y = torch.randint(0, C, shape, generator=G)
    if ignore is not None:
        y.view(-1)[::3] = ignore
    return y


W = torch.rand(4, generator=G, dtype=D) + 0.5
CASES = {
    "ce": (F.cross_entropy, (6, 4), lambda: _labels(4, 6)),
    "ce_module_ignore": (nn.CrossEntropyLoss(ignore_index=1), (6, 4), lambda: _labels(4, 6)),
    "ce_sum_ignore": (
        functools.partial(F.cross_entropy, reduction="sum", ignore_index=-100),
        (6, 4),
        lambda: _labels(4, 6, ignore=-100),
    ),
    "ce_weight_smoothing": (
        functools.partial(F.cross_entropy, weight=W, label_smoothing=0.2, ignore_index=-100),
        (6, 4),
        lambda: _labels(4, 6, ignore=-100),
    ),
    "ce_module_weight": (nn.CrossEntropyLoss(weight=W), (6, 4), lambda: _labels(4, 6)),
    "ce_spatial": (F.cross_entropy, (3, 4, 5), lambda: _labels(4, 3, 5, ignore=-100)),
    "ce_probs": (
        functools.partial(F.cross_entropy, label_smoothing=0.1),
        (5, 4),
        lambda: torch.softmax(_randn(5, 4), -1),
    ),
    "ce_unbatched": (F.cross_entropy, (4,), lambda: torch.tensor(2)),
    "mse": (F.mse_loss, (5, 3), lambda: _randn(5, 3)),
    "mse_module_sum": (nn.MSELoss(reduction="sum"), (5, 3), lambda: _randn(5, 3)),
    "bce": (
        F.binary_cross_entropy_with_logits,
        (5, 3),
        lambda: torch.rand(5, 3, generator=G, dtype=D),
    ),
    "bce_module_weights": (
        nn.BCEWithLogitsLoss(
            weight=torch.rand(3, generator=G, dtype=D),
            pos_weight=torch.rand(3, generator=G, dtype=D) + 0.5,
        ),
        (5, 3),
        lambda: (torch.rand(5, 3, generator=G) > 0.5).to(D),
    ),
    "bce_sum": (
        functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"),
        (4, 2),
        lambda: torch.rand(4, 2, generator=G, dtype=D),
    ),
}


def _autograd_hvp(loss, out, batch, U):
    H = torch.func.hessian(lambda o: loss(o, batch))(out).reshape(out.numel(), out.numel())
    return (U.reshape(U.shape[0], -1) @ H.T).reshape(U.shape)


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_hvp_matches_autograd(name):
    crit, shape, target = CASES[name]
    loss = supervised_loss_of_output(crit)
    out, batch = _randn(*shape), (None, target())
    U = _randn(3, *shape)
    assert hasattr(loss, "hvp") and hasattr(loss, "mc_fisher_hvp")
    got = loss.hvp(out, batch, U)
    want = _autograd_hvp(loss, out, batch, U)
    assert got.shape == U.shape
    torch.testing.assert_close(got, want, rtol=tol(D), atol=tol(D) * want.abs().max().item())
    # the loss itself is the criterion's
    torch.testing.assert_close(loss(out, batch), crit(out, batch[1]))


def test_nll_on_log_probabilities_has_zero_hessian_and_warns():
    with pytest.warns(LossCurvatureWarning, match="linear in the log-probabilities"):
        loss = supervised_loss_of_output(F.nll_loss)
    out = torch.log_softmax(_randn(5, 3), -1)
    batch = (None, _labels(3, 5))
    U = _randn(2, 5, 3)
    want = _autograd_hvp(loss, out, batch, U)
    assert torch.count_nonzero(want) == 0
    assert torch.count_nonzero(loss.hvp(out, batch, U)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    loss = supervised_loss_of_output(F.cross_entropy)
    out, y = _randn(6, 5), _labels(5, 6)
    U = _randn(2, 6, 5)
    got = loss.hvp(out.to(dtype), (None, y), U.to(dtype))
    assert got.dtype == dtype
    want = loss.hvp(out.to(dtype).double(), (None, y), U.to(dtype).double())
    torch.testing.assert_close(
        got.double(), want, rtol=0, atol=tol(dtype) * want.abs().max().item()
    )


@pytest.mark.parametrize(
    "name", ["ce", "ce_spatial", "ce_weight_smoothing", "bce_module_weights", "mse"]
)
def test_mc_fisher_hvp_is_unbiased(name):
    """The mean of single-draw estimates is within 5 standard errors of the closed-form Hessian."""
    crit, shape, target = CASES[name]
    loss = supervised_loss_of_output(crit)
    out, batch = _randn(*shape), (None, target())
    U = _randn(2, *shape)
    draws = torch.stack(
        [
            loss.mc_fisher_hvp(
                out, batch, U, generator=torch.Generator().manual_seed(s), mc_samples=1
            )
            for s in range(400)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / 400**0.5
    exact = loss.hvp(out, batch, U)
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all()
    # several samples per call average them
    many = loss.mc_fisher_hvp(
        out, batch, U, generator=torch.Generator().manual_seed(0), mc_samples=4000
    )
    assert ((many - exact).abs() <= 5 * draws.std(0) / 4000**0.5 + 1e-12).all()


def test_mc_fisher_hvp_is_deterministic_for_a_generator_seed():
    loss = supervised_loss_of_output(F.cross_entropy)
    out, batch, U = _randn(4, 3), (None, _labels(3, 4)), _randn(2, 4, 3)
    a = loss.mc_fisher_hvp(out, batch, U, generator=torch.Generator().manual_seed(5))
    b = loss.mc_fisher_hvp(out, batch, U, generator=torch.Generator().manual_seed(5))
    c = loss.mc_fisher_hvp(out, batch, U, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_criterion_has_no_closed_form():
    def my_loss(o, y):
        return ((o - y) ** 4).mean()

    loss = supervised_loss_of_output(my_loss)
    assert not hasattr(loss, "hvp")

    class MyCE(nn.CrossEntropyLoss):  # a subclass may change forward: no closed form
        pass

    assert not hasattr(supervised_loss_of_output(MyCE()), "hvp")
    # partial with an unknown keyword: no closed form either
    assert not hasattr(
        supervised_loss_of_output(functools.partial(F.mse_loss, size_average=True)), "hvp"
    )


def test_supervised_loss_and_forward():
    model = nn.Linear(3, 2).double()
    x, y = _randn(4, 3), _labels(2, 4)
    torch.testing.assert_close(
        supervised_loss(F.cross_entropy)(model, (x, y)), F.cross_entropy(model(x), y)
    )
    torch.testing.assert_close(supervised_forward()(model, [x, y]), model(x))


@pytest.mark.parametrize(
    "crit,target",
    [
        (F.cross_entropy, lambda: _labels(3, 6)),
        (nn.MSELoss(), lambda: _randn(6, 3)),
        (F.binary_cross_entropy_with_logits, lambda: torch.rand(6, 3, generator=G, dtype=D)),
        (lambda o, y: ((o - y) ** 2).mean(), lambda: _randn(6, 3)),
    ],
)
def test_per_sample_losses_average_to_the_batch_loss(crit, target):
    model = nn.Linear(4, 3).double()
    batch = (_randn(6, 4), target())
    per = supervised_per_sample_loss(crit)(model, batch)
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), supervised_loss(crit)(model, batch))


def test_per_sample_sequence_loss_averages_each_sample_over_its_valid_positions():
    out = _randn(2, 3, 4)  # (N, C, T)
    y = torch.tensor([[0, 1, -100, 2], [1, 1, 1, 1]])
    per = supervised_per_sample_loss(F.cross_entropy)(lambda x: x, (out, y))
    for i in range(2):
        torch.testing.assert_close(per[i], F.cross_entropy(out[i : i + 1], y[i : i + 1]))


def test_errors():
    with pytest.raises(TypeError, match="criterion must be a loss callable"):
        supervised_loss(3)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        supervised_loss_of_output(nn.MSELoss(reduction="none"))
    with pytest.raises(TypeError, match=r"expect \(inputs, targets\) batches"):
        supervised_loss(F.mse_loss)(nn.Linear(2, 1), {"x": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="must return a scalar loss"):
        supervised_loss(functools.partial(F.mse_loss, reduction="none"))(
            nn.Linear(2, 1), (torch.zeros(3, 2), torch.zeros(3, 1))
        )
    with pytest.raises(TypeError, match="fn must be callable"):
        LossOfOutput(None)
    with pytest.raises(TypeError, match="hvp must be callable"):
        LossOfOutput(lambda o, b: o.sum(), hvp=1)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        from hessian_spectra.losses import mse_hvp

        mse_hvp(torch.zeros(2), torch.zeros(2), torch.zeros(2), reduction="none")


def test_loss_of_output_wrapper():
    loss = LossOfOutput(lambda o, b: (o**2).sum(), hvp=lambda o, b, U: 2 * U, name="square")
    assert "square" in repr(loss) and "hvp" in repr(loss)
    torch.testing.assert_close(loss(torch.ones(3), None), torch.tensor(3.0))
