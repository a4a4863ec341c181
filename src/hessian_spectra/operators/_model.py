"""What every curvature operator built from a model and a dataset shares.

:class:`ModelOperator` is the base of
:class:`~hessian_spectra.operators.HessianOperator`,
:class:`~hessian_spectra.operators.GGNOperator`,
:class:`~hessian_spectra.operators.EmpiricalFisherOperator`,
:class:`~hessian_spectra.operators.MCFisherOperator` and
:class:`~hessian_spectra.operators.FSDPHessianOperator`. It checks the model,
selects the parameters (one device, one dtype), normalises the seed, wraps the
data in :class:`~hessian_spectra.data.WeightedBatches`, and provides the model
guard and the per-batch RNG that every product runs under.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessian_spectra.batching import assert_microbatch_safe
from hessian_spectra.data import BatchSizeFn, WeightedBatch, WeightedBatches
from hessian_spectra.operators import _functional as fx
from hessian_spectra.operators._finite import (
    FiniteWatch,
    NonFiniteError,
    all_finite,
    check_finite_input,
    describe_nonfinite,
)
from hessian_spectra.operators._user_calls import explain_call_error
from hessian_spectra.operators.base import CurvatureOperator
from hessian_spectra.params import ParamFilter, ParamLayout, selected_parameters
from hessian_spectra.state import (
    ModelSnapshot,
    batch_rng,
    global_rng_preserved,
    preserved_model,
)

__all__ = [
    "ModelOperator",
    "ZeroCurvatureWarning",
    "check_callable",
    "check_loss_fn",
    "explain_call_error",
]


class ZeroCurvatureWarning(UserWarning):
    """An operator is zero because of how it was set up: none of the selected
    parameters is used by the loss, or the model output has no autograd graph."""


_CRITERIA = {
    F.cross_entropy,
    F.mse_loss,
    F.nll_loss,
    F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.kl_div,
    F.gaussian_nll_loss,
    F.poisson_nll_loss,
}


def _criterion_name(fn: Any) -> str | None:
    """The name of ``fn`` when it is a criterion ``(output, target) -> loss``, else ``None``."""
    if isinstance(fn, nn.modules.loss._Loss):
        prefix = "nn." if type(fn).__module__.startswith("torch.nn") else ""
        return f"{prefix}{type(fn).__name__}()"
    target = getattr(fn, "func", fn)  # functools.partial(F.cross_entropy, ...)
    try:
        if target in _CRITERIA:
            return f"F.{target.__name__}"
    except TypeError:  # unhashable callable
        return None
    return None


def check_loss_fn(loss_fn: Any, what: str = "loss_fn") -> None:
    """``TypeError`` unless ``loss_fn`` is callable as ``loss_fn(model, batch)``.

    A criterion (``nn.CrossEntropyLoss()``, ``F.mse_loss``), which takes
    ``(output, target)``, is refused with the helper to wrap it in.
    """
    check_callable(loss_fn, what, "loss_fn(model, batch) -> scalar loss")
    name = _criterion_name(loss_fn)
    if name is not None:
        raise TypeError(
            f"{what} is called as {what}(model, batch) and must run the model itself; got the "
            f"criterion {name}, which takes (output, target). Pass "
            f"{what}=supervised_loss({name}) (from hessian_spectra.losses) for (inputs, targets) "
            "batches"
        )


def check_callable(fn: Any, what: str, expected: str) -> None:
    """``TypeError`` unless ``fn`` is callable: "``what`` must be a callable ``expected``, got ..."."""
    if not callable(fn):
        raise TypeError(f"{what} must be a callable {expected}, got {type(fn).__name__}")


def _check_one_kind(params: list[nn.Parameter]) -> None:
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise ValueError(
            f"the selected parameters lie on several devices ({', '.join(devices)}); expected "
            "one device. Move the model with model.to(device), or select the parameters of one "
            "device with param_filter"
        )
    dtypes = sorted({str(p.dtype) for p in params})
    if len(dtypes) > 1:
        raise ValueError(
            f"the selected parameters have mixed dtypes ({', '.join(dtypes)}); expected one "
            "dtype. Convert the model with model.to(dtype), or select parameters of one dtype "
            "with param_filter"
        )


class ModelOperator(CurvatureOperator):
    r"""A curvature operator of ``model`` averaged over the batches of a dataloader.

    A product sums the batches' contributions with the sample-count weights
    :math:`n_b / N` of ``batches``, inside :meth:`_guard` (the model is left
    bit-identical) and, per batch, inside :meth:`_rng` (the global RNG seeded
    from ``(seed, batch index)``, so dropout draws the same masks in every
    product and the operator is one fixed matrix).

    Args:
        model: the module analysed.
        dataloader: an iterable of batches.
        param_filter: which parameters (default: all with ``requires_grad``);
            they must share one device and one dtype.
        full_dataset, num_batches, microbatch_size, batch_size_fn, cache: see
            :class:`~hessian_spectra.data.WeightedBatches`.
        seed: the initial :attr:`seed`.
        microbatch_unsafe: split batches into microbatches even when the model
            couples a batch's samples (BatchNorm in train mode), which changes
            the matrix. Without it such a split raises ``ValueError`` (see
            :func:`~hessian_spectra.batching.assert_microbatch_safe`).

    Attributes:
        model: the module analysed (for a distributed operator, the module
            inside the ``DistributedDataParallel`` wrapper); never changed.
        params: the selected parameters, in ``model.named_parameters()`` order.
        names: their names, a tuple in the same order.
        layout: the :class:`~hessian_spectra.params.ParamLayout` of ``params``
            in the flat vector (``layout.slices()[name]`` is where one sits).
        batches: the :class:`~hessian_spectra.data.WeightedBatches` the
            products average over (a distributed operator sets their total to
            the global sample count).
        seed: an ``int`` that seeds dropout (and Monte-Carlo targets) per
            batch. Products read it when they run, so setting it after
            construction (``op.seed = 3``) gives another fixed matrix from the
            next product on; setting ``None`` draws a random seed from the OS.
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        *,
        param_filter: ParamFilter | None = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        seed: int | None = 0,
        cache: bool | None = None,
        microbatch_unsafe: bool = False,
    ) -> None:
        super().__init__()
        self._select(model, param_filter, seed)
        if not isinstance(microbatch_unsafe, bool):
            raise TypeError(f"microbatch_unsafe must be a bool, got {microbatch_unsafe!r}")
        self.microbatch_unsafe = microbatch_unsafe
        self._usage: list[bool] | None = [False] * len(self.params)  # None: checked
        self._detached_output = False
        self._usage_seen = False  # a product has recorded usage
        with global_rng_preserved(model):  # iterating a DataLoader draws from torch's RNG
            self.batches = self._agreed_batches(
                lambda: WeightedBatches(
                    dataloader,
                    full_dataset=full_dataset,
                    num_batches=num_batches,
                    microbatch_size=microbatch_size,
                    batch_size_fn=batch_size_fn,
                    device=self._device,
                    cache=cache,
                )
            )
        self._check_microbatching()

    def _select(self, model: nn.Module, param_filter: ParamFilter | None, seed: int | None) -> None:
        """Check ``model`` and ``seed``; select the parameters (one device, one dtype)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.seed = seed  # the setter checks it and draws one for None
        names, params = selected_parameters(model, param_filter)
        _check_one_kind(params)
        self.model = model
        self.names: tuple[str, ...] = tuple(names)
        self.params: list[nn.Parameter] = params
        self.layout = ParamLayout.of(names, params)
        self._dtype: torch.dtype = params[0].dtype
        self._device: torch.device = params[0].device
        self._cuda = fx.cuda_indices(model)

    def _agreed_batches(self, make: Callable[[], WeightedBatches]) -> WeightedBatches:
        """The batches from ``make()``; a sharded operator agrees on them across ranks."""
        return make()

    # -- the seed ----------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self._seed = fx.resolve_seed(value)

    # -- CurvatureOperator ---------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    # -- what products share -------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(
        self, *, perturbed: bool = False, functional: bool = False, check_parameters: bool = True
    ) -> Iterator[ModelSnapshot]:
        """Leave the model bit-identical after the body (see :func:`preserved_model`).

        Args:
            perturbed: the body moves ``params`` in place (finite differences);
                their values are saved and restored.
            functional: the body runs ``torch.func`` transforms, so train-mode
                BatchNorm uses batch statistics without writing running ones.
            check_parameters: report parameters changed in the body (``False``: the
                body moves them itself and restores them after the guard).
        """
        self._check_microbatching()  # the model's modes may have changed since construction
        with contextlib.ExitStack() as stack:
            snap = stack.enter_context(
                preserved_model(
                    self.model,
                    self.params if perturbed else (),
                    check_parameters=check_parameters,
                )
            )
            if functional:
                stack.enter_context(fx.batch_norm_batch_stats(self.model))
            yield snap

    def _check_microbatching(self) -> None:
        """``ValueError`` from :func:`~hessian_spectra.batching.assert_microbatch_safe` when
        batches are split into microbatches and the model couples a batch's samples
        (BatchNorm in train mode), unless ``microbatch_unsafe``."""
        batches = getattr(self, "batches", None)
        mb = getattr(batches, "microbatch_size", None)
        if mb is None or self.microbatch_unsafe or getattr(batches, "max_rows", 0) <= mb:
            return
        assert_microbatch_safe(self.model)

    # -- zero curvature from the set-up ------------------------------------------------
    def _note_used(self, grads: Sequence[Tensor | None]) -> None:
        """Record which parameters got a gradient (``None``: the loss does not use it)."""
        if self._usage is not None:
            self._usage = [u or g is not None for u, g in zip(self._usage, grads, strict=True)]
            self._usage_seen = True

    def _note_output(self, output: Tensor, params: Sequence[Tensor]) -> None:
        """Record which of ``params`` (leaves standing for :attr:`params`) ``output`` uses."""
        if self._usage is None or all(self._usage):
            return
        if not output.requires_grad:
            self._detached_output = self._usage_seen = True
            return
        self._note_used(
            torch.autograd.grad(output.sum(), list(params), allow_unused=True, retain_graph=True)
        )

    def _usage_pending(self) -> bool:
        """Whether a product should still record parameter usage (the first one does)."""
        return self._usage is not None and not all(self._usage)

    def _finish_usage_check(self, what: str = "loss") -> None:
        """After the first complete product: warn once if the operator is zero by set-up."""
        if self._usage is None or not self._usage_seen:
            return
        usage, self._usage = self._usage, None
        if self._detached_output:
            warnings.warn(
                f"{type(self).__name__}: forward_fn returned an output without an autograd "
                "graph (requires_grad=False), so it does not depend on the parameters and the "
                "operator is zero. It was detached, computed under torch.no_grad(), or went "
                "through .item()/NumPy; return the model's output itself",
                ZeroCurvatureWarning,
                stacklevel=5,
            )
        elif not any(usage):
            shown = ", ".join(repr(n) for n in self.names[:8])
            more = f" and {len(self.names) - 8} more" if len(self.names) > 8 else ""
            warnings.warn(
                f"{type(self).__name__}: none of the selected parameters ({shown}{more}) is used "
                f"by the {what} of any batch, so the operator is zero. Check param_filter: it "
                "must select parameters that the loss depends on",
                ZeroCurvatureWarning,
                stacklevel=5,
            )

    def _each_batch(self, snap: ModelSnapshot) -> Iterator[WeightedBatch]:
        """The weighted batches, each starting from the saved buffers."""
        for wb in self.batches:
            snap.reset_buffers()
            yield wb

    def _follow_params(self) -> bool:
        """Point :attr:`params` at the model's current parameters of the same names.

        A parameter the model replaced by another ``Parameter`` object (``module.weight =
        nn.Parameter(...)``) is followed, so products differentiate what the loss uses
        (the old object would give a silently zero block). Returns whether one moved.

        Raises:
            ValueError: a selected parameter is gone or changed shape, dtype or device.
        """
        current = dict(self.model.named_parameters())
        moved = False
        for i, (name, p) in enumerate(zip(self.names, self.params, strict=True)):
            q = current.get(name)
            if q is p:
                continue
            if q is None or (q.shape, q.dtype, q.device) != (p.shape, p.dtype, p.device):
                now = "gone" if q is None else f"{tuple(q.shape)} {q.dtype} on {q.device}"
                raise ValueError(
                    f"parameter {name!r} was {tuple(p.shape)} {p.dtype} on {p.device} when the "
                    f"operator was built and is {now} now; build a new operator for the "
                    "changed model"
                )
            self.params[i] = q
            moved = True
        return moved

    def _rng(self, index: tuple[int, ...]) -> contextlib.AbstractContextManager[None]:
        """The global RNG seeded from ``(seed, index)`` for one pass over one batch."""
        return batch_rng(index, self.seed, self._cuda)

    # -- non-finite products -------------------------------------------------------------
    def _product_hint(self) -> str:
        """What makes a product non-finite when the batch's loss and gradient are finite."""
        return "e.g. an overflow in the operator's dtype"

    def _where(self, index: tuple[int, ...]) -> str:
        """``"batch 3"``, or ``"batch 3 (microbatch 1)"`` when batches are split."""
        if self.batches.microbatch_size is None:
            return f"batch {index[0]}"
        return f"batch {index[0]} (microbatch {index[1]})"

    def _diagnostic_loss(self, wb: WeightedBatch) -> tuple[Tensor, Tensor | None]:
        """The batch's scalar loss (and the model output when the operator has one),
        computed on the model as it is; subclasses say how."""
        raise NotImplementedError

    def _diagnose(self, wb: WeightedBatch, snap: ModelSnapshot) -> str | None:
        """What of batch ``wb`` is non-finite: its model output, loss or gradient at the
        saved parameters; ``None`` when all three are finite."""
        base = snap.params or [p.detach() for p in self.params]
        params = [t.detach().clone().requires_grad_(True) for t in base]
        snap.reset_buffers()
        with fx.reparametrized(self.model, self.names, params), self._rng(wb.index):
            loss, output = self._diagnostic_loss(wb)
        if output is not None and not bool(torch.isfinite(output).all()):
            return (
                f"the model output holds {describe_nonfinite(output)} (check the batch's inputs "
                "and the model's forward for NaN/inf)"
            )
        loss = loss.reshape(-1).sum() if loss.numel() > 1 else loss.reshape(())
        if not bool(torch.isfinite(loss)):
            return (
                f"its loss is {describe_nonfinite(loss)} (check the batch's inputs and targets "
                "for NaN/inf, and the loss for log(0) or a division by zero)"
            )
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for name, g in zip(self.names, grads, strict=True):
            if g is not None and not bool(torch.isfinite(g).all()):
                return (
                    f"its loss is finite ({float(loss):.6g}) but its gradient is not "
                    f"(parameter {name!r}: {describe_nonfinite(g)})"
                )
        return None

    def _nonfinite_error(self, V: Tensor, wb: WeightedBatch, snap: ModelSnapshot) -> NonFiniteError:
        """The error for a product that turned non-finite at batch ``wb``."""
        who = type(self).__name__
        check_finite_input(V, who)
        try:
            what = self._diagnose(wb, snap)
        except Exception as err:  # the diagnosis is best effort
            what = f"its loss could not be recomputed to say more ({type(err).__name__}: {err})"
        if what is None:
            what = (
                "its loss and gradient are finite, but its curvature product is not ("
                + self._product_hint()
                + ")"
            )
        return self._nonfinite(wb, what)

    def _nonfinite(self, wb: WeightedBatch, what: str) -> NonFiniteError:
        return NonFiniteError(
            f"{type(self).__name__}: the product holds NaN or inf from {self._where(wb.index)}: "
            f"{what}. Remove or fix that batch (or pass num_batches / another dataloader); no "
            "algorithm can use a non-finite product"
        )

    def _check_finite(
        self,
        out: Tensor,
        V: Tensor,
        snap: ModelSnapshot,
        again: Callable[[FiniteWatch], object],
    ) -> None:
        """Raise :class:`NonFiniteError` if the product ``out`` holds NaN or inf (one host
        synchronisation per product); then ``again(watch)`` runs the product once more
        with an active watch to find the first batch that brought them."""
        if all_finite(out):
            return
        who = type(self).__name__
        check_finite_input(V, who)
        watch = FiniteWatch(active=True)
        again(watch)
        bad = watch.first_bad()
        if bad is None:
            raise NonFiniteError(
                f"{who}: the product holds NaN or inf, but not when computed again batch by "
                "batch: the model's forward is not deterministic (check it for NaN/inf)"
            )
        raise self._nonfinite_error(V, bad, snap)

    @contextlib.contextmanager
    def _nonfinite_guard(self, V: Tensor, wb: WeightedBatch, snap: ModelSnapshot) -> Iterator[None]:
        """Turn an error raised inside torch by a batch's NaN/inf (e.g. sampling from NaN
        probabilities) into :class:`NonFiniteError` naming the batch."""
        try:
            yield
        except NonFiniteError:
            raise
        except (RuntimeError, ValueError) as err:
            try:
                what = self._diagnose(wb, snap)
            except Exception:  # the diagnosis is best effort: keep the original error
                what = None
            if what is None:
                raise
            raise self._nonfinite(wb, what) from err
