r"""Fisher matrices: empirical (per-sample gradient outer products) and Monte-Carlo.

**Empirical Fisher** (Kunstner et al., 2019, "Limitations of the empirical
Fisher approximation"):

.. math::

    F_{\text{emp}} = \sum_b w_b \frac{1}{B_b} \sum_{i \in b} g_i g_i^\top,
    \qquad g_i = \nabla_\theta \ell_i,

which is :math:`\frac{1}{N}\sum_i g_i g_i^\top` with the default sample-count
weights. A product :math:`F V = \sum_i c_i\, g_i (g_i^\top V)` computes the
per-sample gradients of ``chunk_size`` samples at a time with
``vmap(grad(...))`` (each sample a one-row batch), so at most
``chunk_size x n`` gradient entries exist at once.

**Monte-Carlo Fisher**: targets are sampled from the model's predictive
distribution and the outer products of the sampled per-position gradients
replace the loss Hessian inside :math:`J^\top (\cdot) J` (Martens & Grosse,
2015, K-FAC, sec. 5). Its expectation over the samples is the GGN of the same
loss. The samples come from a generator seeded by ``(seed, batch index)``, so
every product redraws the same targets and the operator is one fixed PSD
matrix for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hessian_spectra.data import BatchSizeFn, WeightedBatch, default_batch_size, slice_batch
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.operators import _functional as fx
from hessian_spectra.operators._finite import FiniteWatch
from hessian_spectra.operators._model import ModelOperator, check_loss_fn
from hessian_spectra.operators.ggn import ForwardFn, LossOfOutputFn, OutputCurvatureOperator
from hessian_spectra.params import ParamFilter
from hessian_spectra.state import ModelSnapshot

__all__ = ["EmpiricalFisherOperator", "MCFisherOperator", "PerSampleLossFn"]

LossFn = Callable[[nn.Module, Any], Tensor]
PerSampleLossFn = Callable[[nn.Module, Any], Tensor]
"""``(model, sample) -> scalar`` loss of one sample (see :class:`EmpiricalFisherOperator`)."""


def _batched_in_dims(batch: Any, rows: int) -> Any:
    """A ``vmap`` ``in_dims`` pytree: 0 for tensors with ``rows`` leading entries, else ``None``."""
    if isinstance(batch, Tensor):
        return 0 if batch.dim() > 0 and batch.shape[0] == rows else None
    if isinstance(batch, dict):
        return {k: _batched_in_dims(v, rows) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return (
            type(batch)(_batched_in_dims(v, rows) for v in batch)
            if not hasattr(batch, "_fields")
            else tuple(_batched_in_dims(v, rows) for v in batch)
        )
    return None


def _map_rows(batch: Any, dims: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every per-sample tensor (batch dimension ``0`` in ``dims``)."""
    if isinstance(batch, Tensor):
        return fn(batch) if dims == 0 else batch
    if isinstance(batch, dict):
        return {k: _map_rows(v, dims[k], fn) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        items = [_map_rows(v, d, fn) for v, d in zip(batch, dims, strict=True)]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _unsqueeze_rows(batch: Any, dims: Any) -> Any:
    """Inside ``vmap``: give every per-sample tensor its batch dimension of 1 back."""
    return _map_rows(batch, dims, lambda t: t.unsqueeze(0))


def _squeeze_rows(batch: Any, dims: Any) -> Any:
    """A one-sample batch without its batch dimension (the inverse of :func:`_unsqueeze_rows`)."""
    return _map_rows(batch, dims, lambda t: t.squeeze(0))


class EmpiricalFisherOperator(ModelOperator):
    r"""Empirical Fisher :math:`\frac{1}{N}\sum_i g_i g_i^\top` of per-sample gradients.

    Args:
        model: the module analysed; left bit-identical.
        dataloader: iterable of batches.
        per_sample_loss_fn: ``(model, sample) -> scalar`` loss of one sample, called
            (under ``vmap``) on the sample without its batch dimension, as in
            hessian-eigenthings; with ``per_sample="loop"``, the ``(B,)``
            per-sample losses of the whole batch instead.
        sample_dim: the batch dimension that indexes samples (``0``; other
            values are refused: put the sample dimension first).
        backend: ``None`` or a :class:`~hessian_spectra.linalg.SingleDeviceBackend`.
        loss_fn: instead of ``per_sample_loss_fn`` (keyword only):
            ``(model, batch) -> loss``. With ``per_sample="vmap"`` it is called on
            one-sample batches (a mean-reduced scalar or a ``(1,)`` vector, so the
            same ``loss_fn`` as for the Hessian works); with ``per_sample="loop"``
            it must return the ``(B,)`` per-sample losses of the whole batch
            (:func:`~hessian_spectra.losses.supervised_per_sample_loss`).
        param_filter, full_dataset, num_batches, batch_size_fn, cache: as for
            the other operators; batches are weighted ``n_b / N`` and samples
            equally within a batch.
        chunk_size: samples whose gradients are held at once (memory
            ``chunk_size x n``).
        per_sample: ``"vmap"`` (default; one batched pass per chunk, needs a
            model whose forward works on one-sample batches under ``vmap``)
            or ``"loop"`` (one backward per sample through the full-batch
            graph; works for any model, e.g. BatchNorm in train mode).
        seed: fixes dropout masks per batch.

    Attributes:
        model, params, names, layout, batches, seed: as for every model
            operator (:class:`~hessian_spectra.operators._model.ModelOperator`).
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        per_sample_loss_fn: LossFn | None = None,
        *,
        param_filter: ParamFilter | None = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        sample_dim: int = 0,
        backend: LinAlgBackend | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        chunk_size: int = 64,
        per_sample: Literal["vmap", "loop"] = "vmap",
        seed: int | None = 0,
        cache: bool | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        check_backend(backend, "EmpiricalFisherOperator")
        if (per_sample_loss_fn is None) == (loss_fn is None):
            raise TypeError(
                "EmpiricalFisherOperator needs one loss: per_sample_loss_fn(model, sample) "
                "(called on one sample without its batch dimension) or loss_fn=(model, batch) "
                "(called on one-sample batches); got " + ("neither" if loss_fn is None else "both")
            )
        if isinstance(sample_dim, bool) or not isinstance(sample_dim, int):
            raise TypeError(f"sample_dim must be an int, got {type(sample_dim).__name__}")
        if sample_dim != 0:
            raise ValueError(
                f"sample_dim={sample_dim}: the batches are split into samples along their first "
                "dimension; put the sample dimension first (e.g. in the DataLoader's collate_fn)"
            )
        self._unbatched = loss_fn is None and per_sample == "vmap"
        fn = per_sample_loss_fn if loss_fn is None else loss_fn
        check_loss_fn(fn, "per_sample_loss_fn" if loss_fn is None else "loss_fn")
        assert fn is not None
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if per_sample not in ("vmap", "loop"):
            raise ValueError(f"per_sample must be 'vmap' or 'loop', got {per_sample!r}")
        super().__init__(
            model,
            dataloader,
            param_filter=param_filter,
            full_dataset=full_dataset,
            num_batches=num_batches,
            batch_size_fn=batch_size_fn,
            seed=seed,
            cache=cache,
        )
        self.loss_fn: LossFn = fn
        self.chunk_size, self.per_sample = chunk_size, per_sample

    def _vmap_grads(self, primals: list[Tensor], part: Any, rows: int) -> Tensor:
        dims = _batched_in_dims(part, rows)

        def one(params: tuple[Tensor, ...], sample: Any) -> Tensor:
            with fx.reparametrized(self.model, self.names, params):
                arg = sample if self._unbatched else _unsqueeze_rows(sample, dims)
                loss = self.loss_fn(self.model, arg)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(
                    "loss_fn must return a scalar (or one-element) loss for a one-sample "
                    "batch, got "
                    f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
                )
            return loss.sum()

        try:
            grads = torch.func.vmap(
                torch.func.grad(one), in_dims=(None, dims), randomness="different"
            )(tuple(primals), part)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            raise RuntimeError(
                f"per-sample gradients with vmap failed ({type(err).__name__}: {err}). The "
                "model's forward "
                "must run on one-sample batches under torch.func.vmap; pass per_sample='loop' "
                "with a per-sample loss_fn instead (supervised_per_sample_loss; for HuggingFace "
                "models, whose padding masks vmap cannot run, hf_lm_per_sample_loss)"
            ) from err
        return self.layout.join(list(grads), batch_dims=1)

    def _loop_grads(self, primals: list[Tensor], batch: Any, rows: int) -> list[Tensor]:
        params = [p.detach().requires_grad_(True) for p in primals]
        with fx.reparametrized(self.model, self.names, params):
            losses = self.loss_fn(self.model, batch)
        if not isinstance(losses, Tensor) or losses.shape != (rows,):
            raise ValueError(
                f"per_sample='loop' needs loss_fn to return the ({rows},) per-sample losses, got "
                f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__}; "
                "use supervised_per_sample_loss(criterion)"
            )
        out = []
        for i in range(rows):
            g = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < rows, allow_unused=True)
            out.append(
                self.layout.join(
                    [
                        torch.zeros_like(p) if gi is None else gi
                        for gi, p in zip(g, params, strict=True)
                    ]
                )
            )
        return out

    _checks_finite = True

    def _product_hint(self) -> str:
        return "a per-sample gradient overflows in the operator's dtype"

    def _diagnostic_loss(self, wb: WeightedBatch) -> tuple[Tensor, Tensor | None]:
        return self.loss_fn(self.model, wb.batch), None

    def _probe(self, primals: list[Tensor], batch: Any, rows: int) -> None:
        """Record which parameters the loss uses (the first product's zero-curvature check):
        one plain forward and backward, on one sample for ``per_sample="vmap"``."""
        if self.per_sample == "vmap":
            batch = slice_batch(batch, 0, 1, rows)
            if self._unbatched:  # the seed's form: one sample without its batch dimension
                batch = _squeeze_rows(batch, _batched_in_dims(batch, 1))
        params = [p.detach().requires_grad_(True) for p in primals]
        try:
            with fx.reparametrized(self.model, self.names, params):
                loss = self.loss_fn(self.model, batch)
        except Exception:  # the product itself reports what is wrong with loss_fn
            self._usage = None  # no check then
            return
        if isinstance(loss, Tensor) and loss.is_floating_point():
            self._note_output(loss, params)

    def _matmat(self, V: Tensor) -> Tensor:
        with self._guard(functional=True) as snap:
            V = V.detach().clone()  # a normal tensor, also when V was made under inference_mode
            out = self._product(V, snap, FiniteWatch())
            self._check_finite(out, V, snap, lambda watch: self._product(V, snap, watch))
            self._finish_usage_check()
        return out

    def _product(self, V: Tensor, snap: ModelSnapshot, watch: FiniteWatch) -> Tensor:
        """``F V`` summed over the batches (each noted in ``watch``)."""
        out = torch.zeros_like(V)
        primals = [p.detach() for p in self.params]
        for wb in self._each_batch(snap):
            rows = default_batch_size(wb.batch)
            coef = wb.weight / rows
            if self._usage_pending():
                with self._rng(wb.index):
                    self._probe(primals, wb.batch, rows)
                snap.reset_buffers()
            if self.per_sample == "loop":
                with self._rng(wb.index):
                    gs = self._loop_grads(primals, wb.batch, rows)
                for s in range(0, rows, self.chunk_size):
                    G = torch.stack(gs[s : s + self.chunk_size]).to(V.dtype)
                    out.add_((V @ G.T) @ G, alpha=coef)
                watch.note(wb, out)
                continue
            for s in range(0, rows, self.chunk_size):
                e = min(rows, s + self.chunk_size)
                part = slice_batch(wb.batch, s, e, rows)
                with self._rng((*wb.index, s)):
                    G = self._vmap_grads(primals, part, e - s).to(V.dtype)  # (c, n)
                out.add_((V @ G.T) @ G, alpha=coef)
            watch.note(wb, out)
        return out


class MCFisherOperator(OutputCurvatureOperator):
    r"""Monte-Carlo Fisher :math:`\sum_b w_b J_b^\top \big(\tfrac{1}{S}\sum_s R_{b,s}\big) J_b`.

    Per position the sampled gradient :math:`r = \nabla_f \ell(f, \hat y)` with
    :math:`\hat y \sim p(\cdot \mid f)` gives the rank-one output matrix
    :math:`r r^\top`; their mean over ``mc_samples`` draws replaces the loss
    Hessian of the GGN, of which it is an unbiased estimate.

    Args:
        model, dataloader, forward_fn: as for :class:`~hessian_spectra.operators.ggn.GGNOperator`.
        loss_of_output_fn: a loss helper that defines the likelihood, i.e. carries
            ``.mc_fisher_hvp`` (cross-entropy, BCE with logits, MSE from
            :func:`~hessian_spectra.losses.supervised_loss_of_output`, and the
            HuggingFace/TransformerLens LM losses).
        mc_samples: draws per position.
        seed: seeds the sampled targets (per batch) and dropout; the same seed
            gives the same matrix, different seeds independent estimates.
        Other arguments: as for the GGN.
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        forward_fn: ForwardFn,
        loss_of_output_fn: LossOfOutputFn,
        *,
        mc_samples: int = 1,
        param_filter: ParamFilter | None = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        jvp: Literal["exact", "finite_difference"] = "exact",
        fd_eps: float | None = None,
        seed: int | None = 0,
        cache: bool | None = None,
        microbatch_unsafe: bool = False,
    ) -> None:
        mc = getattr(loss_of_output_fn, "mc_fisher_hvp", None)
        if not callable(mc):
            raise TypeError(
                "MCFisherOperator needs a loss whose likelihood it can sample: a "
                "loss_of_output_fn with "
                f".mc_fisher_hvp, got {type(loss_of_output_fn).__name__}; use "
                "supervised_loss_of_output("
                "F.cross_entropy) (or MSE/BCE-with-logits), hf_lm_loss_of_output() or "
                "tlens_loss_of_output()"
            )
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        super().__init__(
            model,
            dataloader,
            forward_fn,
            param_filter=param_filter,
            full_dataset=full_dataset,
            num_batches=num_batches,
            microbatch_size=microbatch_size,
            batch_size_fn=batch_size_fn,
            jvp=jvp,
            fd_eps=fd_eps,
            seed=seed,
            cache=cache,
            microbatch_unsafe=microbatch_unsafe,
        )
        self.loss_of_output_fn = loss_of_output_fn
        self.mc_samples = mc_samples
        self._mc = mc

    def _product_hint(self) -> str:
        return "the gradients of the sampled targets overflow or are infinite here"

    def _output_product(self, output: Tensor, wb: WeightedBatch, U: Tensor) -> Tensor:
        g = fx.seeded_generator(self.seed, wb.index, output.device, salt=2)
        return self._mc(output, wb.batch, U, generator=g, mc_samples=self.mc_samples)
