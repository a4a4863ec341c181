"""Collectives shared by the distributed operators.

* :func:`require_group`: a clear error when no process group is initialised.
* :func:`agree`: builds each rank's local part and makes every rank agree on it
  in one ``all_gather_object`` (sample counts, the parameter set, dtype, device
  type, the dropout seed); a rank that failed makes *every* rank raise, so no
  rank waits forever in a later collective.
* :func:`input_checksums`: a position-weighted integer checksum of the bits of
  each row of a block, exact in the reduction dtype, used to verify that every
  rank multiplies the same vectors.
* :func:`broadcast_seed`: one random seed, identical on every rank.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "agree",
    "broadcast_seed",
    "check_agreement",
    "check_same_values",
    "input_checksums",
    "param_signature",
    "require_group",
    "values_checksum",
]

_NOT_INITIALISED = (
    "{who} needs an initialised torch.distributed process group, and none is: call "
    "torch.distributed.init_process_group('gloo') (CPU) or init_process_group('nccl') (GPU) "
    "in every process first, and launch the script with torchrun, e.g. "
    "`torchrun --nproc_per_node=2 script.py` (it sets RANK, WORLD_SIZE, MASTER_ADDR and "
    "MASTER_PORT). On one process use the single-process operator instead."
)


def require_group(group: Any, who: str) -> tuple[Any, int, int]:
    """``(group, rank, world_size)`` of an initialised process group.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised
            (the message says how to initialise it), or this process is not
            a member of ``group``.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            f"{who} needs torch.distributed, which this PyTorch build does not include "
            "(torch.distributed.is_available() is False); install a build with distributed "
            "support, or use the single-process operator"
        )
    if not dist.is_initialized():
        raise RuntimeError(_NOT_INITIALISED.format(who=who))
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            f"{who}: this process (global rank {dist.get_rank()}) is not a member of the "
            "process_group given; pass a group that contains every rank that calls it"
        )
    return group, rank, dist.get_world_size(group)


def param_signature(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    """A short hash of the parameter names and shapes, in order."""
    text = "\n".join(f"{n}:{tuple(int(d) for d in s)}" for n, s in zip(names, shapes, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _gather(obj: Any, group: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def agree(
    build: Callable[[], tuple[Any, dict[str, Any]]],
    *,
    group: Any,
    rank: int,
    world: int,
    who: str,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``build()`` on every rank and gather the records it returns.

    ``build`` returns ``(local_object, record)``; the record (small, picklable)
    must hold ``names`` and ``shapes`` (the parameter set), ``dtype``,
    ``device_type`` and may hold more. An exception in ``build`` on any rank
    is re-raised there and reported as a ``RuntimeError`` naming that rank on
    all the others, after the one collective, so every rank leaves together.

    Raises:
        ValueError: ranks disagree on the parameter set, dtype or device type
            (see :func:`check_agreement`).
    """
    error: BaseException | None = None
    local: Any = None
    try:
        local, record = build()
        record = dict(record)
        names, shapes = record.pop("names"), record.pop("shapes")
        record["signature"] = param_signature(names, shapes)
    except Exception as err:  # shared with the other ranks below, then re-raised
        error, record, names, shapes = err, {"error": f"{type(err).__name__}: {err}"}, [], []
    records = _gather(record, group, world)
    failed = [(r, rec["error"]) for r, rec in enumerate(records) if "error" in rec]
    if failed:
        if error is not None:
            raise error
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise RuntimeError(
            f"{who} could not be built on every rank ({lines}); every rank raises so that none "
            "waits in a collective. Fix the failing rank's model or data shard."
        )
    if len({rec["signature"] for rec in records}) > 1:
        # rare path: a second gather of the full lists, to name the difference
        full = _gather(
            list(zip(names, [tuple(int(d) for d in s) for s in shapes], strict=True)), group, world
        )
        raise ValueError(
            f"{who}: the ranks disagree on the parameter set: {_param_diff(full)}. "
            "Every rank must build the same model and pass the same param_filter."
        )
    check_agreement(records, who)
    return local, records


def _param_diff(lists: list[list[tuple[str, tuple[int, ...]]]]) -> str:
    ref = dict(lists[0])
    diffs: list[str] = []
    for r, items in enumerate(lists[1:], start=1):
        mine = dict(items)
        only_ref = [n for n in ref if n not in mine]
        only_mine = [n for n in mine if n not in ref]
        shapes = [
            f"{n} {list(ref[n])} vs {list(mine[n])}" for n in ref if n in mine and ref[n] != mine[n]
        ]
        if only_ref:
            diffs.append(f"rank 0 has {only_ref[:5]} that rank {r} lacks")
        if only_mine:
            diffs.append(f"rank {r} has {only_mine[:5]} that rank 0 lacks")
        if shapes:
            diffs.append(f"shapes differ between rank 0 and rank {r}: {'; '.join(shapes[:5])}")
        if not (only_ref or only_mine or shapes) and [n for n, _ in items] != list(ref):
            diffs.append(f"rank {r} lists the parameters in another order than rank 0")
    return "; ".join(diffs) or "the parameter lists differ"


def check_agreement(records: Sequence[dict[str, Any]], who: str) -> None:
    """Raise a ``ValueError`` if the ranks' records disagree on dtype or device type."""
    for key, what, fix in (
        (
            "device_type",
            "devices are mixed across ranks",
            "put the model of every rank on the same kind of device (each rank its own GPU "
            "with model.to(f'cuda:{local_rank}'), or all on the CPU with the gloo backend)",
        ),
        (
            "dtype",
            "the ranks' parameters have different dtypes",
            "convert the model to the same dtype on every rank, e.g. model.double()",
        ),
    ):
        values = [rec[key] for rec in records]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{who}: {what} ({per_rank}); {fix}")


def check_backend(group: Any, device_type: str, who: str) -> None:
    """Raise a ``ValueError`` when the group's backend cannot reduce tensors on ``device_type``."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if device_type == "cpu" and "gloo" not in backend and "mpi" not in backend:
        raise ValueError(
            f"{who}: the model is on the CPU but the process group's backend is {backend!r}, "
            "which reduces only GPU tensors; initialise with init_process_group('gloo') (or "
            "'cpu:gloo,cuda:nccl'), or move the model to each rank's GPU"
        )


_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def exact_bits(dtype: torch.dtype) -> int:
    """Bits of integer exactly representable in ``dtype`` (53 for float64, 24 for float32)."""
    return {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}[dtype]


def input_checksums(V: Tensor, dtype: torch.dtype) -> Tensor:
    """``(k,)`` checksums of the bit patterns of the rows of ``V``, as exact integers in ``dtype``.

    ``c_r = (Σ_j (bits(V_rj) mod 2^16) (j mod 65521 + 1)) mod 2^m`` with ``m`` the
    integer bits exact in ``dtype``: equal rows give equal checksums on every
    rank (integer arithmetic, no rounding, no dependence on the summation
    order), and a row that differs anywhere, even in its last bit, almost
    surely gives another. Placed in a rank's own slot of a ``SUM`` all-reduce
    with zeros elsewhere, each checksum arrives unchanged on every rank.
    """
    V = V.detach().contiguous()
    bits = V.view(_INT_OF_SIZE[V.element_size()]).to(torch.int64) & 0xFFFF
    pos = torch.arange(V.shape[1], device=V.device, dtype=torch.int64) % 65521 + 1
    total = (bits * pos).sum(dim=1) & ((1 << exact_bits(dtype)) - 1)
    return total.to(dtype)


def values_checksum(tensors: Sequence[Tensor]) -> int:
    """One integer from the bits of all ``tensors`` (see :func:`input_checksums`)."""
    total = 0
    for t in tensors:
        row = t.detach().reshape(1, -1)
        if row.shape[1]:
            total = (total * 1_000_003 + int(input_checksums(row, torch.float64)[0])) % (1 << 53)
    return total


def check_same_values(records: Sequence[dict[str, Any]], who: str) -> None:
    """Raise a ``ValueError`` if the ranks' parameter values (``records[r]["values"]``) differ."""
    differ = [r for r, rec in enumerate(records) if rec["values"] != records[0]["values"]]
    if differ:
        raise ValueError(
            f"{who}: the parameter values differ between rank 0 and ranks {differ}; a "
            "data-parallel operator needs the same model on every rank. Wrap it in "
            "DistributedDataParallel (which copies rank 0's parameters to all ranks when built), "
            "or load the same checkpoint everywhere"
        )


def broadcast_seed(seed: int | None = None, *, src: int = 0, group: Any = None) -> int:
    """One seed, the same on every rank: ``src``'s ``seed``, or fresh entropy drawn on ``src``.

    Algorithms given ``seed=None`` draw their entropy on each rank separately
    (:func:`os.urandom`), so the ranks would start from different random
    vectors. Pass ``seed=broadcast_seed()`` (or any int) instead: every rank
    then draws the same probes. Call it on every rank (it is a collective).

    Args:
        seed: the value to share; ``None`` draws 63 random bits on ``src``.
        src: the rank whose value everyone takes.
        group: the process group (default: the global one).

    Returns:
        A non-negative ``int`` below ``2**63``, equal on every rank.

    Raises:
        RuntimeError: no process group is initialised.
        TypeError: ``seed`` is neither an int nor ``None``.
    """
    import torch.distributed as dist

    require_group(group, "broadcast_seed()")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    value = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return int(box[0])
