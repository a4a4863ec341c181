r"""The generalized Gauss-Newton matrix :math:`G = J^\top H_{\text{loss}} J`.

For a loss that is a function of the model output, :math:`L(\theta) =
\ell(f(\theta))`, the Hessian splits into

.. math::

    \nabla^2 L = J^\top H_\ell J + \sum_o \frac{\partial \ell}{\partial f_o} \nabla^2 f_o,

with :math:`J = \partial f / \partial \theta` and :math:`H_\ell = \nabla^2_f
\ell`. The GGN keeps the first term (Schraudolph, 2002, "Fast curvature
matrix-vector products for second-order gradient descent"): it is positive
semi-definite whenever the loss is convex in the output (cross-entropy, MSE,
BCE), and for cross-entropy with softmax it equals the Fisher information
(Martens, 2020). Over a dataset it is sample-weighted like the loss:
:math:`G = \sum_b \frac{n_b}{N} J_b^\top H_b J_b`.

A product with a block ``V`` of ``k`` vectors costs, per batch, one batched
forward-mode pass for :math:`JV` (``vmap`` over ``jvp``), the output-space
product :math:`H_\ell (JV)`, and one reverse pass for :math:`J^\top(\cdot)`
batched over the ``k`` rows.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from hessian_spectra.data import BatchSizeFn, WeightedBatch
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.losses.standard import LossOfOutput
from hessian_spectra.operators import _functional as fx
from hessian_spectra.operators._chunks import GGN_ROW_FACTOR, budget_bytes, rows_per_pass
from hessian_spectra.operators._finite import FiniteWatch
from hessian_spectra.operators._graph_cache import GraphCache
from hessian_spectra.operators._hvp import default_fd_eps
from hessian_spectra.operators._model import ModelOperator, check_callable
from hessian_spectra.params import ParamFilter
from hessian_spectra.state import ModelSnapshot, captured_update_error

__all__ = ["AnalyticalHvpFallbackWarning", "GGNOperator", "OutputCurvatureOperator"]

ForwardFn = Callable[[nn.Module, Any], Tensor]
LossOfOutputFn = Callable[[Tensor, Any], Tensor]


class AnalyticalHvpFallbackWarning(UserWarning):
    """Kept for imports: ``loss_hvp="analytical"`` without ``.hvp`` now raises ``ValueError``
    (as hessian-eigenthings documents) instead of falling back with this warning."""


class _LazyZeros:
    """The product's accumulator, allocated at its first use: after the first batch's
    ``J V`` and ``Jᵀ U`` passes, so it is not live during their peaks."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self._t: Tensor | None = None

    def get(self) -> Tensor:
        if self._t is None:
            self._t = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self._t

    def reset(self) -> None:
        if self._t is not None:
            self._t.zero_()


class OutputCurvatureOperator(ModelOperator):
    r""":math:`\sum_b w_b J_b^\top M_b J_b` for output-space matrices :math:`M_b` (GGN, MC Fisher).

    Subclasses implement :meth:`_output_product` (``M_b`` applied to a block of
    output-shaped directions); the data, parameter selection, seed and model
    guards come from :class:`~hessian_spectra.operators._model.ModelOperator`.

    Attributes:
        max_block: the most rows of a block in one ``J V`` and ``Jᵀ U`` pass;
            longer blocks go in chunks that share the batch's forward for ``Jᵀ``.
        block_bytes: the memory one chunk may take: at most
            ``block_bytes // (4 s + 16 v)`` rows (``s``: the bytes the batch's
            forward saves for backward, counted once per batch shape by one
            more forward; ``v``: one parameter vector), at least 1. The default
            ``None`` ties it to the training step: ``2 (s + 4 v)``
            (:func:`~hessian_spectra.operators._chunks.default_budget`), one row.
        block_rows: the rows per chunk of the last batch of the last product.
        block_mechanisms: how the rows of a chunk run (vmap for two or more rows
            under ``"auto"``, else a loop; never timed).
    """

    max_block: int = 32
    block_bytes: int | None = None
    _checks_finite = True

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        forward_fn: ForwardFn,
        *,
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
        check_callable(
            forward_fn, "forward_fn", "(model, batch) -> output tensor, e.g. supervised_forward()"
        )
        if jvp not in ("exact", "finite_difference"):
            raise ValueError(f"jvp must be 'exact' or 'finite_difference', got {jvp!r}")
        if fd_eps is not None and not (isinstance(fd_eps, int | float) and fd_eps > 0):
            raise ValueError(f"fd_eps must be a positive float or None, got {fd_eps!r}")
        super().__init__(
            model,
            dataloader,
            param_filter=param_filter,
            full_dataset=full_dataset,
            num_batches=num_batches,
            microbatch_size=microbatch_size,
            batch_size_fn=batch_size_fn,
            seed=seed,
            cache=cache,
            microbatch_unsafe=microbatch_unsafe,
        )
        self.forward_fn = forward_fn
        self.jvp = jvp
        self.fd_eps = fd_eps
        self.block_mechanisms = fx.BlockMechanisms()
        self.block_rows = 0
        self._saved_bytes: dict[Any, int] = {}  # batch shapes -> the forward's saved bytes

    @property
    def product_mechanisms(self) -> tuple[str, ...]:
        return (self.block_mechanisms.jvp, self.block_mechanisms.vjp)

    def _output_product(self, output: Tensor, wb: WeightedBatch, U: Tensor) -> Tensor:
        """``M_b U`` for a block ``U`` of shape ``(k, *output.shape)``; may overwrite ``U``
        (the caller's own ``J V``, not used afterwards) and return it."""
        raise NotImplementedError

    def _product_hint(self) -> str:
        return "J v or the loss Hessian of the output overflows or is infinite here"

    def _diagnostic_loss(self, wb: WeightedBatch) -> tuple[Tensor, Tensor | None]:
        output = self.forward_fn(self.model, wb.batch)
        return self.loss_of_output_fn(output, wb.batch), output  # type: ignore[attr-defined]

    def _fd_jvp(
        self, f: Callable[..., Tensor], primals: list[Tensor], Vs: list[Tensor], wb: WeightedBatch
    ) -> Tensor:
        """Central differences ``(f(θ + h v) - f(θ - h v)) / 2h`` with ``h = eps / ||v||``."""
        eps = self.fd_eps or default_fd_eps(self._dtype)
        rows = []
        with torch.no_grad():
            for i in range(Vs[0].shape[0]):
                vi = [v[i] for v in Vs]
                norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in vi))
                if norm == 0.0:
                    with self._rng(wb.index):
                        rows.append(torch.zeros_like(f(*primals)))
                    continue
                h = eps / norm
                with self._rng(wb.index):
                    plus = f(*[p + h * v for p, v in zip(primals, vi, strict=True)])
                with self._rng(wb.index):
                    minus = f(*[p - h * v for p, v in zip(primals, vi, strict=True)])
                rows.append((plus - minus) / (2 * h))
        return torch.stack(rows)

    def _matmat(self, V: Tensor) -> Tensor:
        vector_bytes = self.size * self._dtype.itemsize
        budget = budget_bytes(self.block_bytes)
        with self._guard(functional=True) as snap:
            # a normal tensor, also when V was made under inference_mode (read, never written)
            V = V.clone() if V.is_inference() else V.detach()
            Vs = self.layout.split(V)
            # half-precision products add up over batches in float32
            wide = torch.float32 if V.dtype in (torch.float16, torch.bfloat16) else V.dtype
            out = _LazyZeros(V.shape, wide, V.device)
            primals = [p.detach() for p in self.params]

            def product(watch: FiniteWatch) -> Tensor:
                out.reset()
                for wb in self._each_batch(snap):
                    with self._nonfinite_guard(V, wb, snap):
                        self._batch_product(V, Vs, out, primals, wb, budget, vector_bytes, snap)
                    watch.note(wb, out.get())
                return out.get()

            self._check_finite(product(FiniteWatch()), V, snap, product)
            self._finish_usage_check("output")
        return out.get().to(V.dtype)

    def _batch_product(
        self,
        V: Tensor,
        Vs: list[Tensor],
        out: _LazyZeros,
        primals: list[Tensor],
        wb: WeightedBatch,
        budget: int | None,
        vector_bytes: int,
        snap: ModelSnapshot,
    ) -> None:
        """Add batch ``wb``'s weighted product ``w_b J_b^T M_b J_b V`` to ``out``."""
        f = fx.output_fn(self.model, self.names, self.forward_fn, wb.batch)
        rng = functools.partial(self._rng, wb.index)
        if self._usage_pending():
            self._forward_saved_bytes(f, primals, wb, rng, probe=True)
            snap.reset_buffers()
        rows = self.max_block
        if V.shape[0] > 1:
            saved = self._forward_saved_bytes(f, primals, wb, rng)
            rows = rows_per_pass(saved, vector_bytes, budget, self.max_block, GGN_ROW_FACTOR)
        self.block_rows = rows
        output: Tensor | None = None
        vjp_fn: Any = None
        for start in range(0, V.shape[0], rows):
            part = [v[start : start + rows] for v in Vs]
            with self._functorch_errors(f, primals):
                JV = self._jv(f, primals, part, wb, rng).detach()
                if vjp_fn is None:
                    # the forward kept for Jᵀ runs after the first J V, so that pass's own
                    # output and tangent are never live next to this output
                    with rng():
                        output, vjp_fn = torch.func.vjp(f, *primals)  # type: ignore[misc]
            assert output is not None
            shape = JV.shape
            MJV = self._output_product(output.detach(), wb, JV)  # may overwrite JV
            del JV
            if MJV.shape != shape:
                raise RuntimeError(
                    f"the output-space product returned shape {tuple(MJV.shape)} for a "
                    f"block of shape {tuple(shape)}; a loss .hvp(output, batch, U) "
                    "must return U's shape"
                )
            grads = fx.block_vjp(vjp_fn, MJV.to(output.dtype), self.block_mechanisms)
            del MJV
            # each parameter's rows straight into its slice of out (no joined copy)
            acc = out.get()
            for o, n, g in zip(self.layout.offsets, self.layout.numels, grads, strict=True):
                acc[start : start + rows, o : o + n].add_(g.reshape(g.shape[0], n), alpha=wb.weight)
            del grads
        del vjp_fn, output

    @contextlib.contextmanager
    def _functorch_errors(self, f: Callable[..., Tensor], primals: list[Tensor]) -> Iterator[None]:
        """Our message for ``torch.func``'s refusal of an in-place buffer update in the
        forward, naming the buffers (found by one more forward without autograd)."""
        try:
            yield
        except RuntimeError as err:
            ours = captured_update_error(
                err,
                self.model,
                lambda: f(*primals),
                f"{type(self).__name__} differentiates",
                "HessianOperator, which runs plain autograd and restores the buffers",
            )
            if ours is None:
                raise
            raise ours from err

    def _forward_saved_bytes(
        self,
        f: Callable[..., Tensor],
        primals: list[Tensor],
        wb: WeightedBatch,
        rng: Any,
        probe: bool = False,
    ) -> int:
        """Bytes the batch's forward saves for backward, counted once per batch shape
        through a plain autograd forward (``torch.func`` runs no saved-tensor hooks).
        With ``probe`` the forward runs anyway and records which parameters the
        output uses (the first product's zero-curvature check)."""
        key = tuple(tuple(t.shape) for t in pytree.tree_leaves(wb.batch) if isinstance(t, Tensor))
        if key not in self._saved_bytes or probe:
            ps = [p.detach().requires_grad_(True) for p in primals]
            with rng():
                output = f(*ps)
            self._saved_bytes[key] = GraphCache.saved_bytes([output], ps)
            if probe:
                self._note_output(output, ps)
        return self._saved_bytes[key]

    def _jv(
        self,
        f: Callable[..., Tensor],
        primals: list[Tensor],
        Vs: list[Tensor],
        wb: WeightedBatch,
        rng: Callable[[], Any],
    ) -> Tensor:
        """``J V`` for a chunk of rows: forward mode, or central differences."""
        if self.jvp != "exact":
            return self._fd_jvp(f, primals, Vs, wb)
        try:
            return fx.block_jvp(f, primals, Vs, rng, self.block_mechanisms)
        except NotImplementedError as err:
            raise NotImplementedError(
                f"forward-mode AD failed in the model ({err}); pass "
                "jvp='finite_difference' to take J v by central differences instead"
            ) from err


class GGNOperator(OutputCurvatureOperator):
    r"""Generalized Gauss-Newton :math:`G = \sum_b \frac{n_b}{N} J_b^\top H_{\ell,b} J_b` of a loss.

    Args:
        model: the module analysed; left bit-identical.
        dataloader: iterable of batches (re-iterable or cached).
        forward_fn: ``(model, batch) -> output`` tensor (e.g. logits).
        loss_of_output_fn: ``(output, batch) -> scalar`` mean loss of the batch.
            When it carries ``.hvp(output, batch, U)`` (the loss helpers of
            :mod:`hessian_spectra.losses` do), that closed form gives
            :math:`H_\ell U`. A ``.hvp`` of another object is called with one
            direction ``u`` shaped like the output at a time.
        param_filter: which parameters (default: all trainable).
        full_dataset, num_batches, microbatch_size, batch_size_fn, cache: see
            :class:`~hessian_spectra.data.WeightedBatches`.
        loss_hvp: ``"analytical"`` (default) uses ``loss_of_output_fn.hvp`` and
            raises ``ValueError`` for a loss without one; ``"autograd"``
            differentiates the loss twice with respect to the output (any loss).
        jvp: ``"exact"`` forward-mode AD (default) or ``"finite_difference"``:
            central differences of two no-grad forwards per vector, for models
            without forward-mode support; the step is ``fd_eps / ||v||``.
        backend: ``None`` or a :class:`~hessian_spectra.linalg.SingleDeviceBackend`
            (hessian-eigenthings' argument; the algorithms take theirs).
        fd_eps: finite-difference step (default by dtype, ~ eps^(1/3)).
        seed: fixes dropout masks per batch so the operator is one matrix.
        microbatch_unsafe: allow ``microbatch_size`` to split the batches of a
            model that couples a batch's samples (BatchNorm in train mode).

    Attributes:
        model, params, names, layout, batches, seed: as for every model
            operator (:class:`~hessian_spectra.operators._model.ModelOperator`).
        block_mechanisms: how a block's rows go through ``J V`` and ``J^T U``
            (:class:`~hessian_spectra.operators._functional.BlockMechanisms`):
            ``"auto"`` (one vmapped pass for a chunk of two or more rows, which
            only a raised ``block_bytes`` gives; else a loop), ``"vmap"`` or
            ``"loop"``.

    Example:
        >>> from hessian_spectra.losses import supervised_forward, supervised_loss_of_output
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> G = GGNOperator(model, data, supervised_forward(),
        ...                 supervised_loss_of_output(torch.nn.functional.cross_entropy))
        >>> (G @ torch.ones(G.size)).shape
        torch.Size([8])
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        forward_fn: ForwardFn,
        loss_of_output_fn: LossOfOutputFn,
        *,
        param_filter: ParamFilter | None = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        loss_hvp: Literal["analytical", "autograd"] = "analytical",
        jvp: Literal["exact", "finite_difference"] = "exact",
        fd_eps: float | None = None,
        backend: LinAlgBackend | None = None,
        seed: int | None = 0,
        cache: bool | None = None,
        microbatch_unsafe: bool = False,
    ) -> None:
        check_backend(backend, "GGNOperator")
        check_callable(
            loss_of_output_fn,
            "loss_of_output_fn",
            "(output, batch) -> scalar loss, e.g. supervised_loss_of_output(F.cross_entropy)",
        )
        if loss_hvp not in ("analytical", "autograd"):
            raise ValueError(f"loss_hvp must be 'analytical' or 'autograd', got {loss_hvp!r}")
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
        hvp = getattr(loss_of_output_fn, "hvp", None)
        if loss_hvp == "analytical" and not callable(hvp):
            name = getattr(loss_of_output_fn, "__name__", type(loss_of_output_fn).__name__)
            raise ValueError(
                "loss_hvp='analytical' needs a loss_of_output_fn with a closed-form "
                f".hvp(output, batch, u); {name} has none. Use a helper that carries one "
                "(cross_entropy_loss_of_output(), mse_loss_of_output(), "
                "supervised_loss_of_output(criterion), hf_lm_shifted_ce()), wrap the loss in "
                "LossOfOutput(fn, hvp=...), or pass loss_hvp='autograd' to differentiate it "
                "twice with autograd (exact, more memory)"
            )
        self.loss_hvp = loss_hvp
        self._hvp = hvp if loss_hvp == "analytical" else None
        # the helpers' .hvp take a block of directions; another object's .hvp (written for
        # hessian-eigenthings) takes one direction shaped like the output, so it gets them
        # one at a time
        self._hvp_blocks = isinstance(loss_of_output_fn, LossOfOutput)

    def _output_product(self, output: Tensor, wb: WeightedBatch, U: Tensor) -> Tensor:
        if self._hvp is not None:
            if self._hvp_blocks:
                inplace = getattr(self.loss_of_output_fn, "hvp_inplace", None)
                if inplace is not None:
                    return inplace(output, wb.batch, U)
                return self._hvp(output, wb.batch, U)
            return torch.stack([self._hvp(output, wb.batch, u) for u in U])
        return autograd_loss_hvp(self.loss_of_output_fn, output, wb.batch, U)


def autograd_loss_hvp(
    loss_of_output_fn: LossOfOutputFn, output: Tensor, batch: Any, U: Tensor
) -> Tensor:
    """``H_loss U`` by double backward of ``loss_of_output_fn`` with respect to the output.

    Batched over the ``k`` rows of ``U`` (``is_grads_batched``), a loop where
    ``vmap`` cannot batch the loss.
    """
    o = output.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_output_fn(o, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_of_output_fn must return a scalar loss, got {shape}")
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
    if not g.requires_grad:  # the loss is linear in the output
        return torch.zeros_like(U)
    try:
        (HU,) = torch.autograd.grad(
            g, o, grad_outputs=U, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except (RuntimeError, NotImplementedError):
        rows = [
            torch.autograd.grad(g, o, grad_outputs=u, retain_graph=True, allow_unused=True)[0]
            for u in U
        ]
        if any(r is None for r in rows):
            return torch.zeros_like(U)
        return torch.stack(rows)
    return torch.zeros_like(U) if HU is None else HU
