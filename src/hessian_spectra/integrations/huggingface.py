"""A ``transformers.TrainerCallback`` that measures curvature during training.

Attach it to a ``Trainer`` with :meth:`CurvatureCallback.attach` (it then runs before
the logging integrations, so TensorBoard, W&B, CSV and ``state.log_history`` receive the
``curvature/...`` keys at the steps it measures)::

    trainer = Trainer(model=model, args=args, train_dataset=train)
    cb = CurvatureCallback(every=50, k=2, preconditioned=True).attach(trainer)
    trainer.train()
    cb.history            # one CurvatureRecord per measurement (metrics in .extra)
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
        from transformers import TrainerCallback
    except ImportError as err:  # pragma: no cover - the hf extra is installed in CI
        raise ImportError(
            "CurvatureCallback needs transformers: pip install 'hessian-spectra[hf]'"
        ) from err
    return TrainerCallback


class CurvatureCallback(_base()):  # type: ignore[misc]
    """Measure the Hessian's top eigenvalues (and more) every ``every`` optimizer steps.

    Args:
        every: measure when ``state.global_step % every == 0`` (after the step).
        k, which, trace_matvecs, tol, seed, check_every, bottom_k, along_gradient, mode,
            preconditioned: see
            :class:`~hessian_spectra.integrations._measure.Measurement`.
        data: the fixed measurement batches; default the first ``num_batches``
            batches of the trainer's training dataloader, read once at the start
            (without touching the random stream training uses).
        num_batches: how many training batches to keep when ``data`` is not given.
        loss_fn: ``(model, batch) -> loss``; default ``model(**batch).loss``
            (:func:`~hessian_spectra.hf_lm_loss`).
        prefix: of the logged keys (``curvature/lambda_1``, ``curvature/threshold``, ...).
        plot: a PNG path: at the end of training, :func:`~hessian_spectra.plots.plot_tracking`
            of the history (sharpness, threshold, loss) is written there.

    Attributes:
        history: the :class:`~hessian_spectra.CurvatureRecord` of every measurement,
            its metrics in ``extra``; ``tracker.save(path)`` writes them.
    """

    def __init__(
        self,
        *,
        every: int = 100,
        k: int = 1,
        which: Which = "LA",
        data: list[Any] | None = None,
        num_batches: int = 4,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
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
        self.every, self.data, self.num_batches, self.loss_fn = every, data, num_batches, loss_fn
        self.prefix, self.plot = prefix, plot
        self.measurement: Measurement | None = None
        self._pending: dict[str, float] = {}

    def attach(self, trainer: Any) -> CurvatureCallback:
        """Add this callback to ``trainer`` ahead of its logging integrations."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    @property
    def history(self) -> list[Any]:
        return [] if self.measurement is None else self.measurement.tracker.history

    @property
    def tracker(self) -> Any:
        return None if self.measurement is None else self.measurement.tracker

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("CurvatureCallback needs the trainer's model at on_train_begin")
        device = next(model.parameters()).device
        data = self.data
        if data is None:
            loader = kwargs.get("train_dataloader")
            if loader is None:
                raise ValueError("pass data= (the measurement batches): no train_dataloader")
            data = fixed_batches(loader, self.num_batches, device)
        loss_fn = self.loss_fn
        if loss_fn is None:
            from hessian_spectra.losses.huggingface import hf_lm_loss

            loss_fn = hf_lm_loss()
        self.measurement = Measurement(model, data, loss_fn, **self.options)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.measurement is None or state.global_step % self.every:
            return control
        metrics = self.measurement(state.global_step, kwargs.get("optimizer"))
        self._pending = {self.prefix + key: value for key, value in metrics.items()}
        control.should_log = True  # the trainer logs at this step; on_log adds the metrics
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.plot and self.history:
            from hessian_spectra.plots import plot_tracking

            plot_tracking(self.history, self.plot)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self._pending:
            return
        if logs is not None:
            if "loss" in logs and self.history:  # the training loss the trainer logs now
                self.history[-1].extra["loss"] = float(logs["loss"])
            logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}
