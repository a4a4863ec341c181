"""Training-loop callbacks, run for real: a tiny GPT-2 in a HuggingFace ``Trainer`` and a tiny
``LightningModule`` in ``lightning.Trainer`` (CPU). The values reach the framework's logs,
match dense float64 Hessians of the final model, and training is the same bit for bit with
and without the callback."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

D = torch.float64


def _dense_top(model: nn.Module, data: list, loss_fn) -> torch.Tensor:
    """Eigenvalues (descending) of the dense float64 Hessian of the mean loss over ``data``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names]).to(D)

    def loss(theta):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        total = 0
        for b in data:
            total = total + torch.func.functional_call(model, ps, (b,), strict=False)
        return total / len(data)

    del loss_fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernels have no double backward
        H = torch.func.jacrev(torch.func.grad(loss))(flat)
    return torch.linalg.eigvalsh((H + H.T) / 2).flip(0)


# -- HuggingFace Trainer ----------------------------------------------------------------------


def _hf_run(tmp_path: Path, callback: bool):
    transformers = pytest.importorskip("transformers")
    from hessian_spectra.integrations.huggingface import CurvatureCallback

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(D)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (12, 8), generator=g)
    train = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("cb" if callback else "plain")), max_steps=4,
        per_device_train_batch_size=4, learning_rate=0.05, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    cb = None
    if callback:
        cb = CurvatureCallback(
            every=2, k=2, num_batches=2, preconditioned=True, plot=str(tmp_path / "curv.png")
        ).attach(trainer)
    trainer.train()
    return trainer, model, cb


def test_hf_trainer_callback_logs_right_values_and_changes_nothing(tmp_path):
    trainer, model, cb = _hf_run(tmp_path, callback=True)
    plain, plain_model, _ = _hf_run(tmp_path, callback=False)
    # the same training run, bit for bit: the callback consumed no randomness, changed no state
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in plain.state.log_history if "loss" in h]
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)
    # measured at steps 2 and 4, and the values reached the trainer's log
    assert [r.step for r in cb.history] == [2, 4]
    logged = [h for h in trainer.state.log_history if "curvature/lambda_1" in h]
    assert [h["step"] for h in logged] == [2, 4]
    last = cb.history[-1]
    assert logged[-1]["curvature/lambda_1"] == last.eigenvalues[0] and last.converged
    assert (
        logged[-1]["curvature/error_2"]
        == last.error_estimates[1]
        <= logged[-1]["curvature/residual_2"]
    )
    assert last.extra["loss"] == logged[-1]["loss"]
    lr = logged[0]["curvature/lr"]  # at step 2 (the linear schedule reaches 0 at step 4)
    assert logged[0]["curvature/threshold_gd"] == pytest.approx(2 / lr)
    assert logged[0]["curvature/threshold"] == pytest.approx((2 + 2 * 0.9) / (0.1 * lr))
    assert "curvature/preconditioned_lambda_1" in logged[-1]
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "curv.png").shape[:2] == (400, 700)  # the plot
    # against the dense float64 Hessian of the final model on the measurement batches (eval)
    data = cb.measurement.operator.batches
    batches = [wb.batch for wb in data]
    model.eval()
    top = _dense_top(lambda_model(model), [b["input_ids"] for b in batches], None)
    # within the tracking tolerance: each eigenvalue's error at most 1e-3 of the largest
    # |eigenvalue| (the record's error estimates met it; its residuals may not: the error
    # falls with their square)
    got = torch.tensor(last.eigenvalues, dtype=D)
    scale = float(top.abs().max())
    assert max(last.error_estimates) <= 1e-3 * scale
    assert bool(((got - top[:2]).abs() <= 1e-3 * scale).all())


class lambda_model(nn.Module):  # noqa: N801 - a loss as a module, for functional_call
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, labels=ids).loss


# -- Lightning ----------------------------------------------------------------------------------


def _pl_run(tmp_path: Path, callback: bool):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from hessian_spectra.integrations.lightning import CurvatureCallback

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.2), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    module = Classifier().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 5, generator=g, dtype=D), torch.randint(0, 3, (64,), generator=g)
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=16, shuffle=True)
    cbs = []
    if callback:
        cbs.append(
            CurvatureCallback(
                lambda m, b: F.cross_entropy(m(b[0]), b[1]), every=2, k=2, num_batches=2
            )
        )
    trainer = L.Trainer(
        max_steps=6, callbacks=cbs, logger=CSVLogger(str(tmp_path / str(callback))),
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer, module, (cbs[0] if cbs else None)


def test_lightning_callback_logs_right_values_and_changes_nothing(tmp_path):
    trainer, module, cb = _pl_run(tmp_path, callback=True)
    _, plain, _ = _pl_run(tmp_path, callback=False)
    for p, q in zip(module.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)  # the same trajectory, dropout and shuffling included
    assert [r.step for r in cb.history] == [2, 4, 6]
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("curvature/lambda_1")]
    values = sorted({float(r["curvature/lambda_1"]) for r in logged})
    assert values == pytest.approx(sorted(r.eigenvalues[0] for r in cb.history))
    assert float(logged[-1]["curvature/threshold"]) == pytest.approx((2 + 2 * 0.9) / (0.1 * 0.1))
    batches = [wb.batch for wb in cb.measurement.operator.batches]

    class Loss(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, b):
            return F.cross_entropy(self.net(b[0]), b[1])

    module.eval()
    top = _dense_top(Loss(module.net), batches, None)
    # within the tracking tolerance (an eigenvalue error of 1e-3 of the largest |eigenvalue|)
    got = torch.tensor(cb.history[-1].eigenvalues, dtype=D)
    assert cb.history[-1].tol == 1e-3
    assert bool(((got - top[:2]).abs() <= 1e-3 * top.abs().max()).all())
