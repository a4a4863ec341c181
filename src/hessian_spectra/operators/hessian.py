"""The Hessian of a loss averaged over a dataset, as a matrix-free operator.

For a loss ``L(θ) = Σ_b (n_b / N) L_b(θ)`` over batches of ``n_b`` samples
(``N = Σ_b n_b``, each ``L_b`` the batch's mean loss) the operator is

.. math::

    H = \\nabla^2_\\theta L = \\sum_b \\frac{n_b}{N} \\nabla^2_\\theta L_b ,

the Hessian of the loss over the union of the batches, over the parameters
chosen by ``param_filter``. Products are exact (``method="autograd"``,
Pearlmutter 1994) or central differences of gradients
(``method="finite_difference"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from hessian_spectra.data import BatchSizeFn, WeightedBatch
from hessian_spectra.linalg.backend import LinAlgBackend, check_backend
from hessian_spectra.operators._chunks import budget_bytes, rows_per_pass
from hessian_spectra.operators._finite import FiniteWatch, all_finite
from hessian_spectra.operators._graph_cache import GraphCache
from hessian_spectra.operators._hvp import (
    FD_EPS,
    VmapFallbackWarning,
    block_hvp,
    check_fd_eps,
    checked_loss,
    default_fd_eps,
    gradient,
)
from hessian_spectra.operators._mechanism import MECHANISMS
from hessian_spectra.operators._model import ModelOperator, check_loss_fn
from hessian_spectra.params import ParamFilter
from hessian_spectra.state import ModelSnapshot, changed_parameters_error

logger = logging.getLogger("hessian_spectra")

__all__ = ["FD_EPS", "HessianOperator", "HvpMethod", "LossFn", "VmapFallbackWarning"]

HvpMethod = Literal["autograd", "finite_difference"]
LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar``: the mean loss of one batch."""

_METHODS = ("autograd", "finite_difference")


def _bytes(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class HessianOperator(ModelOperator):
    """Hessian of ``loss_fn(model, batch)`` averaged over a dataset, by products.

    .. math::

        H v = \\sum_b \\frac{n_b}{N} \\nabla^2_\\theta L_b(\\theta)\\, v

    Args:
        model: the network; never changed (see "Never touch the model" in the docs).
        dataloader: an iterable of batches (a list, a ``DataLoader``, a generator).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the batch's
            mean-reduced loss.
        param_filter: which parameters (``match_names``, ``match_regex`` or any
            ``(name, param) -> bool``); default all with ``requires_grad``.
        full_dataset: use every batch (default); ``False`` uses ``num_batches``
            (default 1).
        num_batches: use only the first ``num_batches`` batches.
        microbatch_size: split batches into chunks of at most this many rows
            (weights follow the chunks' sample counts; results equal up to rounding).
        batch_size_fn: ``batch -> number of samples`` for the weights ``n_b / N``
            (e.g. non-padding tokens); default: the leading dimension of the
            batch's first tensor.
        method: ``"autograd"`` (exact, default) or ``"finite_difference"``
            (``(g(θ+εv) − g(θ−εv)) / 2ε``; no double-backward graph).
        backend: ``None`` or a :class:`~hessian_spectra.linalg.SingleDeviceBackend`
            (hessian-eigenthings' argument; the algorithms take theirs).
        fd_eps: finite-difference step length ``||εv||`` in parameter space;
            default per dtype from :data:`FD_EPS` (about ``eps_mach^(1/3)``).
        seed: seeds dropout per batch, so every product sees the same masks and
            the operator is one fixed symmetric matrix; ``None`` draws a random
            seed. Read at product time: ``op.seed`` may be set later.
        cache: keep the batches in memory between products (see
            :class:`~hessian_spectra.data.WeightedBatches`).
        microbatch_unsafe: allow ``microbatch_size`` to split batches of a model
            that couples a batch's samples (BatchNorm in train mode), which
            changes the matrix; without it that raises ``ValueError``.

    Attributes:
        model, params, names, layout, batches, seed: as for every model
            operator (:class:`~hessian_spectra.operators._model.ModelOperator`):
            the model, the selected parameters, their names, their
            :class:`~hessian_spectra.params.ParamLayout` in the flat vector
            (the order of ``model.named_parameters()``), the
            :class:`~hessian_spectra.data.WeightedBatches` and the dropout seed.
        max_block: the most vectors pushed through one second backward;
            larger blocks are done in chunks that share the forward and first
            backward.
        block_bytes: the memory one chunk of rows may take. A chunk holds at
            most ``block_bytes // (2 s + 16 v)`` rows (``s``: the bytes the
            batch's graph saves, counted while it is built; ``v``: one
            parameter vector), at least 1 and at most ``max_block``. The default
            ``None`` ties it to the model's training step: ``2 (s + 4 v)``
            (:func:`~hessian_spectra.operators._chunks.default_budget`), which is
            one row, so a block peaks at about the memory of one product; raise
            it to vmap rows together.
        block_rows: the rows per chunk of the last batch of the last product.
        block_mechanism: how the second backward runs over a chunk's rows:
            ``"auto"`` (default: one vmapped backward for a chunk of two or
            more rows, which only a raised ``block_bytes`` gives, else one
            backward per row; never timed, so the same on every run), ``"vmap"``
            or ``"loop"``. An operation without a vmap rule makes it ``"loop"``
            (with a ``VmapFallbackWarning``).
        graph_cache_bytes: inside :meth:`keep_graphs` (which every algorithm
            opens around its products), keep each batch's differentiable gradient
            (the graph of its forward and first backward) between products while,
            all batches together, the tensors the graphs save fit in this many
            bytes (default 256 MiB; ``0`` keeps nothing). Later products of the
            block then cost only their second backward. A graph is used again
            only for the same batch tensors (memory, shapes, versions). The
            graphs are dropped when the outermost block closes (or by
            :meth:`clear_graphs`); outside a block every product builds them
            afresh from the model, loss and data as they are.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hessian_spectra.operators.hessian import HessianOperator
        >>> model = nn.Linear(3, 1, bias=False)
        >>> X = torch.eye(3)
        >>> data = [(X, torch.zeros(3, 1))]
        >>> loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> op = HessianOperator(model, data, loss)
        >>> op.to_dense()  # 2/N X^T X
        tensor([[0.6667, 0.0000, 0.0000],
                [0.0000, 0.6667, 0.0000],
                [0.0000, 0.0000, 0.6667]])
    """

    max_block: int = 32
    block_bytes: int | None = None
    graph_cache_bytes: int = 256 * 2**20

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        loss_fn: LossFn,
        *,
        param_filter: ParamFilter | None = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        method: HvpMethod = "autograd",
        fd_eps: float | None = None,
        backend: LinAlgBackend | None = None,
        seed: int | None = 0,
        cache: bool | None = None,
        microbatch_unsafe: bool = False,
    ) -> None:
        check_backend(backend, type(self).__name__)
        check_loss_fn(loss_fn)
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        check_fd_eps(fd_eps)
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
        if self.batches.total_samples <= 0:
            raise ValueError(
                "the dataloader's batches hold 0 samples (by batch_size_fn); nothing to average"
            )
        self.method: HvpMethod = method
        self.fd_eps = float(fd_eps) if fd_eps is not None else default_fd_eps(self._dtype)
        self.loss_fn = loss_fn
        self.block_mechanism: str = "auto"
        self._all_kept = False  # the last product took every batch's graph from the cache
        self.block_rows = 0
        self._graph_cache = GraphCache(self.graph_cache_bytes)
        self._saved_bytes: dict[Any, int] = {}  # batch shapes -> bytes a gradient graph saves
        # parameter versions when the kept graphs were built (an in-place write bumps them)
        self._graph_versions: tuple[int, ...] | None = None

    # -- CurvatureOperator ---------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        if not isinstance(self.max_block, int) or self.max_block < 1:
            raise ValueError(f"max_block must be a positive int, got {self.max_block!r}")
        if self.block_mechanism not in MECHANISMS:
            raise ValueError(
                f"block_mechanism must be one of {MECHANISMS}, got {self.block_mechanism!r}"
            )
        if self._follow_params():  # a replaced Parameter: graphs built before are stale
            self._graph_cache.clear()
        fd = self.method == "finite_difference"
        if not fd:
            out = self._from_kept_graphs(V)
            if out is not None:
                return out
        with self._guard(perturbed=fd) as snap:
            for p in self.params:  # flags are restored on exit
                if not p.requires_grad:
                    p.requires_grad_(True)
            V = V.detach()
            if V.is_inference():  # a normal tensor, also when V was made under inference_mode
                V = V.clone()
            parts = self.layout.split(V)
            product = self._finite_difference if fd else self._autograd
            out = self._joined(product(parts, snap, FiniteWatch())).to(V.dtype)
            self._check_finite(out, V, snap, lambda watch: product(parts, snap, watch))
            self._finish_usage_check()
            return out

    def _from_kept_graphs(self, V: Tensor) -> Tensor | None:
        """The product from graphs kept inside :meth:`keep_graphs`, without the guard,
        or ``None`` when a graph must be built (then the guarded path runs).

        With every batch's graph kept, a product is only the second backward passes:
        no forward runs, so nothing in the model (modes, buffers, RNG, gradients) can
        change, and the per-product guard (a copy and comparison of the parameters, the
        RNG states) is skipped. It applies only while the parameters are the objects
        and versions the graphs were built from (an in-place write bumps the version)
        and all require grad; a non-finite result is computed again on the guarded
        path, which finds the batch that brought it.
        """
        cache = self._graph_cache
        cache.set_budget(self.graph_cache_bytes)
        if not self._graph_scopes or not cache.graphs:
            return None
        if self._graph_versions != tuple(p._version for p in self.params):
            cache.clear()  # a parameter was written in place: the graphs are stale
            return None
        if (
            self._usage_pending()
            or torch.is_inference_mode_enabled()
            or not all(p.requires_grad for p in self.params)
        ):
            return None
        kept = [(wb, cache.get(wb.index, wb.batch)) for wb in self.batches]
        if any(k is None for _, k in kept):
            return None
        self._all_kept = True
        V = V.detach()
        parts = self.layout.split(V)
        graphs = ((wb, k[0], k[1]) for wb, k in kept if k is not None)
        with torch.enable_grad():
            acc = self._accumulate(parts, graphs, FiniteWatch())
        out = self._joined(acc).to(V.dtype)
        return out if all_finite(out) else None

    def _accumulate(
        self,
        parts: list[Tensor],
        graphs: Iterable[tuple[WeightedBatch, Any, int]],
        watch: FiniteWatch,
    ) -> Tensor:
        """``sum_b w_b H_b V`` as one ``(k, n)`` tensor, from each batch's differentiable
        gradient (and the bytes its graph saves), the rows in chunks within the memory
        budget."""
        # one (k, n) accumulator, viewed per parameter (no second copy to join them);
        # half-precision products add up over batches in float32
        k, like = parts[0].shape[0], parts[0]
        flat = torch.zeros(k, self.size, dtype=_accumulator(like.dtype), device=like.device)
        acc = self.layout.split(flat)
        views = all(
            a.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for a in acc
        )
        if not views:  # (never for these layouts) separate tensors, joined at the end
            acc = [a.clone() for a in acc]
        vector_bytes = self.size * self._dtype.itemsize
        budget = budget_bytes(self.block_bytes)
        kept = self._graph_cache.graphs
        for wb, grads, saved in graphs:
            # a graph nobody keeps is freed by the last row's backward as it goes
            release = kept.get(wb.index, (None, None))[1] is not grads
            self._add_rows(acc, grads, saved, parts, wb.weight, budget, vector_bytes, release)
            watch.note(wb, acc)
            del grads  # free the graph before the next batch (unless the cache keeps it)
        return flat if views else self.layout.join(acc, batch_dims=1)

    def _joined(self, out: Tensor | list[Tensor]) -> Tensor:
        """The ``(k, n)`` product: ``out`` itself, or its per-parameter pieces joined."""
        return out if isinstance(out, Tensor) else self.layout.join(out, batch_dims=1)

    def _add_rows(
        self,
        acc: list[Tensor],
        grads: Any,
        saved: int,
        parts: list[Tensor],
        weight: float,
        budget: int | None,
        vector_bytes: int,
        release: bool = False,
    ) -> None:
        """Add ``weight`` times the batch's products of every row of ``parts`` to ``acc``,
        in chunks of rows within the memory budget."""
        k = parts[0].shape[0]
        rows = rows_per_pass(saved, vector_bytes, budget, self.max_block)
        self.block_rows = rows
        for start in range(0, k, rows):
            stop = min(k, start + rows)
            hv, self.block_mechanism = block_hvp(
                grads,
                self.params,
                [v[start:stop] for v in parts],
                mechanism=self.block_mechanism,
                release=release and stop == k,
            )
            for a, h in zip(acc, hv, strict=True):
                if h is not None:
                    a[start:stop].add_(h, alpha=weight)

    # -- products --------------------------------------------------------------------
    def _loss(self, wb: WeightedBatch, snap: ModelSnapshot) -> Tensor:
        snap.reset_buffers()  # every forward starts from the same buffers
        return checked_loss(self.loss_fn, self.model, wb.batch, wb.index)

    def _autograd(self, parts: list[Tensor], snap: ModelSnapshot, watch: FiniteWatch) -> Tensor:
        """One forward and one ``create_graph`` backward per batch, then the
        block's rows in chunks of ``max_block`` from that graph."""
        cache = self._graph_cache
        cache.set_budget(self.graph_cache_bytes)
        self._all_kept = True

        def graphs() -> Iterator[tuple[WeightedBatch, Any, int]]:
            for wb in self.batches:
                kept = cache.get(wb.index, wb.batch)
                if kept is None:
                    self._all_kept = False
                    with self._rng(wb.index):  # only a forward draws random numbers
                        grads, saved = self._differentiable_gradient(wb, snap)
                else:
                    grads, saved = kept
                self._note_used(grads)
                yield wb, grads, saved

        return self._accumulate(parts, graphs(), watch)

    def _differentiable_gradient(
        self, wb: WeightedBatch, snap: ModelSnapshot
    ) -> tuple[tuple[Tensor | None, ...], int]:
        """``dL_b/dθ`` with its graph (forward + ``create_graph`` backward), offered to
        the graph cache inside :meth:`keep_graphs`, and the bytes the graph saves."""
        cache = self._graph_cache
        grads = gradient(self._loss(wb, snap), self.params, create_graph=True)
        key = tuple(
            (tuple(t.shape), t.dtype) for t in pytree.tree_leaves(wb.batch) if isinstance(t, Tensor)
        )
        saved = self._saved_bytes.get(key)
        if saved is None:  # the same for every batch of these shapes: walk one graph
            saved = self._saved_bytes[key] = GraphCache.saved_bytes(grads, self.params)
        if self._graph_scopes:
            cache.offer(wb.index, wb.batch, grads, saved)
            self._graph_versions = tuple(p._version for p in self.params)
        return grads, saved

    @property
    def product_mechanisms(self) -> tuple[str, ...]:
        return (self.block_mechanism,)

    @property
    def block_row_cost(self) -> float | None:
        """``1.0`` after a product that took every batch's graph from the cache and looped
        over the rows (``block_mechanism="loop"``, or chunks of one row): a block then
        shares nothing but the fixed cost of a call. ``None`` otherwise: while graphs are
        built a block shares them, and what vmapped rows share is not known."""
        looped = self.block_mechanism == "loop" or self.block_rows == 1
        if self._all_kept and self.method == "autograd" and looped:
            return 1.0
        return None

    def clear_graphs(self) -> None:
        """Drop the graphs kept inside :meth:`keep_graphs` (see ``graph_cache_bytes``)."""
        self._graph_cache.clear()

    def _finite_difference(
        self, parts: list[Tensor], snap: ModelSnapshot, watch: FiniteWatch
    ) -> list[Tensor]:
        """Central differences, one vector at a time (each needs its own θ ± εv).

        The batches are the outer loop, so each batch is read once per block;
        the parameters are set to ``θ ± εv`` from the saved ``θ`` (no rounding
        drift) and restored bit-exactly by :func:`~hessian_spectra.state.preserved_model`.
        """
        k = parts[0].shape[0]
        acc = [torch.zeros_like(v, memory_format=torch.contiguous_format) for v in parts]
        wide = torch.float32 if self._device.type == "mps" else torch.float64  # no float64 on MPS
        sq = sum(v.reshape(k, -1).to(wide).pow(2).sum(dim=1) for v in parts)
        norms = torch.as_tensor(sq).sqrt().tolist()
        bad = [r for r, n in enumerate(norms) if not math.isfinite(n)]
        if bad:
            raise ValueError(
                f"finite differences need finite vectors; rows {bad[:5]} hold inf or nan"
            )
        self._kept: list[Tensor] = []  # per parameter: still at the values set (a bool tensor)
        for wb in self.batches:
            for r in range(k):
                if norms[r] == 0.0:  # H 0 = 0
                    continue
                h = self.fd_eps / norms[r]
                g_plus = self._gradient_at(wb, snap, parts, r, h)
                g_minus = self._gradient_at(wb, snap, parts, r, -h)
                self._note_used(g_plus)
                for a, gp, gm in zip(acc, g_plus, g_minus, strict=True):
                    if gp is not None and gm is not None:
                        a[r].add_(gp - gm, alpha=wb.weight / (2.0 * h))
            watch.note(wb, acc)
        if self._kept:  # a parameter not at the value set for a gradient: the forward wrote it
            flags = torch.stack([f.to(self._kept[0].device) for f in self._kept]).tolist()
            changed = [n for n, ok in zip(self.names, flags, strict=True) if not ok]
            if changed:
                raise changed_parameters_error(self.model, changed, restored=True)
        return acc

    def _gradient_at(
        self, wb: WeightedBatch, snap: ModelSnapshot, parts: list[Tensor], r: int, step: float
    ) -> tuple[Tensor | None, ...]:
        with torch.no_grad():
            for p, base, v in zip(self.params, snap.params, parts, strict=True):
                p.data.copy_(base).add_(v[r], alpha=step)  # .data: no version bump
        with self._rng(wb.index):
            g = gradient(self._loss(wb, snap), self.params)
        with torch.no_grad():  # did the forward leave them where they were set? (bitwise)
            flags = [
                (_bytes(p) == _bytes(base.add(v[r], alpha=step))).all()
                for p, base, v in zip(self.params, snap.params, parts, strict=True)
            ]
        self._kept = (
            [a & b for a, b in zip(self._kept, flags, strict=True)] if self._kept else flags
        )
        return g

    _checks_finite = True

    def _product_hint(self) -> str:
        if self.method == "finite_difference":
            return (
                "finite differences take the gradient at theta +- eps v, where it is not finite; "
                "a smaller fd_eps or method='autograd' may help"
            )
        return "a second derivative overflows in the operator's dtype or is infinite here"

    def _diagnostic_loss(self, wb: WeightedBatch) -> tuple[Tensor, Tensor | None]:
        return checked_loss(self.loss_fn, self.model, wb.batch, wb.index), None

    def __repr__(self) -> str:
        return (
            f"HessianOperator(size={self.size}, dtype={self.dtype}, device={self.device}, "
            f"method={self.method!r}, batches={self.batches.num_batches}, "
            f"samples={self.batches.total_samples})"
        )


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp16/bf16 (a sum over batches in half precision loses the small
    batches' terms), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
