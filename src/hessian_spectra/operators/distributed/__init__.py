r"""Curvature operators across processes with ``torch.distributed``.

**Data parallel** (:class:`DDPHessianOperator`, :class:`DDPGGNOperator`,
:class:`DDPEmpiricalFisherOperator`, :class:`DDPMCFisherOperator`): each of the
``W`` ranks holds the whole model (plain or wrapped in
``DistributedDataParallel``) and its own shard of the data. With ``N`` the
number of samples over *all* shards, rank ``r`` computes its share

.. math::

    P_r = \sum_{b \in \text{shard}_r} \frac{n_b}{N}\, C_b V

of a block product (``C_b`` the batch's Hessian, GGN or Fisher) and one
``all_reduce(SUM)`` per block gives every rank

.. math::

    C V = \sum_r P_r = \sum_{\text{all } b} \frac{n_b}{N}\, C_b V ,

the single-process product over the union of the shards, weighted by sample
count, so unequal shards are exact. The reduced block is bit-identical on every
rank, so any algorithm run unchanged on every rank makes the same decisions
and returns the same result everywhere, provided its random probes are the same
(``seed=0`` or ``seed=broadcast_seed()``, never ``seed=None``); the operator
checks that every rank multiplied the same vectors, at no extra collective.

**Sharded models**: :class:`~hessian_spectra.operators._fsdp.FSDPHessianOperator`
(finite differences of gradients on a model sharded with ``fully_shard``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hessian_spectra.operators._collectives import (
    agree,
    broadcast_seed,
    check_backend,
    check_same_values,
    input_checksums,
    require_group,
    values_checksum,
)
from hessian_spectra.operators._finite import NonFiniteError
from hessian_spectra.operators._fsdp import FSDPHessianOperator
from hessian_spectra.operators.base import CurvatureOperator
from hessian_spectra.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from hessian_spectra.operators.ggn import GGNOperator
from hessian_spectra.operators.hessian import HessianOperator

__all__ = [
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    "DataParallelOperator",
    "FSDPHessianOperator",
    "broadcast_seed",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (or ``model``).

    The operators call this inner module directly: no DDP forward (which would
    broadcast buffers and arm its gradient hooks) and no ``.backward()`` (the
    hooks would all-reduce ``.grad``); products use ``torch.autograd.grad``
    and ``torch.func`` only, and this operator does its own single all-reduce.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, DistributedDataParallel | DataParallel):
        model = model.module
    return model


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(t, DTensor)


class DataParallelOperator(CurvatureOperator):
    r"""The sum over ranks of local operators weighted by the global sample count.

    Every rank builds a local operator over its own data shard (``build(module)``
    with the unwrapped module); the construction then agrees across ranks in
    one ``all_gather_object``: the local sample counts give the global ``N``
    (the local weights become ``n_b / N``), and the ranks must select the same
    parameters (names and shapes, and the same values, compared by checksum)
    with the same dtype on the same kind of device. A product is the local
    product plus one ``all_reduce(SUM)`` of the ``(k, n)`` block.

    Use the concrete classes (:class:`DDPHessianOperator`, ...); this base is
    public for wrapping another local operator that holds its data in a
    ``.batches`` :class:`~hessian_spectra.data.WeightedBatches`.

    Args:
        model: the model, plain or wrapped in ``DistributedDataParallel``.
        build: ``module -> local operator``, called with :func:`unwrap_model` of ``model``.
        seed: the local operator's dropout/sampling seed as given by the user:
            ``None`` is replaced by rank 0's draw, so all ranks use one seed.
        process_group: the ranks that share the data (default: all).
        check_inputs: verify in every product that all ranks multiply the same
            block (a checksum per vector rides in the same all-reduce); a
            mismatch raises ``RuntimeError`` on every rank.

    A local product that holds NaN or inf raises
    :class:`~hessian_spectra.operators.NonFiniteError` on every rank, not only on
    the rank whose shard brought it (a flag per rank rides in the same
    all-reduce), so no rank waits for a collective that never comes.
        per_rank_seed: give each rank its own seed derived from the common one
            (Monte-Carlo sampling: independent draws per shard).

    Attributes:
        local: this rank's operator (its products are this rank's share).
        model: the unwrapped module.
        names, layout: the selected parameters and their place in the flat vector.
        rank, world_size, process_group: the group.
        local_samples, global_samples: ``Σ n_b`` over this shard and over all.
        reduce_dtype: dtype of the all-reduce (float32 for 16-bit operators).
    """

    def __init__(
        self,
        model: nn.Module,
        build: Callable[[nn.Module], CurvatureOperator],
        *,
        seed: int | None = 0,
        process_group: Any = None,
        check_inputs: bool = True,
        per_rank_seed: bool = False,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        group, rank, world = require_group(process_group, who)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        inner = unwrap_model(model)

        def _build() -> tuple[CurvatureOperator, dict[str, Any]]:
            if any(_is_dtensor(p) for p in inner.parameters()):
                raise TypeError(
                    f"{who} needs every rank to hold whole parameters, but the model's are "
                    "DTensors (sharded with fully_shard); use FSDPHessianOperator for a "
                    "sharded model"
                )
            op = build(inner)
            batches = getattr(op, "batches", None)
            if batches is None or not hasattr(batches, "set_total"):
                raise TypeError(f"{type(op).__name__} keeps no .batches with set_total()")
            return op, {
                "names": list(op.layout.names),  # type: ignore[attr-defined]
                "shapes": [tuple(s) for s in op.layout.shapes],  # type: ignore[attr-defined]
                "dtype": str(op.dtype),
                "device_type": op.device.type,
                "samples": int(batches.total_samples),
                "seed": int(getattr(op, "seed", 0)),
                "values": values_checksum(op.params),  # type: ignore[attr-defined]
            }

        local, records = agree(_build, group=group, rank=rank, world=world, who=who)
        check_same_values(records, who)
        check_backend(group, local.device.type, who)
        self.local: CurvatureOperator = local
        self.model = inner
        self.names, self.layout = local.names, local.layout
        self.process_group, self.rank, self.world_size = group, rank, world
        self.local_samples = int(records[rank]["samples"])
        self.global_samples = sum(int(rec["samples"]) for rec in records)
        local.batches.set_total(self.global_samples)
        if seed is None and hasattr(local, "seed"):
            local.seed = int(records[0]["seed"])
        if per_rank_seed and hasattr(local, "seed"):
            local.seed = (int(local.seed) * 1_000_003 + rank + 1) & 0x7FFFFFFFFFFFFFFF
        self.check_inputs = bool(check_inputs)
        self.symmetric = local.symmetric
        self.reduce_dtype = (
            torch.float32 if local.dtype in (torch.float16, torch.bfloat16) else local.dtype
        )

    @property
    def size(self) -> int:
        return self.local.size

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def product_mechanisms(self) -> tuple[str, ...]:
        return self.local.product_mechanisms

    def common_seed(self, seed: Any) -> Any:
        """``seed``, or for ``None`` one draw of rank 0 broadcast to every rank (a collective:
        every rank's algorithm calls it at the same point)."""
        return broadcast_seed(None, group=self.process_group) if seed is None else seed

    @contextlib.contextmanager
    def keep_graphs(self) -> Iterator[None]:
        """The local operator's :meth:`~CurvatureOperator.keep_graphs` block."""
        with self.local.keep_graphs():
            yield

    def clear_graphs(self) -> None:
        self.local.clear_graphs()

    def _matmat(self, V: Tensor) -> Tensor:
        import torch.distributed as dist

        k, n = V.shape
        failure: NonFiniteError | None = None
        try:
            part = self.local.matmat(V).reshape(-1)
        except NonFiniteError as err:  # the other ranks learn of it in the same all-reduce
            failure, part = err, torch.zeros(k * n, dtype=self.dtype, device=V.device)
        rd = self.reduce_dtype
        W = self.world_size
        # layout: the product, then (with check_inputs) W x k input checksums, then W
        # flags of ranks whose local product was non-finite
        sums_at = k * n + (W * k if self.check_inputs else 0)
        buf = torch.zeros(sums_at + W, dtype=rd, device=part.device)
        buf[: k * n] = part
        buf[sums_at + self.rank] = float(failure is not None)
        if self.check_inputs:
            slot = k * n + self.rank * k
            buf[slot : slot + k] = input_checksums(V, rd)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        failed = buf[sums_at:].nonzero().flatten().tolist()
        if failed:
            who = type(self).__name__
            if failure is not None:
                raise NonFiniteError(f"{who} on rank {self.rank}: {failure}") from failure
            raise NonFiniteError(
                f"{who}: the product holds NaN or inf on ranks {failed} (each names the batch "
                "of its shard in its own error); no algorithm can use it"
            )
        if not self.check_inputs:
            return buf[: k * n].view(k, n).to(self.dtype)
        sums = buf[k * n : sums_at].view(W, k)
        differ = (sums != sums[0]).any(dim=1)
        if bool(differ.any()):
            ranks = differ.nonzero().flatten().tolist()
            raise RuntimeError(
                f"{type(self).__name__}: the ranks multiplied different vectors (ranks {ranks} "
                "differ from rank 0), so the all-reduced product mixes unrelated vectors. Every "
                "rank must run the same algorithm on the same vectors: an algorithm given "
                "seed=None draws different probes on each rank; pass seed=0 or "
                "seed=broadcast_seed(). Tiny differences from nondeterministic kernels also "
                "show here; pass check_inputs=False to accept them."
            )
        return buf[: k * n].view(k, n).to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device}, "
            f"rank={self.rank}/{self.world_size}, samples={self.local_samples}/"
            f"{self.global_samples}, local={type(self.local).__name__})"
        )


class _DataParallelLoss(DataParallelOperator):
    """A data-parallel ``_local_class(module, dataloader, loss_fn, seed=seed, **kwargs)``."""

    _local_class: ClassVar[Callable[..., CurvatureOperator]]

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        seed: int | None = 0,
        process_group: Any = None,
        check_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        make = type(self)._local_class
        super().__init__(
            model,
            lambda m: make(m, dataloader, loss_fn, seed=seed, **kwargs),
            seed=seed,
            process_group=process_group,
            check_inputs=check_inputs,
        )


class _DataParallelOutput(DataParallelOperator):
    """A data-parallel ``_local_class(module, dataloader, forward_fn, loss_of_output_fn, ...)``."""

    _local_class: ClassVar[Callable[..., CurvatureOperator]]
    _per_rank_seed: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        forward_fn: Callable[[nn.Module, Any], Tensor],
        loss_of_output_fn: Callable[[Tensor, Any], Tensor],
        *,
        seed: int | None = 0,
        process_group: Any = None,
        check_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        make = type(self)._local_class
        super().__init__(
            model,
            lambda m: make(m, dataloader, forward_fn, loss_of_output_fn, seed=seed, **kwargs),
            seed=seed,
            process_group=process_group,
            check_inputs=check_inputs,
            per_rank_seed=self._per_rank_seed,
        )


class DDPHessianOperator(_DataParallelLoss):
    r"""Hessian over the union of the ranks' data shards: ``Σ_b (n_b/N) ∇²L_b``, ``N`` global.

    Call it on every rank with the same model and that rank's own
    ``dataloader`` (e.g. over ``Subset(dataset, range(rank, len(dataset), world))``;
    a ``DistributedSampler`` repeats or drops samples to equalise the shards,
    which changes the dataset); shards may differ in size. Each product runs :class:`HessianOperator`'s
    product on the local shard and one ``all_reduce``; every rank receives the
    same block. Give algorithms an explicit seed (``seed=0`` or
    ``seed=broadcast_seed()``) so every rank draws the same probes.

    Args:
        model: the model, plain or wrapped in ``DistributedDataParallel`` (the
            inner module is used: parameter names are those of ``model.module``,
            and ``loss_fn`` receives the inner module).
        dataloader: this rank's batches (at least one, with at least one sample).
        loss_fn: ``loss_fn(module, batch) -> scalar``, the batch's mean loss.
        seed: dropout seed; ``None`` takes rank 0's random draw on every rank.
        process_group: the data-parallel group (default: all ranks).
        check_inputs: verify that every rank multiplies the same vectors.
        **kwargs: any other keyword of :class:`HessianOperator`
            (``param_filter``, ``method``, ``microbatch_size``, ``batch_size_fn``, ...).

    Raises:
        RuntimeError: no process group is initialised (the message says how to
            start one), or another rank failed to build its operator.
        ValueError: the ranks disagree on the parameter set, the parameter
            values, the dtype or the device type.

    Example:
        >>> # in every process of `torchrun --nproc_per_node=2 script.py`:
        >>> # dist.init_process_group("gloo")
        >>> # op = DDPHessianOperator(DDP(model), my_shard, supervised_loss(F.cross_entropy))
        >>> # res = lanczos(op, k=5, seed=broadcast_seed())   # same result on every rank
    """

    _local_class = HessianOperator


class DDPGGNOperator(_DataParallelOutput):
    r"""GGN ``Σ_b (n_b/N) J_bᵀ H_ℓ,b J_b`` over the union of the ranks' shards (see :class:`GGNOperator`).

    Args:
        model, dataloader, seed, process_group, check_inputs: as for
            :class:`DDPHessianOperator`.
        forward_fn, loss_of_output_fn: as for :class:`GGNOperator`.
        **kwargs: any other keyword of :class:`GGNOperator`.
    """

    _local_class = GGNOperator


class DDPEmpiricalFisherOperator(_DataParallelLoss):
    r"""Empirical Fisher ``(1/N) Σ_i g_i g_iᵀ`` over all samples of all ranks (see :class:`EmpiricalFisherOperator`).

    Args:
        model, dataloader, seed, process_group, check_inputs: as for
            :class:`DDPHessianOperator`.
        loss_fn: as for :class:`EmpiricalFisherOperator`.
        **kwargs: any other keyword of :class:`EmpiricalFisherOperator`.
    """

    _local_class = EmpiricalFisherOperator


class DDPMCFisherOperator(_DataParallelOutput):
    r"""Monte-Carlo Fisher over the union of the ranks' shards (see :class:`MCFisherOperator`).

    Each rank samples its targets from its own seed, derived from the common
    ``seed`` and its rank (``(seed * 1000003 + rank + 1) mod 2^63``), so the
    shards' draws are independent; the operator equals the sum over ranks of
    single-process MC Fisher operators with those seeds, weighted ``N_r / N``.

    Args:
        model, dataloader, seed, process_group, check_inputs: as for
            :class:`DDPHessianOperator`.
        forward_fn, loss_of_output_fn: as for :class:`MCFisherOperator`.
        **kwargs: any other keyword of :class:`MCFisherOperator` (``mc_samples``, ...).
    """

    _local_class = MCFisherOperator
    _per_rank_seed = True
