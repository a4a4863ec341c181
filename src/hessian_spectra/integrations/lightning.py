"""A ``lightning.Callback`` that measures curvature during training.

::

    cb = CurvatureCallback(data=fixed_batches, loss_fn=loss_fn, every=50)
    trainer = lightning.Trainer(callbacks=[cb], logger=CSVLogger("logs"))
    trainer.fit(module, train_loader)

The metrics go through ``pl_module.log_dict`` (so every Lightning logger receives the
``curvature/...`` keys) and into :attr:`CurvatureCallback.history`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from hessian_spectra.algorithms._literals import Which
from hessian_spectra.integrations._measure import (
    Measurement,
    Mode,
    fixed_batches,
    measurement_options,
)
from hessian_spectra.tracking import TRACKING_TOL

__all__ = ["CurvatureCallback"]


def _base() -> type:
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError as err:  # pragma: no cover - the lightning extra is installed in CI
        raise ImportError(
            "this CurvatureCallback needs lightning: pip install 'hessian-spectra[lightning]'"
        ) from err
    return Callback


class CurvatureCallback(_base()):  # type: ignore[misc]
    """Measure the Hessian's top eigenvalues (and more) every ``every`` optimizer steps.

    Args:
        loss_fn: ``(model, batch) -> loss`` of the ``LightningModule`` on a batch (the
            loss ``training_step`` minimises, without its logging).
        data: the fixed measurement batches; default the first ``num_batches``
            batches of the training dataloader, read at the start of training
            (without touching the random stream training uses).
        every, k, which, trace_matvecs, tol, seed, check_every, bottom_k, along_gradient, mode,
            preconditioned, prefix, plot:
            as for :class:`hessian_spectra.integrations.huggingface.CurvatureCallback`.
    """

    def __init__(
        self,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        every: int = 100,
        k: int = 1,
        which: Which = "LA",
        data: list[Any] | None = None,
        num_batches: int = 4,
        mode: Mode = "eval",
        trace_matvecs: int = 0,
        tol: float | None = TRACKING_TOL,
        seed: int = 0,
        check_every: int = 10,
        bottom_k: int = 0,
        along_gradient: bool = False,
        preconditioned: bool = False,
        prefix: str = "curvature/",
        plot: str | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a callable (model, batch) -> loss, got {type(loss_fn).__name__}"
            )
        self.options = measurement_options(
            every,
            mode,
            k=k,
            which=which,
            trace_matvecs=trace_matvecs,
            tol=tol,
            seed=seed,
            check_every=check_every,
            bottom_k=bottom_k,
            along_gradient=along_gradient,
            preconditioned=preconditioned,
        )
        self.loss_fn, self.every, self.data, self.num_batches = loss_fn, every, data, num_batches
        self.prefix, self.plot = prefix, plot
        self.measurement: Measurement | None = None

    @property
    def history(self) -> list[Any]:
        return [] if self.measurement is None else self.measurement.tracker.history

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        data = self.data
        if data is None:
            data = fixed_batches(trainer.train_dataloader, self.num_batches, pl_module.device)
        self.measurement = Measurement(pl_module, data, self.loss_fn, **self.options)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.plot and self.history:
            from hessian_spectra.plots import plot_tracking

            plot_tracking(self.history, self.plot)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.measurement is None or step % self.every:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, Tensor) else None
        metrics = self.measurement(step, optimizer, value)
        pl_module.log_dict(
            {self.prefix + key: value for key, value in metrics.items()},
            on_step=True,
            on_epoch=False,
        )
