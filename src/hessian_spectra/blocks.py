r"""Per-block spectra: top eigenvalues and trace of each parameter block's curvature.

For a partition of the parameters into blocks :math:`\theta = (\theta_1, \dots,
\theta_B)` (each layer, each parameter, or groups chosen by filters), block
:math:`b` is analysed through the diagonal block

.. math::

    H_{bb} = \nabla^2_{\theta_b} L \qquad (\text{or } G_{bb} = J_b^\top H_\ell J_b),

the curvature of the loss with respect to that block alone, the other
parameters held fixed: its top eigenvalues by Lanczos (with true residuals and
``converged`` flags) and its trace (exact when the block has at most
``trace_matvecs`` parameters, else Hutch++ with a standard error). This is the
"layer-wise" Hessian analysis of e.g. Sankar et al., 2021 ("A deeper look at
the Hessian eigenspectrum of deep neural networks and its applications to
regularization") and of PyHessian's per-layer traces.

Each block gets its own operator (a restricted ``param_filter``), so every
product differentiates only that block's parameters.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hessian_spectra.algorithms._codec import Serializable
from hessian_spectra.algorithms._literals import Which
from hessian_spectra.algorithms.lanczos import lanczos
from hessian_spectra.algorithms.results import EigenResult, TraceResult
from hessian_spectra.algorithms.trace import hutch_plus_plus, trace
from hessian_spectra.operators._functional import resolve_seed
from hessian_spectra.params import ParamFilter, match_names, selected_parameters
from hessian_spectra.progress import progress_bar

__all__ = ["BlockSpectra", "BlockSpectrum", "block_spectra", "parameter_blocks"]

BlockSpec = Literal["module", "parameter"] | Mapping[str, ParamFilter | str | Sequence[str]]


def parameter_blocks(
    model: nn.Module, blocks: BlockSpec = "module", *, param_filter: ParamFilter | None = None
) -> dict[str, list[str]]:
    """Block name -> parameter names, in the order of ``model.named_parameters()``.

    Args:
        blocks: ``"module"`` groups the parameters of each module (``"0.weight"``
            and ``"0.bias"`` form block ``"0"``); ``"parameter"`` makes one block
            per parameter; a mapping ``{name: filter}`` takes the parameters each
            filter selects (a :data:`ParamFilter`, a glob string or a list of
            globs). Blocks may overlap in a mapping.
        param_filter: restricts every block to these parameters.
    """
    names, params = selected_parameters(model, param_filter)
    if isinstance(blocks, str):
        if blocks not in ("module", "parameter"):
            raise ValueError(
                f"blocks must be 'module', 'parameter' or a dict name -> filter, got {blocks!r}"
            )
        out: dict[str, list[str]] = {}
        for n in names:
            key = n if blocks == "parameter" else (n.rsplit(".", 1)[0] if "." in n else n)
            out.setdefault(key, []).append(n)
        return out
    if not isinstance(blocks, Mapping) or not blocks:
        raise TypeError(
            "blocks must be 'module', 'parameter' or a non-empty dict name -> filter "
            f"(e.g. {{'attn': match_names('*.attn.*')}}), got {type(blocks).__name__}"
        )
    out = {}
    for key, spec in blocks.items():
        f = _as_filter(key, spec)
        chosen = [n for n, p in zip(names, params, strict=True) if f(n, p)]
        if not chosen:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"block {key!r} selects no parameter; the model's parameters are: {shown}"
            )
        out[str(key)] = chosen
    return out


def _as_filter(key: Any, spec: Any) -> ParamFilter:
    if isinstance(spec, str):
        return match_names(spec)
    if isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        return match_names(*spec)
    if callable(spec):
        return spec
    raise TypeError(
        f"block {key!r}: expected a ParamFilter, a glob string or a list of globs, got {spec!r}"
    )


@dataclass(frozen=True, eq=False)
class BlockSpectrum(Serializable):
    """The curvature of one block.

    Attributes:
        name: block name.
        params: its parameter names.
        size: number of scalar parameters.
        eigen: the Lanczos result (top ``k`` eigenpairs, residuals, ``converged``).
        trace: the trace result (``None`` when ``trace_matvecs=0``).
    """

    name: str
    params: tuple[str, ...]
    size: int
    eigen: EigenResult
    trace: TraceResult | None

    @property
    def eigenvalues(self) -> list[float]:
        return [float(x) for x in self.eigen.eigenvalues]

    @property
    def num_matvecs(self) -> int:
        return self.eigen.num_matvecs + (self.trace.num_matvecs if self.trace is not None else 0)


@dataclass(frozen=True, eq=False)
class BlockSpectra(Serializable):
    """Per-block spectra of a model, as a table.

    Attributes:
        blocks: one :class:`BlockSpectrum` per block, in model order.
        operator: ``"hessian"`` or ``"ggn"``.
        k: eigenvalues asked for per block.
        which: Lanczos ``which``.
        info: settings used (plain values).
    """

    blocks: tuple[BlockSpectrum, ...]
    operator: str
    k: int
    which: str
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[BlockSpectrum]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, name: str) -> BlockSpectrum:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r}; blocks are {[b.name for b in self.blocks]}")

    @property
    def converged(self) -> bool:
        return all(b.eigen.converged for b in self.blocks)

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per block: ``block, size, lambda_i, residual_i, converged, trace, ...``."""
        rows = []
        for b in self.blocks:
            row: dict[str, Any] = {"block": b.name, "size": b.size, "num_params": len(b.params)}
            ev, res = b.eigen.eigenvalues.tolist(), b.eigen.residuals.tolist()
            for i in range(self.k):
                row[f"lambda_{i + 1}"] = ev[i] if i < len(ev) else math.nan
                row[f"residual_{i + 1}"] = res[i] if i < len(res) else math.nan
            row["converged"] = bool(b.eigen.converged)
            row["trace"] = b.trace.estimate if b.trace is not None else math.nan
            row["trace_stderr"] = b.trace.stderr if b.trace is not None else math.nan
            row["trace_method"] = b.trace.method if b.trace is not None else ""
            row["num_matvecs"] = b.num_matvecs
            rows.append(row)
        return rows

    def save(self, path: str | Path, *, include_vectors: bool = False) -> Path:
        """Write the table: ``.csv`` (:meth:`to_rows`), or ``.json``/``.pt``/``.safetensors``.

        ``.json`` holds :meth:`to_dict`; ``.pt`` (read by ``torch.load(path,
        weights_only=True)``) and ``.safetensors`` hold the eigenvectors too.
        :meth:`load` reads all but ``.csv`` back.
        """
        path = Path(path)
        if path.suffix in (".json", ".pt", ".safetensors"):
            return super().save(path, include_vectors=include_vectors)
        if path.suffix == ".csv":
            rows = self.to_rows()
            with path.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            raise ValueError(
                f"save() writes .json or .csv files (or .pt/.safetensors), got {path.name!r}"
            )
        return path


def block_spectra(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    blocks: BlockSpec = "module",
    k: int = 3,
    which: Which = "LA",
    trace_matvecs: int = 99,
    operator: Literal["hessian", "ggn"] = "hessian",
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    loss_of_output_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    param_filter: ParamFilter | None = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int | None = 0,
    progress: bool = False,
    **operator_kwargs: Any,
) -> BlockSpectra:
    """Top eigenvalues and trace of the curvature of each parameter block.

    Args:
        model, dataloader: as for the operators.
        loss_fn: ``(model, batch) -> scalar`` (``operator="hessian"``).
        blocks: ``"module"``, ``"parameter"`` or ``{name: filter}``
            (see :func:`parameter_blocks`).
        k: eigenvalues per block (fewer for a block with fewer parameters).
        which: ``"LA"`` (largest, default), ``"SA"`` or ``"LM"``.
        trace_matvecs: products for each block's trace: exact (one product per
            parameter) when the block has at most this many parameters, else
            Hutch++ with this budget; ``0`` skips the trace.
        operator: ``"hessian"`` (:class:`~hessian_spectra.operators.hessian.HessianOperator`)
            or ``"ggn"`` (:class:`~hessian_spectra.operators.ggn.GGNOperator`,
            with ``forward_fn`` and ``loss_of_output_fn``).
        param_filter: restricts all blocks.
        tol, max_matvecs: Lanczos settings per block.
        seed: seeds the operators' dropout masks (the same for every block, so
            all blocks are diagonal blocks of one matrix) and the Lanczos starts
            and trace probes (``seed + i`` for block ``i``).
        progress: a bar over the blocks (``HESSIAN_SPECTRA_PROGRESS=0`` turns it off).
        **operator_kwargs: passed to the operator (``num_batches``,
            ``microbatch_size``, ``batch_size_fn``, ``method``, ``loss_hvp``, ...).

    Returns:
        :class:`BlockSpectra` (``to_rows()``, ``to_dict()``, ``save(path)``).

    Example:
        >>> import torch.nn.functional as F
        >>> from hessian_spectra.losses import supervised_loss
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
        >>> res = block_spectra(model, data, supervised_loss(F.cross_entropy), k=2)
        >>> [row["block"] for row in res.to_rows()]
        ['0', '2']
    """
    if operator not in ("hessian", "ggn"):
        raise ValueError(f"operator must be 'hessian' or 'ggn', got {operator!r}")
    if operator == "hessian" and not callable(loss_fn):
        raise TypeError(
            "operator='hessian' needs loss_fn(model, batch) -> scalar as the third argument"
        )
    if operator == "ggn" and not (callable(forward_fn) and callable(loss_of_output_fn)):
        raise TypeError(
            "operator='ggn' needs forward_fn=(model, batch) -> output and "
            "loss_of_output_fn=(output, batch) -> "
            "loss, e.g. supervised_forward() and supervised_loss_of_output(F.cross_entropy)"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(trace_matvecs, bool) or not isinstance(trace_matvecs, int) or trace_matvecs < 0:
        raise ValueError(f"trace_matvecs must be an int >= 0, got {trace_matvecs!r}")
    if 0 < trace_matvecs < 3:
        raise ValueError(
            f"trace_matvecs must be 0 (no trace) or >= 3 (Hutch++), got {trace_matvecs}"
        )
    base_seed = resolve_seed(seed)
    groups = parameter_blocks(model, blocks, param_filter=param_filter)
    data = (
        list(dataloader) if isinstance(dataloader, Iterator) else dataloader
    )  # a generator is read once
    out = []
    with progress_bar(progress, total=len(groups), desc="block spectra", unit="block") as step:
        for i, (name, names) in enumerate(groups.items()):
            chosen = frozenset(names)

            def only(n: str, p: nn.Parameter, chosen: frozenset[str] = chosen) -> bool:
                return n in chosen

            s = base_seed + i
            op = _operator(
                operator,
                model,
                data,
                loss_fn,
                forward_fn,
                loss_of_output_fn,
                only,
                base_seed,
                operator_kwargs,
            )
            eig = lanczos(
                op, min(k, op.size), which=which, tol=tol, max_matvecs=max_matvecs, seed=s
            )
            tr: TraceResult | None = None
            if trace_matvecs:
                tr = (
                    trace(op, method="exact")
                    if op.size <= trace_matvecs
                    else hutch_plus_plus(op, trace_matvecs, seed=s)
                )
            out.append(BlockSpectrum(name, tuple(op.names), op.size, eig, tr))
            step(1)
    return BlockSpectra(
        tuple(out),
        operator,
        k,
        which,
        info={
            "blocks": blocks if isinstance(blocks, str) else list(groups),
            "trace_matvecs": trace_matvecs,
            "seed": base_seed,
            "tol": tol,
        },
    )


def _operator(
    kind, model, data, loss_fn, forward_fn, loss_of_output_fn, param_filter, seed, kwargs
):
    if kind == "hessian":
        from hessian_spectra.operators.hessian import HessianOperator

        return HessianOperator(model, data, loss_fn, param_filter=param_filter, seed=seed, **kwargs)
    from hessian_spectra.operators.ggn import GGNOperator

    return GGNOperator(
        model, data, forward_fn, loss_of_output_fn, param_filter=param_filter, seed=seed, **kwargs
    )
