r"""Loss landscapes: the loss along one or two directions through the parameters.

.. math::

    f(a) = L(\theta + a\, d_1), \qquad f(a, b) = L(\theta + a\, d_1 + b\, d_2)

with ``d_i`` the top Hessian eigenvectors (unit vectors: near a minimum
:math:`f(a) \approx L(\theta) + a\, g^\top d_1 + \tfrac12 \lambda_1 a^2`) or
filter-normalised random directions (Li et al., 2018, "Visualizing the loss
landscape of neural nets": each filter, a slice along dim 0 of a weight, is
rescaled to the norm of the same filter of :math:`\theta`; vectors such as
biases and norm scales get zero, their ``ignore="biasbn"``).

Points are evaluated in batches (``torch.vmap`` over
:func:`torch.func.functional_call`, a loop where ``vmap`` fails) on the model's
device, without gradients; the loss over several data batches is weighted by
their sample counts. The model is left bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessian_spectra.algorithms._codec import Serializable
from hessian_spectra.algorithms.lanczos import lanczos
from hessian_spectra.data import default_batch_size
from hessian_spectra.operators._functional import batch_norm_batch_stats
from hessian_spectra.params import ParamFilter, ParamLayout, selected_parameters
from hessian_spectra.state import preserved_model

__all__ = ["LossLandscape", "filter_normalized_directions", "loss_landscape"]

logger = logging.getLogger("hessian_spectra")

Directions = Literal["eigen", "random"]


@dataclass(frozen=True, eq=False)
class LossLandscape(Serializable):
    """Loss values on a 1-D line or a 2-D grid through the parameters.

    Attributes:
        coords: ``(P,)`` step sizes along each direction (the same for both axes).
        losses: ``(P,)`` (1-D) or ``(P, P)`` (2-D, ``losses[i, j]`` at
            ``coords[i] d_1 + coords[j] d_2``), float64.
        center_loss: the loss at the parameters themselves.
        kind: ``"eigen"``, ``"random"`` or ``"given"``.
        eigenvalues: the Hessian eigenvalues of the directions (``"eigen"`` only).
        directions: ``(dims, n)`` the directions used.
        info: settings (plain values).
    """

    coords: Tensor
    losses: Tensor
    center_loss: float
    kind: str
    eigenvalues: Tensor | None = None
    directions: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    _vector_fields = ("directions",)

    @property
    def dims(self) -> int:
        return int(self.losses.dim())


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def filter_normalized_directions(
    model: nn.Module,
    dims: int = 2,
    *,
    param_filter: ParamFilter | None = None,
    seed: int | None = 0,
) -> Tensor:
    """``(dims, n)`` filter-normalised Gaussian directions (Li et al., 2018).

    Each filter (slice ``[i]`` of a parameter with two or more dims) of a
    Gaussian direction is scaled to the norm of the same filter of the
    parameter; parameters with fewer than two dims (biases, norm scales) get
    zero. Flattened in the order of ``selected_parameters(model, param_filter)``.
    """
    _, params = selected_parameters(model, param_filter)
    p0 = params[0]
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))
    rows = []
    for _ in range(dims):
        parts = []
        for p in params:
            w = p.detach()
            if w.dim() < 2:
                parts.append(torch.zeros(w.numel(), dtype=w.dtype, device=w.device))
                continue
            d = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.device, w.dtype)
            dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            d = d * (wn / dn).reshape(-1, *([1] * (w.dim() - 1)))
            parts.append(d.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows).to(device=p0.device)


def loss_landscape(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    dims: Literal[1, 2] = 1,
    directions: Directions | Tensor = "eigen",
    span: float = 1.0,
    steps: int = 21,
    param_filter: ParamFilter | None = None,
    max_batches: int | None = None,
    points_per_batch: int = 32,
    seed: int | None = 0,
    progress: bool | None = None,
) -> LossLandscape:
    """The loss along ``dims`` directions through the parameters of ``model``.

    Args:
        model: the network (left bit-identical).
        data: iterable of batches, as for the operators.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (mean over the batch).
        dims: 1 (a curve) or 2 (a surface).
        directions: ``"eigen"`` (top Hessian eigenvectors by Lanczos),
            ``"random"`` (filter-normalised, Li et al. 2018) or a ``(dims, n)``
            tensor of directions.
        span: coordinates run over ``[-span, span]``.
        steps: points per axis.
        param_filter: which parameters move (default: all trainable).
        max_batches: use at most this many batches of ``data``.
        points_per_batch: parameter points evaluated together by ``vmap``.
        seed: for the Lanczos start or the random directions.
        progress: a progress bar over the points (default: on unless
            ``HESSIAN_SPECTRA_PROGRESS=0``).
    """
    from hessian_spectra.progress import progress_bar

    if dims not in (1, 2):
        raise ValueError(f"loss_landscape: dims must be 1 or 2, got {dims!r}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"loss_landscape: steps must be an int >= 2, got {steps!r}")
    if not span > 0:
        raise ValueError(f"loss_landscape: span must be > 0, got {span!r}")
    names, params = selected_parameters(model, param_filter)
    layout = ParamLayout.of(names, params)
    batches = list(islice(iter(data), max_batches)) if max_batches else list(data)
    if not batches:
        raise ValueError("loss_landscape: data gave no batches")
    dtype, device = params[0].dtype, params[0].device
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    eigenvalues = None
    if isinstance(directions, Tensor):
        if tuple(directions.shape) != (dims, layout.size):
            raise ValueError(
                f"loss_landscape: directions has shape {tuple(directions.shape)} for dims={dims}; "
                f"pass a ({dims}, {layout.size}) tensor (one direction per row)"
            )
        D = directions.detach().to(device=device, dtype=dtype)
        kind = "given"
    elif directions == "eigen":
        from hessian_spectra.operators.hessian import HessianOperator

        op = HessianOperator(model, batches, loss_fn, param_filter=param_filter)
        res = lanczos(op, k=dims, which="LA", seed=seed)
        logger.info(
            "loss_landscape: top-%d Hessian eigenvectors (eigenvalues %s, %d products, converged=%s)",
            dims,
            [f"{x:.4g}" for x in res.eigenvalues.tolist()],
            res.num_matvecs,
            res.converged,
        )
        D = res.eigenvectors.to(dtype)
        eigenvalues = res.eigenvalues.detach().cpu()
        kind = "eigen"
    elif directions == "random":
        D = filter_normalized_directions(model, dims, param_filter=param_filter, seed=seed)
        kind = "random"
    else:
        raise ValueError(
            f"loss_landscape: directions must be 'eigen', 'random' or a ({dims}, n) tensor, "
            f"got {directions!r}"
        )
    coords = torch.linspace(-span, span, steps, dtype=torch.float64)
    C = coords[:, None] if dims == 1 else torch.cartesian_prod(coords, coords)
    points = theta[None] + C.to(device=device, dtype=dtype) @ D
    wrapper = _LossModule(model, loss_fn)
    full = ["model." + n for n in names]

    def loss_at(flat: Tensor, batch: Any) -> Tensor:
        return functional_call(wrapper, dict(zip(full, layout.split(flat), strict=True)), (batch,))

    sizes = [float(default_batch_size(b)) for b in batches]
    total = sum(sizes)
    out = torch.zeros(points.shape[0], dtype=torch.float64)
    vmap_ok = True
    with (
        preserved_model(model) as snap,
        torch.no_grad(),
        batch_norm_batch_stats(model),
        progress_bar(progress, total=points.shape[0], desc="loss landscape", unit="point") as bar,
    ):
        for s in range(0, points.shape[0], points_per_batch):
            chunk = points[s : s + points_per_batch]
            acc = torch.zeros(chunk.shape[0], dtype=torch.float64, device=device)
            for b, w in zip(batches, sizes, strict=True):
                snap.reset_buffers()
                vals = None
                if vmap_ok:
                    try:
                        vals = torch.vmap(loss_at, in_dims=(0, None), randomness="same")(chunk, b)
                    except Exception as err:  # a model vmap cannot batch: loop over points
                        vmap_ok = False
                        logger.debug("loss_landscape: vmap failed (%s); looping over points", err)
                if vals is None:
                    vals = torch.stack([loss_at(p, b) for p in chunk])
                acc += vals.double() * (w / total)
            out[s : s + chunk.shape[0]] = acc.cpu()
            bar(chunk.shape[0])
    losses = out if dims == 1 else out.reshape(steps, steps)
    mid = steps // 2
    if steps % 2 == 1:
        center = float(losses[mid] if dims == 1 else losses[mid, mid])
    else:
        center = float(_center_loss(loss_at, theta, batches, sizes, total, model))
    return LossLandscape(
        coords=coords,
        losses=losses,
        center_loss=center,
        kind=kind,
        eigenvalues=eigenvalues,
        directions=D.detach(),
        info={"span": float(span), "steps": steps, "num_batches": len(batches), "vmap": vmap_ok},
    )


def _center_loss(
    loss_at: Callable[[Tensor, Any], Tensor],
    theta: Tensor,
    batches: list[Any],
    sizes: list[float],
    total: float,
    model: nn.Module,
) -> float:
    with preserved_model(model), torch.no_grad(), batch_norm_batch_stats(model):
        return sum(
            float(loss_at(theta, b)) * w / total for b, w in zip(batches, sizes, strict=True)
        )
