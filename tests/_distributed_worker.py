"""One rank of the distributed tests (run by tests/test_distributed.py, one process per rank).

``python tests/_distributed_worker.py OUTDIR SUITE`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; saves this rank's results to
``OUTDIR/rank{RANK}.pt`` for the test process to compare with single-process
references. The problem (model, shards, probes) is defined here and imported
by the test, so both sides build the same one.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

F64 = torch.float64
BATCH_SIZES = (7, 3, 5)  # unequal on purpose
SHARDS = {2: [[0], [1, 2]], 3: [[0], [1], [2]]}  # batch indices per rank


def all_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, 4, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g))
        for n in BATCH_SIZES
    ]


def shard(world: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = all_batches()
    return [data[i] for i in SHARDS[world][rank]]


def make_model(hidden: int = 6) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.7)
    return model


def probes(n: int, k: int = 3) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(2), dtype=F64)


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _bits(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        out.append(t.detach().clone())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(
        torch.equal(x.view(torch.int64), y.view(torch.int64)) for x, y in zip(a, b, strict=True)
    )


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as err:  # the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def data_parallel(res: dict[str, Any], world: int, rank: int, full: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from hessian_spectra.algorithms import lanczos
    from hessian_spectra.losses import supervised_forward, supervised_loss_of_output
    from hessian_spectra.operators.distributed import (
        DDPEmpiricalFisherOperator,
        DDPGGNOperator,
        DDPHessianOperator,
        DDPMCFisherOperator,
        broadcast_seed,
    )

    data = shard(world, rank)
    model = make_model()
    V = probes(sum(p.numel() for p in model.parameters()))
    before = _bits(model)
    op = DDPHessianOperator(model, data, loss_fn)
    import torch.distributed as dist

    calls, reduce = [], dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or reduce(*a, **k)  # count the collectives
    try:
        res["hess_plain"] = op @ V
    finally:
        dist.all_reduce = reduce
    res["allreduce_calls"] = len(calls)
    res["samples"] = (op.local_samples, op.global_samples)

    ddp = DistributedDataParallel(model)
    op = DDPHessianOperator(ddp, data, loss_fn)
    res["hess_ddp"] = op @ V
    forwards, inner = [], op.local.loss_fn
    op.local.loss_fn = lambda m, b: forwards.append(1) or inner(m, b)
    eig = lanczos(op, k=3, which="LA", tol=1e-10, seed=0)
    op.local.loss_fn = inner
    res["eig_forwards"], res["eig_matvecs"] = len(forwards), eig.num_matvecs
    res["graphs_after"] = len(op.local._graph_cache.graphs)
    res["eig_values"], res["eig_vectors"] = eig.eigenvalues, eig.eigenvectors
    res["eig_converged"] = eig.converged
    res["eig_bcast"] = lanczos(op, k=1, which="LA", tol=1e-10, seed=broadcast_seed()).eigenvalues
    res["model_untouched"] = _same(before, _bits(model)) and all(
        p.grad is None for p in model.parameters()
    )
    # DDP itself still trains after the products (its hooks were never armed)
    ddp(data[0][0]).sum().backward()
    res["ddp_grad"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    if not full:
        return

    from hessian_spectra.algorithms import hutch_plus_plus, spectral_density

    hpp = hutch_plus_plus(op, num_matvecs=30, seed=3)
    res["hutchpp"] = torch.tensor([hpp.estimate, hpp.stderr], dtype=F64)
    res["slq_nodes"] = spectral_density(op, num_runs=2, lanczos_steps=8, seed=4).nodes
    res["hess_fd"] = DDPHessianOperator(model, data, loss_fn, method="finite_difference") @ V
    fwd, lof = supervised_forward(), supervised_loss_of_output(F.cross_entropy)
    res["ggn"] = DDPGGNOperator(ddp, data, fwd, lof) @ V
    res["efisher"] = DDPEmpiricalFisherOperator(ddp, data, loss_fn) @ V
    mc = DDPMCFisherOperator(ddp, data, fwd, lof, seed=5, mc_samples=2)
    res["mcfisher"], res["mc_seed"] = mc @ V, mc.local.seed
    res["none_seed"] = DDPHessianOperator(model, data, loss_fn, seed=None).local.seed

    # seed=None (the default): rank 0's draw is broadcast, so the ranks multiply the same vectors
    res["eig_seed_none"] = lanczos(op, k=1, which="LA", tol=1e-10).eigenvalues
    res["trace_seed_none"] = torch.tensor([hutch_plus_plus(op, num_matvecs=30).estimate], dtype=F64)
    # errors, raised on every rank together (none may hang)
    other = make_model(hidden=7 if rank == world - 1 else 6)
    res["err_params"] = _error(lambda: DDPHessianOperator(other, data, loss_fn))
    typed = make_model().float() if rank == world - 1 else make_model()
    typed_data = [(x.to(next(typed.parameters()).dtype), y) for x, y in data]
    res["err_dtype"] = _error(lambda: DDPHessianOperator(typed, typed_data, loss_fn))
    moved = make_model()
    if rank == world - 1:
        with torch.no_grad():
            moved[2].bias[1] += 1e-12
    res["err_values"] = _error(lambda: DDPHessianOperator(moved, data, loss_fn))
    empty = [] if rank == world - 1 else data
    res["err_rank"] = _error(lambda: DDPHessianOperator(model, empty, loss_fn))
    mixed = make_model()
    if rank == world - 1:
        mixed[2].to("meta")
    res["err_devices"] = _error(lambda: DDPHessianOperator(mixed, data, loss_fn))
    sharded = make_model()
    from torch.distributed.fsdp import fully_shard

    fully_shard(sharded)
    res["err_dtensor"] = _error(lambda: DDPHessianOperator(sharded, data, loss_fn))
    nan_data = [(x.clone(), y) for x, y in data]
    if rank == world - 1:
        nan_data[-1][0][0, 0] = float("nan")  # the last batch of the last rank's shard
    res["err_nonfinite"] = _error(lambda: DDPHessianOperator(model, nan_data, loss_fn) @ V)
    res["err_fsdp_plain"] = _error(
        lambda: __import__(
            "hessian_spectra.operators.distributed", fromlist=["x"]
        ).FSDPHessianOperator(make_model(), data, loss_fn)
    )


def fsdp(res: dict[str, Any], world: int, rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from hessian_spectra.algorithms import lanczos
    from hessian_spectra.operators.distributed import FSDPHessianOperator

    data = shard(world, rank)
    model = make_model(hidden=7)  # 7 rows: uneven shards over 2 and 3 ranks
    V = probes(sum(p.numel() for p in model.parameters()))
    fully_shard(model[0])
    fully_shard(model)
    before = _bits(model)
    op = FSDPHessianOperator(model, data, loss_fn)
    res["fsdp"] = op @ V
    res["fsdp_sharded"] = op.gather(op.sharded_matmat(op.shard(V)))
    res["fsdp_local_size"] = op.local_size
    eig = lanczos(op, k=2, which="LA", seed=0)
    res["fsdp_eig"], res["fsdp_eig_residuals"] = eig.eigenvalues, eig.residuals
    # every algorithm on vectors split across the ranks like the parameters
    from hessian_spectra.algorithms import (
        block_lanczos,
        deflated_power_iteration,
        eigenpairs,
        hutch_plus_plus,
        spectral_density,
    )

    sop = op.sharded()
    res["sh_local_shape"] = torch.tensor(list(sop.matmat(op.shard(V)).shape))
    sh = lanczos(sop, k=2, which="LA", seed=0)
    res["sh_eig"], res["sh_eig_vectors"] = sh.eigenvalues, op.gather(sh.eigenvectors)
    res["sh_eig_converged"] = sh.converged
    res["sh_block"] = block_lanczos(sop, k=2, which="LA", seed=1).eigenvalues
    res["sh_auto"] = eigenpairs(sop, k=2, which="LA", seed=2).eigenvalues
    res["sh_seedless"] = lanczos(sop, k=1, which="LA").eigenvalues  # seed=None: rank 0's draw
    res["sh_power"] = deflated_power_iteration(sop, k=1, max_iter=2000, seed=3).eigenvalues
    hpp = hutch_plus_plus(sop, num_matvecs=60, seed=4)
    res["sh_trace"] = torch.tensor([hpp.estimate, hpp.stderr], dtype=F64)
    sd = spectral_density(sop, num_runs=2, lanczos_steps=sop.size, seed=5)
    res["sh_density_nodes"], res["sh_density_weights"] = sd.nodes, sd.weights
    res["fsdp_untouched"] = _same(before, _bits(model)) and all(
        p.grad is None for p in model.parameters()
    )


def gpu(res: dict[str, Any], world: int, rank: int) -> None:
    """CUDA tensors over gloo (one GPU is enough): the product, and a CPU rank beside a GPU rank."""
    from hessian_spectra.operators.distributed import DDPHessianOperator

    dev = torch.device("cuda", rank % torch.cuda.device_count())
    data = [(x.to(dev), y.to(dev)) for x, y in shard(world, rank)]
    model = make_model().to(dev)
    V = probes(sum(p.numel() for p in model.parameters())).to(dev)
    res["gpu_hess"] = (DDPHessianOperator(model, data, loss_fn) @ V).cpu()
    where = dev if rank == 0 else torch.device("cpu")
    mixed = make_model().to(where)
    mixed_data = [(x.to(where), y.to(where)) for x, y in data]
    res["err_gpu_mixed"] = _error(lambda: DDPHessianOperator(mixed, mixed_data, loss_fn))


def main() -> None:
    outdir, suite = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    res: dict[str, Any] = {}
    if suite == "gpu":
        gpu(res, world, rank)
    else:
        data_parallel(res, world, rank, full=suite == "full")
        fsdp(res, world, rank)
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
