"""Curvature during training, warm-started from the previous eigenvectors.

Between two nearby training steps the top eigenvectors move little, so each
measurement starts from the last Ritz vectors: the ``k`` wanted ones and
:data:`WARM_EXTRA` more, whose span holds the neighbours that cross the wanted
pairs. Two choices make a measurement cheaper than a verified cold start, both
stated in every record:

* the **tracking tolerance** ``tol`` (default :data:`TRACKING_TOL` = ``1e-3``) bounds
  each **eigenvalue's error** by ``tol * max |lambda|``, what a plot of sharpness
  against step needs (it cannot show 0.1%). A warm measurement stops on the
  Kato-Temple estimate ``min(r, r^2 / gap)`` (``r`` the residual, ``gap`` the distance
  to the neighbouring Ritz values less their residuals; records carry it as
  ``error_estimates``): the error falls with the square of the residual, so it
  stops long before the residual itself reaches ``tol``;
* the **multiplicity check** (a fresh random start that looks for an eigenvalue the
  search missed) runs at the first measurement and every ``check_every``-th one,
  through a verified :func:`lanczos` whose residuals meet ``tol``; in between, the
  warm block is trusted to hold the wanted pairs' neighbourhood (the gap of the
  estimate is taken from it, which makes it a bound once those neighbours have
  converged). A refinement that misses ``tol`` within its budget falls
  back to the verified run (``checked=True``).

``python bench/tracking.py`` measures the products of warm and cold measurements
on the edge-of-stability run (``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import json
import time
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from hessian_spectra.algorithms._codec import FORMAT, Serializable, _read
from hessian_spectra.algorithms._common import default_tol
from hessian_spectra.algorithms._literals import Which
from hessian_spectra.algorithms._refine import refine
from hessian_spectra.algorithms.lanczos import lanczos
from hessian_spectra.algorithms.results import EigenResult
from hessian_spectra.algorithms.trace import trace
from hessian_spectra.dense.blocks import analysed
from hessian_spectra.operators.base import CurvatureOperator
from hessian_spectra.operators.preconditioned import (
    PreconditionedOperator,
    adam_preconditioner,
    stability_threshold,
)

__all__ = ["TRACKING_TOL", "WARM_EXTRA", "CurvatureRecord", "CurvatureTracker"]

TRACKING_TOL = 1e-3
"""The tracker's default tolerance: every eigenvalue's error at most
``1e-3 * max |lambda|`` (by its residual, or by the Kato-Temple estimate
``r^2 / gap`` of a warm refinement)."""

WARM_EXTRA = 3
"""Ritz vectors kept beyond the ``k`` wanted ones for the next warm start: the
neighbours that cross the wanted pairs (at the edge of stability the top eigenvalues
lie within a few percent and trade places) stay in the warm block."""


@dataclass(frozen=True)
class CurvatureRecord(Serializable):
    """One measurement: the step, eigenvalues with true residuals, optional trace.

    ``to_dict``/``from_dict`` and ``save``/``load`` as for the algorithms' results.
    """

    step: int
    eigenvalues: list[float]
    residuals: list[float]
    converged: bool
    num_matvecs: int
    seconds: float
    warm_started: bool
    trace: float | None = None
    trace_stderr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tol: float | None = None
    checked: bool = True
    error_estimates: list[float] | None = None


def _fits(vectors: Tensor | None, op: CurvatureOperator) -> Tensor | None:
    """``vectors`` as a warm start for ``op``, or ``None`` when they no longer fit it."""
    if vectors is None or vectors.shape[-1] != op.vector_length or vectors.device != op.device:
        return None
    return vectors


def _training_state(
    loss: float | Tensor | None, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """The loss, learning rate and stability thresholds at a measurement (plain floats)."""
    out: dict[str, Any] = {}
    if loss is not None:
        out["loss"] = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
    if optimizer is not None:
        group = optimizer.param_groups[0]
        lr = float(group["lr"])
        out["lr"] = lr
        if lr > 0:  # a schedule at its end has lr 0: no finite threshold
            betas = group.get("betas")
            beta1 = betas[0] if betas is not None else (group.get("momentum") or None)
            out["threshold"] = stability_threshold(lr, beta1)
            out["threshold_gd"] = stability_threshold(lr)
    return out


class CurvatureTracker:
    """Track top eigenvalues (and optionally the trace) of an operator over training.

    Args:
        operator: a curvature operator whose products read the model's current
            parameters (e.g. :class:`HessianOperator`), or a zero-argument
            callable returning one (built anew at each measurement).
        k: number of eigenpairs.
        which: ``"LA"`` (sharpness, default), ``"SA"`` or ``"LM"``.
        every: measure when ``step % every == 0`` in :meth:`maybe_measure`.
        trace_matvecs: Hutch++ products for the trace (0: no trace).
        tol: tracking tolerance: each eigenvalue's error at most ``tol * max |lambda|``
            (default :data:`TRACKING_TOL` = ``1e-3``; ``None``: the operator dtype's
            Lanczos default, ``1e-5`` in float32). Checked measurements meet it with
            their residuals, warm ones with the Kato-Temple estimate ``r^2 / gap``
            (records: ``error_estimates``).
        check_every: run Lanczos' multiplicity check (a random start looking for a
            missed eigenvalue) at the first measurement and every ``check_every``-th
            one (``1``: at every measurement, as a cold start does); the other
            measurements trust their warm start. Recorded as ``checked``.
        seed: base seed; measurement ``i`` uses ``seed + i``.
        bottom_k: also the ``bottom_k`` smallest eigenvalues (``extra["bottom"]``),
            warm-started like the top ones.
        ggn: also the top eigenvalue of this operator (e.g. the model's
            :class:`GGNOperator`, or a factory), in ``extra["ggn_lambda_1"]``.
        mode: ``"eval"`` (the default, as for the training-loop callbacks and
            :func:`~hessian_spectra.loss_sharpness`: dropout off, BatchNorm running
            statistics) or ``"train"`` (dropout masks fixed per batch, BatchNorm batch
            statistics) for an operator over a model; the model's modes are restored
            after each measurement. ``None``: the model's mode as it is.
        preconditioned: also Adam's preconditioned sharpness ``lambda_max(P^-1 H)``
            (``extra["preconditioned_lambda_1"]``) at measurements given an Adam or
            AdamW ``optimizer`` (``P`` read from its state by
            :func:`~hessian_spectra.adam_preconditioner`), warm-started and checked
            like the top eigenvalues; its threshold is ``extra["threshold"]``.

    Example:
        A least-squares model, whose Hessian ``2/N XᵀX`` training does not change:

        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> from hessian_spectra.operators.hessian import HessianOperator
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> X = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
        >>> data = [(X, torch.ones(3, 1, dtype=torch.float64))]
        >>> loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> H = HessianOperator(model, data, loss)
        >>> tracker = CurvatureTracker(H, k=2, every=2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for step in range(5):
        ...     opt.zero_grad(); loss(model, data[0]).backward(); opt.step()
        ...     _ = tracker.maybe_measure(step)
        >>> [r.step for r in tracker.history], [round(x, 6) for x in tracker.history[-1].eigenvalues]
        ([0, 2, 4], [6.0, 2.666667])
        >>> path = tracker.save(os.path.join(tempfile.mkdtemp(), "curvature.json"))
    """

    def __init__(
        self,
        operator: CurvatureOperator | Callable[[], CurvatureOperator],
        *,
        k: int = 1,
        which: Which = "LA",
        every: int = 1,
        trace_matvecs: int = 0,
        tol: float | None = TRACKING_TOL,
        seed: int = 0,
        mode: Literal["eval", "train"] | None = "eval",
        bottom_k: int = 0,
        ggn: CurvatureOperator | Callable[[], CurvatureOperator] | None = None,
        check_every: int = 10,
        preconditioned: bool = False,
    ) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if isinstance(bottom_k, bool) or not isinstance(bottom_k, int) or bottom_k < 0:
            raise ValueError(f"bottom_k must be an int >= 0, got {bottom_k!r}")
        if ggn is not None and not isinstance(ggn, CurvatureOperator) and not callable(ggn):
            raise TypeError(
                f"ggn must be a CurvatureOperator or a callable returning one, got {type(ggn).__name__}"
            )
        if mode not in ("eval", "train", None):
            raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
        if not isinstance(operator, CurvatureOperator) and not callable(operator):
            raise TypeError(
                f"operator must be a CurvatureOperator or a callable returning one, got {type(operator).__name__}"
            )
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if trace_matvecs < 0:
            raise ValueError(f"trace_matvecs must be >= 0, got {trace_matvecs}")
        self._operator = operator
        self.k, self.which, self.every = k, which, every
        self.trace_matvecs, self.tol, self.seed = trace_matvecs, tol, seed
        self.mode, self.bottom_k, self.ggn = mode, bottom_k, ggn
        self.check_every = check_every
        self.preconditioned = bool(preconditioned)
        self.history: list[CurvatureRecord] = []
        self._bottom: Tensor | None = None  # warm starts of the bottom pairs and the GGN's top
        self._ggn_vector: Tensor | None = None
        self._pre_vectors: Tensor | None = None
        self._warned_preconditioner = False
        self._vectors: Tensor | None = None

    def _op(self) -> CurvatureOperator:
        if isinstance(self._operator, CurvatureOperator):
            return self._operator
        op = self._operator()
        if not isinstance(op, CurvatureOperator):
            raise TypeError(
                f"the operator factory returned {type(op).__name__}, not a CurvatureOperator"
            )
        return op

    def measure(
        self,
        step: int | None = None,
        *,
        loss: float | Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        directions: Mapping[str, Tensor] | None = None,
    ) -> CurvatureRecord:
        """Measure now (warm-started when a previous measurement exists).

        ``directions`` (name to a flat ``(n,)`` vector, e.g. the gradient and the last
        update, :func:`~hessian_spectra.params_to_vector` of per-parameter tensors) adds
        the curvature along each, :math:`d^T H d / d^T d`, as ``extra["curvature_<name>"]``
        (one product each, together in one block).

        ``loss`` (the training loss at this step) and ``optimizer`` (its learning rate and
        momentum give the stability thresholds) are recorded in the record's ``extra``:
        ``loss``, ``lr``, ``threshold`` (``2/lr``, or ``(2 + 2β₁)/((1 − β₁) lr)`` with
        momentum or Adam's ``β₁``) and ``threshold_gd`` (``2/lr``).
        """
        op = self._op()
        model = getattr(op, "model", None)
        with contextlib.ExitStack() as stack:
            if self.mode is not None and isinstance(model, torch.nn.Module):
                stack.enter_context(analysed(model, eval_mode=self.mode == "eval"))
            stack.enter_context(op.keep_graphs())  # one set of graphs for the whole measurement
            return self._measure(op, step, loss, optimizer, directions)

    def _measure(
        self,
        op: CurvatureOperator,
        step: int | None,
        loss: float | Tensor | None,
        optimizer: torch.optim.Optimizer | None,
        directions: Mapping[str, Tensor] | None = None,
    ) -> CurvatureRecord:
        i = len(self.history)
        step = i if step is None else int(step)
        t0 = time.perf_counter()
        warm = _fits(self._vectors, op) is not None
        check = not warm or i % self.check_every == 0
        res, checked = self._warm_run(op, "_vectors", self.k, self.which, i, check)
        tr_est = tr_se = None
        nmv = res.num_matvecs
        if self.trace_matvecs:
            tr = trace(op, num_matvecs=self.trace_matvecs, method="hutch++", seed=self.seed + i)
            tr_est, tr_se, nmv = tr.estimate, tr.stderr, nmv + tr.num_matvecs
        extra = _training_state(loss, optimizer)
        if self.bottom_k:
            bot, _ = self._warm_run(op, "_bottom", self.bottom_k, "SA", i, check)
            extra["bottom"], nmv = bot.eigenvalues.tolist(), nmv + bot.num_matvecs
        if self.ggn is not None:
            g_op = self.ggn if isinstance(self.ggn, CurvatureOperator) else self.ggn()
            top, _ = self._warm_run(g_op, "_ggn_vector", 1, "LA", i, check)
            extra["ggn_lambda_1"], nmv = float(top.eigenvalues[0]), nmv + top.num_matvecs
        group = optimizer.param_groups[0] if optimizer is not None else None
        adam_like = group is not None and group.get("betas") is not None
        if self.preconditioned and not adam_like and not self._warned_preconditioner:
            self._warned_preconditioner = True
            got = "no optimizer" if optimizer is None else type(optimizer).__name__
            warnings.warn(
                f"CurvatureTracker(preconditioned=True): measured with {got}, so there is no "
                "preconditioned sharpness to record; pass the Adam/AdamW optimizer to "
                "measure(..., optimizer=opt) or maybe_measure(step, optimizer=opt)",
                stacklevel=3,
            )
        if self.preconditioned and adam_like:
            params = getattr(op, "params", None)
            if params is None:
                raise TypeError(
                    "preconditioned=True needs an operator with .params (e.g. HessianOperator) "
                    f"to read the optimizer's state for; got {type(op).__name__}"
                )
            assert optimizer is not None
            pre_op = PreconditionedOperator(op, adam_preconditioner(optimizer, params))
            pre, _ = self._warm_run(pre_op, "_pre_vectors", 1, "LA", i, check)
            extra["preconditioned_lambda_1"] = float(pre.eigenvalues[0])
            nmv += pre.num_matvecs
        if directions:
            names = list(directions)
            D = torch.stack(
                [directions[k].detach().reshape(-1).to(op.device, op.dtype) for k in names]
            )
            HD = op.matmat(D).double()
            D64 = D.double()
            quot = (D64 * HD).sum(1) / (D64 * D64).sum(1)
            for name, q in zip(names, quot.tolist(), strict=True):
                extra[f"curvature_{name}"] = q
            nmv += len(names)
        rec = CurvatureRecord(
            step=step,
            eigenvalues=res.eigenvalues.tolist(),
            residuals=res.residuals.tolist(),
            error_estimates=res.info.get("error_estimates", res.residuals.tolist()),
            converged=bool(res.converged),
            num_matvecs=nmv,
            seconds=time.perf_counter() - t0,
            warm_started=warm,
            trace=tr_est,
            trace_stderr=tr_se,
            extra=extra,
            tol=float(res.tol),
            checked=checked,
        )
        self.history.append(rec)
        return rec

    def _warm_run(
        self, op: CurvatureOperator, slot: str, k: int, which: Which, i: int, check: bool
    ) -> tuple[EigenResult, bool]:
        """Eigenpairs for measurement ``i`` at the tracking tolerance, from the warm block
        kept in attribute ``slot`` (which it then replaces). Returns the result and
        whether the multiplicity check ran.

        Unchecked: :func:`~hessian_spectra.algorithms._refine.refine` from the block
        (the last ``k`` + :data:`WARM_EXTRA` Ritz vectors), stopping on the eigenvalue
        error estimate. Checked, cold, or a refinement that misses ``tol`` within its
        budget: a verified :func:`lanczos` from the block."""
        init = _fits(getattr(self, slot), op)
        tol = default_tol(op.dtype) if self.tol is None else self.tol
        if init is not None and not check:
            res, block = refine(op, init, k, which, tol, keep=k + WARM_EXTRA)
            if res.converged:
                setattr(self, slot, block.detach())
                return res, False
            init = block
        res = lanczos(op, k=k, which=which, tol=tol, init=init, seed=self.seed + i)
        vectors = res.eigenvectors.detach()
        if init is not None:  # keep the block's other directions for the next refinement
            vectors = torch.cat([vectors, init.detach()[k:].to(vectors.dtype)])
        setattr(self, slot, vectors)
        return res, True

    def maybe_measure(
        self,
        step: int,
        *,
        loss: float | Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        directions: Mapping[str, Tensor] | None = None,
    ) -> CurvatureRecord | None:
        """Measure if ``step % every == 0``."""
        if step % self.every:
            return None
        return self.measure(step, loss=loss, optimizer=optimizer, directions=directions)

    def to_dict(self) -> dict[str, Any]:
        """Settings and history as plain values (:meth:`from_dict` reads them back)."""
        return {
            "type": "CurvatureTracker",
            "k": self.k,
            "which": self.which,
            "every": self.every,
            "trace_matvecs": self.trace_matvecs,
            "tol": self.tol,
            "seed": self.seed,
            "mode": self.mode,
            "bottom_k": self.bottom_k,
            "check_every": self.check_every,
            "preconditioned": self.preconditioned,
            "history": [r.to_dict() for r in self.history],
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        operator: CurvatureOperator | Callable[[], CurvatureOperator],
    ) -> CurvatureTracker:
        """A tracker with the saved settings and history, measuring ``operator`` from now on."""
        if not isinstance(data, dict) or "history" not in data:
            raise ValueError(
                "CurvatureTracker.from_dict expects the dict of CurvatureTracker.to_dict() "
                "(with a 'history' list)"
            )
        tracker = cls(
            operator,
            k=data.get("k", 1),
            which=data.get("which", "LA"),
            every=data.get("every", 1),
            trace_matvecs=data.get("trace_matvecs", 0),
            tol=data.get("tol"),
            seed=data.get("seed", 0),
            mode=data.get("mode", "eval"),
            bottom_k=data.get("bottom_k", 0),
            check_every=data.get("check_every", 10),
            preconditioned=data.get("preconditioned", False),
        )
        tracker.history = [CurvatureRecord.from_dict(r) for r in data["history"]]
        return tracker

    def save(self, path: str | Path) -> Path:
        """Write settings and history: ``.json``, or ``.pt`` (``weights_only``-loadable)."""
        path = Path(path)
        if path.suffix == ".pt":
            torch.save({"format": FORMAT, "version": 1, "data": self.to_dict()}, path)
        elif path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2))
        else:
            raise ValueError(f"CurvatureTracker.save writes .json or .pt files, got {path.name!r}")
        return path

    @staticmethod
    def load_history(path: str | Path) -> list[CurvatureRecord]:
        """The records of a file written by :meth:`save`."""
        data = typing.cast(dict[str, Any], _read(Path(path)))
        return [CurvatureRecord.from_dict(r) for r in data["history"]]

    @classmethod
    def load(
        cls, path: str | Path, operator: CurvatureOperator | Callable[[], CurvatureOperator]
    ) -> CurvatureTracker:
        """Resume from a file written by :meth:`save` (settings and history)."""
        return cls.from_dict(_read(Path(path)), operator)
