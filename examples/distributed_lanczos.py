"""Top Hessian eigenvalues with the data spread over processes.

Run (CPU, gloo backend):

    torchrun --nproc_per_node=2 examples/distributed_lanczos.py

Every process holds the model (wrapped in DistributedDataParallel) and its own
shard of the data; ``DDPHessianOperator`` all-reduces each block product, so
``lanczos`` runs unchanged on every rank and returns the same eigenpairs
everywhere. With ``--check`` every rank also computes the single-process answer
over the whole dataset and exits with status 1 unless the two agree.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

from hessian_spectra.algorithms import lanczos
from hessian_spectra.losses import supervised_loss
from hessian_spectra.operators import HessianOperator
from hessian_spectra.operators.distributed import DDPHessianOperator, broadcast_seed


def make_problem() -> tuple[nn.Module, TensorDataset]:
    """The same model and dataset on every rank (a fixed generator, not the global RNG)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 10, generator=g, dtype=torch.float64)
    y = (x[:, :3].argmax(dim=1) + (x[:, 3] > 1).long()) % 3
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model, TensorDataset(x, y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3, help="number of eigenvalues")
    parser.add_argument("--check", action="store_true", help="compare with one process")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    model, dataset = make_problem()
    # this rank's shard: every world-th sample (301 samples: shards of unequal size).
    # Not DistributedSampler: it pads or drops samples to equalise the shards,
    # which changes the dataset whose Hessian is computed.
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=64)
    loss_fn = supervised_loss(F.cross_entropy)

    op = DDPHessianOperator(DistributedDataParallel(model), loader, loss_fn)
    seed = broadcast_seed()  # one random seed, the same on every rank
    res = lanczos(op, k=args.k, seed=seed, tol=1e-10)
    if rank == 0:
        print(
            f"{world} processes, {op.global_samples} samples ({op.local_samples} on rank 0), "
            f"{op.size} parameters"
        )
        for lam, r in zip(res.eigenvalues.tolist(), res.residuals.tolist(), strict=True):
            print(f"  eigenvalue {lam:.10f}   residual {r:.1e}")
        print(f"  converged={res.converged}, {res.num_matvecs} products")

    status = 0
    if args.check:
        full = HessianOperator(model, DataLoader(dataset, batch_size=64), loss_fn)
        ref = lanczos(full, k=args.k, seed=seed, tol=1e-10)
        err = float((res.eigenvalues - ref.eigenvalues).abs().max() / ref.eigenvalues.abs().max())
        same = torch.tensor([float(res.eigenvalues.sum())], dtype=torch.float64)
        gathered = [torch.zeros_like(same) for _ in range(world)]
        dist.all_gather(gathered, same)
        identical = all(torch.equal(t, same) for t in gathered)
        ok = err < 1e-10 and identical and res.converged
        if rank == 0:
            print(
                f"check: max relative difference to one process {err:.1e}, "
                f"identical on all ranks: {identical} -> {'OK' if ok else 'FAILED'}"
            )
        status = 0 if ok else 1
    # DistributedDataParallel keeps the process group alive; drop it (and the operator that
    # holds it) while the interpreter is whole, so gloo's threads end before exit
    del op
    gc.collect()
    dist.barrier()  # every rank done before the group goes (avoids gloo teardown races)
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
