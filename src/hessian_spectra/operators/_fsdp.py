r"""Hessian products on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

A sharded model has no double backward through its collectives, so the product
is a central difference of gradients (no second-order graph):

.. math::

    H v \approx \frac{g(\theta + h v) - g(\theta - h v)}{2h},
    \qquad h = \frac{\varepsilon}{\lVert v \rVert},

with :math:`g = \sum_{b} \frac{n_b}{N} \nabla L_b` over the batches of all
ranks. Each rank perturbs only its own shard of :math:`\theta` (FSDP gathers the
perturbed parameters in its forward), and FSDP's reduce-scatter leaves each rank
the shard of the gradient that matches its shard of :math:`v`: the vectors are
sharded like the parameters and :meth:`FSDPHessianOperator.sharded_matmat`
never forms a full vector.

The operator itself presents the full flat vector, so every algorithm runs on
it unchanged: a product slices this rank's shard out of the (replicated) block,
runs the sharded product and all-gathers the ``(k, n_r)`` result shards. The
trade-off: vectors and the algorithm's Krylov basis are replicated (``k n``
and about ``ncv n`` numbers per rank) while parameters, gradients and
activations stay sharded; communication adds one all-gather of ``k n / W``
numbers per block to FSDP's own all-gathers and reduce-scatters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from hessian_spectra.data import BatchSizeFn, WeightedBatch, WeightedBatches
from hessian_spectra.linalg.backend import ShardedBackend
from hessian_spectra.operators._collectives import (
    agree,
    broadcast_seed,
    check_backend,
    input_checksums,
    require_group,
)
from hessian_spectra.operators._hvp import check_fd_eps, checked_loss, default_fd_eps
from hessian_spectra.operators._model import ModelOperator, check_loss_fn
from hessian_spectra.operators.base import CurvatureOperator
from hessian_spectra.params import ParamFilter, ParamLayout
from hessian_spectra.state import ModelSnapshot

__all__ = ["FSDPHessianOperator", "ShardedFSDPHessian"]


def _sharding(params: list[nn.Parameter], who: str) -> Any:
    """The 1-D device mesh shared by ``params``, all DTensors with placement ``Shard(0)``."""
    from torch.distributed.tensor import DTensor, Shard

    meshes = []
    for p in params:
        if not isinstance(p, DTensor):
            raise TypeError(
                f"{who} needs a model sharded with torch.distributed.fsdp.fully_shard (its "
                f"parameters are DTensors); got a plain {type(p).__name__}. Call "
                "fully_shard(model) (and on its blocks) first, or use DDPHessianOperator for a "
                "replicated model"
            )
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{who} supports parameters sharded along dim 0 on a 1-D mesh (fully_shard's "
                f"default); got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                "mesh (HSDP or a custom shard_placement_fn)"
            )
        meshes.append(p.device_mesh)
    if any(m != meshes[0] for m in meshes):
        raise ValueError(f"{who}: the selected parameters are sharded over different meshes")
    return meshes[0]


def _divide_factor(model: nn.Module, world: int) -> float:
    """The factor FSDP divides reduced gradients by (``world`` unless set otherwise)."""
    factors = set()
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        for group in getattr(get_state(), "_fsdp_param_groups", []):
            f = getattr(group, "gradient_divide_factor", None)
            factors.add(float(world) if f is None else float(f))
    if len(factors) > 1:
        raise ValueError(
            f"the FSDP modules divide gradients by different factors {sorted(factors)}; "
            "use one set_gradient_divide_factor() for the whole model"
        )
    return factors.pop() if factors else float(world)


class FSDPHessianOperator(ModelOperator):
    r"""Finite-difference Hessian of a ``fully_shard``-ed model over all ranks' data.

    Call on every rank with the same sharded model and that rank's own data
    shard. Products use only gradients (one forward and one backward per
    batch, vector and sign), so no double backward through FSDP's collectives
    is needed. The weights are ``n_b / N`` with ``N`` summed over all ranks;
    ranks with fewer batches run zero-weighted passes so that every rank takes
    part in the same number of FSDP collectives.

    Args:
        model: a module whose selected parameters ``fully_shard`` has sharded
            (DTensors with ``Shard(0)`` on a 1-D mesh). Left as it was: the
            parameter shards are restored bit-exactly, ``.grad`` tensors,
            buffers and modes too (the FSDP modules are left resharded).
        dataloader: this rank's batches.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the batch's mean loss.
        param_filter, full_dataset, num_batches, microbatch_size,
            batch_size_fn, cache: as for :class:`~hessian_spectra.operators.HessianOperator`.
        fd_eps: the step ``||h v||`` in parameter space (default per dtype,
            about ``eps_mach^(1/3)``: ``6e-6`` in float64).
        seed: dropout seed; ``None`` takes rank 0's random draw everywhere.
        check_inputs: verify (one small all-reduce per block) that every rank
            passed the same block to :meth:`matmat`.
        microbatch_unsafe: as for :class:`~hessian_spectra.operators.HessianOperator`.

    Attributes:
        model, params, names, layout, batches, seed: as for every model
            operator (:class:`~hessian_spectra.operators._model.ModelOperator`);
            ``layout`` places the full (unsharded) parameters in the flat vector.
        local_layout: the same for this rank's shards.
        local_size: ``n_r``, this rank's share of the flat vector.
        rank, world_size, process_group: the mesh's group.

    Raises:
        RuntimeError: no process group is initialised.
        TypeError: the parameters are not DTensors (the model is not sharded).
        ValueError: the ranks disagree on the parameter set, dtype or device type.
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        param_filter: ParamFilter | None = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        fd_eps: float | None = None,
        seed: int | None = 0,
        cache: bool | None = None,
        check_inputs: bool = True,
        microbatch_unsafe: bool = False,
    ) -> None:
        require_group(None, type(self).__name__)
        check_loss_fn(loss_fn)
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
        if seed is None:  # every rank takes rank 0's draw
            self.seed = int(self._records[0]["seed"])
        self.loss_fn = loss_fn
        self.fd_eps = float(fd_eps) if fd_eps is not None else default_fd_eps(self._dtype)
        self.check_inputs = bool(check_inputs)
        self._passes = max(rec["passes"] for rec in self._records)
        self._divisor = _divide_factor(model, self.world_size)
        self._plan([rec["rows"] for rec in self._records])

    def _agreed_batches(self, make: Callable[[], WeightedBatches]) -> WeightedBatches:
        """Build this rank's batches and agree with the other ranks on the setup.

        One ``all_gather_object`` (:func:`agree`) compares the parameter sets,
        dtypes and device types, sums the sample counts into the global ``N``
        and collects what :meth:`_plan` needs (``self._records``, one per rank).
        """
        who = type(self).__name__
        mesh = _sharding(self.params, who)
        group = mesh.get_group()
        _, rank, world = require_group(group, who)
        if mesh.get_local_rank() != rank:
            raise ValueError(
                f"{who}: the mesh coordinate of rank {rank} is {mesh.get_local_rank()}; "
                "expected a mesh laid out in rank order"
            )
        locals_ = [p.to_local() for p in self.params]  # type: ignore[attr-defined]
        self._device = locals_[0].device

        def _build() -> tuple[WeightedBatches, dict[str, Any]]:
            wb = make()
            if wb.total_samples <= 0:
                raise ValueError("this rank's batches hold 0 samples; give every rank data")
            return wb, {
                "names": list(self.names),
                "shapes": [tuple(p.shape) for p in self.params],
                "dtype": str(self._dtype),
                "device_type": self._device.type,
                "samples": wb.total_samples,
                "passes": sum(1 for _ in wb),
                "rows": [int(t.shape[0]) if t.dim() else 1 for t in locals_],
                "seed": self.seed,
            }

        batches, self._records = agree(_build, group=group, rank=rank, world=world, who=who)
        check_backend(group, self._device.type, who)
        batches.set_total(sum(rec["samples"] for rec in self._records))
        # self.layout has the global shapes (the full flat vector); this is the shard's
        self.local_layout = ParamLayout.of(self.names, locals_)
        self.process_group, self.rank, self.world_size = group, rank, world
        return batches

    def _plan(self, rows: list[list[int]]) -> None:
        """Where each rank's shard of each parameter lies in the full flat vector."""
        W = self.world_size
        self._local_sizes = []
        self._pieces: list[tuple[int, int, int]] = []  # (rank, offset in its shard, length)
        local_off = [0] * W
        for j, shape in enumerate(self.layout.shapes):
            per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
            if sum(rows[r][j] for r in range(W)) != (shape[0] if len(shape) else 1):
                raise ValueError(
                    f"the shards of {self.names[j]} do not add up to its shape {tuple(shape)}"
                )
            for r in range(W):
                length = rows[r][j] * per_row
                self._pieces.append((r, local_off[r], length))
                local_off[r] += length
        self._local_sizes = local_off
        self._own = [(off, n) for r, off, n in self._pieces if r == self.rank]
        self._full_slices: list[tuple[int, int]] = []
        pos = 0
        for r, _, n in self._pieces:
            if r == self.rank:
                self._full_slices.append((pos, n))
            pos += n

    # -- CurvatureOperator -------------------------------------------------------------
    @property
    def local_size(self) -> int:
        return self._local_sizes[self.rank]

    def shard(self, V: Tensor) -> Tensor:
        """This rank's ``(k, n_r)`` shard of a full ``(k, n)`` block (no communication)."""
        return torch.cat([V[:, s : s + n] for s, n in self._full_slices], dim=1)

    def gather(self, V_local: Tensor) -> Tensor:
        """The full ``(k, n)`` block from every rank's ``(k, n_r)`` shard (one all-gather)."""
        import torch.distributed as dist

        k = V_local.shape[0]
        width = max(self._local_sizes)
        padded = torch.zeros(k, width, dtype=V_local.dtype, device=V_local.device)
        padded[:, : V_local.shape[1]] = V_local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.process_group)
        return torch.cat([parts[r][:, o : o + n] for r, o, n in self._pieces], dim=1)

    def common_seed(self, seed: Any) -> Any:
        """``seed``, or for ``None`` one draw of rank 0 broadcast to every rank (a collective:
        every rank's algorithm calls it at the same point)."""
        return broadcast_seed(None, group=self.process_group) if seed is None else seed

    def sharded(self) -> ShardedFSDPHessian:
        """This Hessian on vectors split across the ranks like the parameters.

        Every algorithm runs on the returned operator unchanged: each rank holds only
        its ``(k, n_r)`` slice of the algorithm's vectors (its Krylov basis too), and
        inner products and norms are summed over the ranks
        (:class:`~hessian_spectra.linalg.ShardedBackend`). Results' eigenvectors are
        this rank's slices; :meth:`gather` assembles full ones.
        """
        return ShardedFSDPHessian(self)

    def _matmat(self, V: Tensor) -> Tensor:
        if self.check_inputs:
            self._check_same(V)
        norms = V.detach().to(torch.float64).norm(dim=1).tolist()  # identical on every rank
        return self.gather(self._sharded_product(self.shard(V), norms))

    def sharded_matmat(self, V_local: Tensor) -> Tensor:
        """``(k, n_r) -> (k, n_r)``: this rank's shard of ``H V`` from its shard of ``V``.

        Vectors stay sharded like the parameters (nothing of size ``n`` is
        formed); the norms ``||v||`` that set the step take one all-reduce of
        ``k`` numbers. Call it on every rank with the same ``k``.
        """
        import torch.distributed as dist

        if V_local.dim() != 2 or V_local.shape[1] != self.local_size:
            raise ValueError(
                f"sharded_matmat expects a (k, {self.local_size}) block of this rank's "
                f"shard, got {tuple(V_local.shape)}"
            )
        sq = V_local.detach().to(torch.float64).pow(2).sum(dim=1)
        dist.all_reduce(sq, group=self.process_group)
        out = self._sharded_product(V_local.to(self.dtype), sq.sqrt().tolist())
        self.num_matvecs += V_local.shape[0]
        return out

    def _check_same(self, V: Tensor) -> None:
        import torch.distributed as dist

        k = V.shape[0]
        sums = torch.zeros(self.world_size, k, dtype=torch.float64, device=V.device)
        sums[self.rank] = input_checksums(V, torch.float64)
        dist.all_reduce(sums, group=self.process_group)
        differ = (sums != sums[0]).any(dim=1)
        if bool(differ.any()):
            raise RuntimeError(
                f"FSDPHessianOperator: the ranks passed different blocks (ranks "
                f"{differ.nonzero().flatten().tolist()} differ from rank 0); every rank must run "
                "the same algorithm on the same vectors: pass seed=0 or seed=broadcast_seed() to "
                "the algorithm, not seed=None"
            )

    # -- the product ------------------------------------------------------------------
    def _sharded_product(self, V_local: Tensor, norms: list[float]) -> Tensor:
        bad = [r for r, x in enumerate(norms) if not math.isfinite(x)]
        if bad:
            raise ValueError(
                f"finite differences need finite vectors; rows {bad[:5]} hold inf or nan"
            )
        k = V_local.shape[0]
        parts = self.local_layout.split(V_local.detach())
        acc = torch.zeros(k, self.local_size, dtype=self.dtype, device=self.device)
        passes = list(self.batches)
        passes += [WeightedBatch(passes[0].index, passes[0].batch, 0, 0.0)] * (
            self._passes - len(passes)
        )
        all_params = list(self.model.parameters())
        grads = [p.grad for p in all_params]
        for p in all_params:
            p.grad = None  # FSDP accumulates into .grad; restored below
        try:
            self._reshard()
            with torch.no_grad():
                shards = [p.to_local() for p in self.params]  # type: ignore[attr-defined]  # views
                saved = [s.clone() for s in shards]
            try:
                with self._guard(check_parameters=False) as snap:  # shards restored below
                    for wb in passes:
                        for r in range(k):
                            if norms[r] == 0.0:  # H 0 = 0, the same decision on every rank
                                continue
                            h = self.fd_eps / norms[r]
                            for sign in (1.0, -1.0):
                                with torch.no_grad():
                                    for s, base, v in zip(shards, saved, parts, strict=True):
                                        s.copy_(base).add_(v[r], alpha=sign * h)
                                acc[r].add_(self._gradient(wb, snap), alpha=sign / (2.0 * h))
            finally:
                with torch.no_grad():
                    for s, base in zip(shards, saved, strict=True):
                        s.copy_(base)
        finally:
            for p, g in zip(all_params, grads, strict=True):
                p.grad = g
        return acc

    def _gradient(self, wb: WeightedBatch, snap: ModelSnapshot) -> Tensor:
        """This rank's shard of ``w_b ∇L_b`` summed over ranks (FSDP's reduce-scatter)."""
        snap.reset_buffers()
        self._reshard()
        with self._rng(wb.index):
            loss = checked_loss(self.loss_fn, self.model, wb.batch, wb.index)
            # FSDP averages over ranks (divides by its factor): scale back to a sum
            (loss * (wb.weight * self._divisor)).backward()
        out = []
        for p, s in zip(self.params, self.local_layout.shapes, strict=True):
            g: Any = p.grad  # a DTensor: this rank's shard via to_local()
            if g is None:
                out.append(torch.zeros(s, dtype=self.dtype, device=self.device))
            else:
                out.append(g.to_local().detach().reshape(s))
        for p in self.model.parameters():
            p.grad = None
        return self.local_layout.join(out)

    def _reshard(self) -> None:
        """Reshard every FSDP module, so the next forward gathers the perturbed shards."""
        for m in self.model.modules():
            reshard = getattr(m, "reshard", None)
            if callable(reshard) and hasattr(m, "_get_fsdp_state"):
                reshard()

    def __repr__(self) -> str:
        return (
            f"FSDPHessianOperator(size={self.size}, local_size={self.local_size}, "
            f"dtype={self.dtype}, device={self.device}, rank={self.rank}/{self.world_size})"
        )


class ShardedFSDPHessian(CurvatureOperator):
    """:class:`FSDPHessianOperator` on vectors split across ranks (see
    :meth:`FSDPHessianOperator.sharded`): ``size`` is the full dimension ``n``, and the
    vectors each rank passes and receives are its ``(k, n_r)`` slices."""

    def __init__(self, full: FSDPHessianOperator) -> None:
        super().__init__()
        self.full = full
        self._backend = ShardedBackend(full.size, full.local_size, full.process_group)

    @property
    def size(self) -> int:
        return self.full.size

    @property
    def vector_length(self) -> int:
        return self.full.local_size

    @property
    def dtype(self) -> torch.dtype:
        return self.full.dtype

    @property
    def device(self) -> torch.device:
        return self.full.device

    @property
    def backend(self) -> ShardedBackend:
        return self._backend

    def common_seed(self, seed: Any) -> Any:
        return self.full.common_seed(seed)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.full.sharded_matmat(V)

    def gather(self, V_local: Tensor) -> Tensor:
        """The full ``(k, n)`` block from every rank's slice (one all-gather)."""
        return self.full.gather(V_local)

    def shard(self, V: Tensor) -> Tensor:
        """This rank's slice of a full ``(k, n)`` block."""
        return self.full.shard(V)

    def to_dense(self, *, chunk_size: int = 64, progress: bool = False) -> Tensor:
        return self.full.to_dense(chunk_size=chunk_size, progress=progress)

    def __repr__(self) -> str:
        return f"ShardedFSDPHessian(size={self.size}, local={self.vector_length}, rank={self.full.rank})"
