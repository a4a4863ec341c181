"""What a training-loop callback measures, shared by the framework integrations."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hessian_spectra.algorithms._literals import Which
from hessian_spectra.dense.blocks import analysed
from hessian_spectra.operators.hessian import HessianOperator
from hessian_spectra.tracking import TRACKING_TOL, CurvatureTracker

__all__ = ["Measurement", "fixed_batches", "measurement_options"]

Mode = Literal["eval", "train"]


def measurement_options(every: int, mode: str, **options: Any) -> dict[str, Any]:
    """The callbacks' checked ``every`` and ``mode``, with the rest of :class:`Measurement`'s
    options, as its keyword arguments."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    return {"mode": mode, **options}


def fixed_batches(source: Iterable[Any], num_batches: int, device: torch.device) -> list[Any]:
    """The first ``num_batches`` batches of ``source``, copied to ``device`` and kept fixed.

    Reading a shuffling DataLoader draws from torch's global RNG (its sampler's seed);
    the draw is undone, so the training run sees the same random stream as without it.
    """
    with torch.random.fork_rng(devices=[]):
        batches = list(itertools.islice(iter(source), num_batches))
    if not batches:
        raise ValueError("the measurement data is empty: pass data= or a non-empty dataloader")
    return [_to(b, device) for b in batches]


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.detach().to(device).clone()
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class Measurement:
    """Top-k Hessian eigenvalues (warm-started), optional trace and Adam's preconditioned
    sharpness, with the stability thresholds, measured on a fixed set of batches.

    Args:
        model: the module trained.
        data: the fixed measurement batches.
        loss_fn: ``(model, batch) -> loss``.
        k, which, trace_matvecs, tol, seed, check_every, bottom_k: as for
            :class:`CurvatureTracker` (``tol``: the tracking tolerance, default
            ``1e-3``, which bounds each eigenvalue's error relative to the largest).
        along_gradient: also the curvature along the measurement loss's gradient,
            ``g^T H g / g^T g`` (``curvature_gradient``; one gradient and one product).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics; the default, as
            for :func:`~hessian_spectra.loss_sharpness`) or ``"train"`` (dropout masks
            fixed per batch, BatchNorm batch statistics). The model's modes are
            restored after each measurement.
        preconditioned: also measure ``lambda_max(P^-1 H)`` for an Adam/AdamW optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        data: list[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        k: int = 1,
        which: Which = "LA",
        mode: Mode = "eval",
        trace_matvecs: int = 0,
        tol: float | None = TRACKING_TOL,
        seed: int = 0,
        preconditioned: bool = False,
        check_every: int = 10,
        bottom_k: int = 0,
        along_gradient: bool = False,
    ) -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        self.model, self.mode, self.preconditioned, self.seed = model, mode, preconditioned, seed
        self.tol, self.along_gradient = tol, bool(along_gradient)
        self.operator = HessianOperator(model, data, loss_fn, seed=seed)
        self.tracker = CurvatureTracker(  # mode=None: __call__ sets the mode around everything
            self.operator,
            k=k,
            which=which,
            trace_matvecs=trace_matvecs,
            tol=tol,
            seed=seed,
            mode=None,
            check_every=check_every,
            bottom_k=bottom_k,
            preconditioned=preconditioned,
        )

    def __call__(
        self, step: int, optimizer: torch.optim.Optimizer | None = None, loss: float | None = None
    ) -> dict[str, float]:
        """Measure now; returns the metrics (``lambda_1`` ..., ``trace``, thresholds)."""
        with analysed(self.model, eval_mode=self.mode == "eval"), self.operator.keep_graphs():
            directions = {"gradient": self._gradient()} if self.along_gradient else None
            rec = self.tracker.measure(step, loss=loss, optimizer=optimizer, directions=directions)
            out: dict[str, float] = {}
            errors = rec.error_estimates or rec.residuals
            pairs = zip(rec.eigenvalues, rec.residuals, errors, strict=True)
            for i, (lam, res, err) in enumerate(pairs):
                out[f"lambda_{i + 1}"] = lam
                out[f"residual_{i + 1}"] = res
                out[f"error_{i + 1}"] = err
            if rec.trace is not None:
                out["trace"] = rec.trace
                out["trace_stderr"] = float(rec.trace_stderr or 0.0)
            out["products"] = float(rec.num_matvecs)
            out["converged"] = float(rec.converged)
            out.update(rec.extra)  # loss, lr and the thresholds
            out["seconds"] = rec.seconds
        rec.extra.update(out)
        return out

    def _gradient(self) -> Tensor:
        """The measurement loss's gradient (flat, over the operator's parameters), in the
        mode of the measurement, with the operator's batch weights; the model's ``.grad``
        is not touched."""
        op = self.operator
        total: Tensor | None = None
        with op._guard() as snap:  # buffers, RNG and flags as they were afterwards
            for wb in op._each_batch(snap):
                with op._rng(wb.index):
                    loss = op.loss_fn(self.model, wb.batch) * wb.weight
                grads = torch.autograd.grad(loss, op.params, allow_unused=True)
                flat = torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).reshape(-1)
                        for p, g in zip(op.params, grads, strict=True)
                    ]
                )
                total = flat if total is None else total + flat
        assert total is not None
        return total.detach()
