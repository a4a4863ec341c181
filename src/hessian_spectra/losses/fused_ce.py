r"""The cross-entropy Hessian-vector product over a large vocabulary, fused.

For logits :math:`z \in \mathbb{R}^{N \times V}` (``N`` positions), a block of
directions :math:`u` and per-row scales :math:`s_i` (``mask_i / n_valid`` for a
mean over valid positions),

.. math::

    (H u)_i = s_i \,\big(p_i \odot u_i - p_i \langle p_i, u_i \rangle\big),
    \qquad p_i = \operatorname{softmax}(z_i).

In one piece the eager form would materialise several ``(N, V)`` float32
intermediates (``p``, ``p*u``, ``u - <p,u>``): at LM scale (``N = 16k`` tokens,
``V = 50k``) that is tens of GiB. The eager and compiled backends therefore go
over chunks of rows (:func:`chunk_rows`: at most an eighth of the rows and
``2**22`` direction entries a chunk), writing each chunk's result into the
output, which may be ``u`` itself (``out=u``): beyond the output, the product
then allocates only one chunk's temporaries. Backends:

* ``"eager"``: plain PyTorch, the reference.
* ``"compile"``: the same function through :func:`torch.compile` (Inductor
  fuses the softmax, the row reduction and the output into two loops over each
  row; CPU needs a C++ compiler), chunk by chunk.
* ``"triton"``: a hand-written kernel (CUDA only): an online softmax over
  vocabulary tiles accumulates the row max, the normaliser and
  :math:`\langle e^{z - m}, u \rangle` in one pass, a second pass writes the
  output; nothing but the output is allocated.
* ``"auto"``: Triton on CUDA when importable, else ``compile`` when it works
  (a failure is logged once and eager is used from then on), else eager.
  Problems under ``2**20`` elements (``k * N * V``) use eager: there the
  fused kernel saves microseconds and compiling costs seconds.

All backends compute in float32 (float64 logits in float64; fp16/bf16 are
upcast) and return the result in ``u``'s dtype.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = ["FusedCE", "ce_hvp", "ce_row_scale", "chunk_rows", "resolve_backend"]

FusedCE = Literal["auto", "eager", "compile", "triton"]
_BACKENDS = ("auto", "eager", "compile", "triton")

log = logging.getLogger(__name__)

_lock = threading.Lock()
_compiled: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
_compile_broken: str | None = None  # reason compile failed, once found


def ce_row_scale(
    targets_mask_or_labels: Tensor, *, ignore_index: int = -100, normalizer: float | None = None
) -> Tensor:
    """Per-row float64 scale ``mask / n_valid`` from a boolean mask or integer labels.

    ``normalizer`` overrides ``n_valid`` (e.g. ``1.0`` for a summed loss). A
    batch with no valid row gives zeros.
    """
    t = targets_mask_or_labels
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a mask or label tensor, got {type(t).__name__}")
    if t.dtype == torch.bool:
        mask = t
    elif not t.is_floating_point() and not t.is_complex():
        mask = t != ignore_index
    else:
        raise TypeError(
            f"targets_mask_or_labels must be a bool mask or integer labels, got dtype {t.dtype}"
        )
    mask = mask.reshape(-1).to(torch.float64)
    if normalizer is None:
        n = mask.sum()
        return torch.where(n > 0, mask / n.clamp_min(1.0), torch.zeros_like(mask))
    return mask / float(normalizer)


def _eager(logits: Tensor, u: Tensor, scale: Tensor) -> Tensor:
    """``(N, V)`` logits, ``(k, N, V)`` directions, ``(N,)`` scales -> ``(k, N, V)`` float32.

    Two ``(k, N, V)`` temporaries at most (the product ``p u`` for the row sums,
    then the result), besides ``p`` and a float32 copy of half-precision inputs.
    """
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(dt), dim=-1)
    uf = u.to(dt)
    pu = (p * uf).sum(-1, keepdim=True)
    out = (uf - pu).mul_(p).mul_(scale.to(dt).unsqueeze(-1))
    return out.masked_fill_((scale == 0).unsqueeze(-1), 0.0)


_CHUNK_ELEMENTS = 1 << 22
"""Direction entries (``k * rows * V``) one chunk of rows takes at most (16 MiB in float32)."""

_CHUNKS_AT_LEAST = 8
"""Rows go in at least this many chunks (when there are as many rows), so the chunk's
temporaries stay a fraction of one ``(k, N, V)`` tensor also on small problems."""


def chunk_rows(N: int, V: int, k: int = 1) -> int:
    """Rows of one chunk of the eager and compiled CE products: at most
    ``ceil(N / 8)`` rows and at most ``2**22`` direction entries, at least 1 row."""
    by_share = -(-N // _CHUNKS_AT_LEAST)
    by_size = _CHUNK_ELEMENTS // max(1, k * V)
    return max(1, min(by_share, by_size))


def _by_rows(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    logits: Tensor,
    u: Tensor,
    scale: Tensor,
    out: Tensor,
    done: list[int],
) -> Tensor:
    """``fn`` over chunks of rows from row ``done[0]`` on, each chunk written into ``out``
    (which may be ``u``: a chunk reads only its own rows), ``done[0]`` kept at the rows
    finished: the float32 softmax and its products never exist beyond one chunk."""
    N, V = logits.shape
    step = chunk_rows(N, V, u.shape[0])
    for start in range(done[0], N, step):
        rows = slice(start, start + step)
        out[:, rows] = fn(logits[rows], u[:, rows], scale[rows])
        done[0] = min(N, start + step)
    return out


def _get_compiled() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = torch.compile(_eager, dynamic=True, fullgraph=True)
        return _compiled


def _compile_run(logits: Tensor, u: Tensor, scale: Tensor) -> Tensor:
    return _get_compiled()(logits, u, scale)


def _triton_available(device: torch.device) -> str | None:
    """``None`` when the Triton kernel can run on ``device``, else the reason it cannot."""
    if device.type != "cuda":
        return f"the tensors are on {device.type}, the Triton kernel needs CUDA"
    try:
        from hessian_spectra.losses import _triton_ce  # noqa: F401
    except ImportError as err:
        return f"triton is not importable ({err})"
    return None


_AUTO_MIN_NUMEL = 1 << 20


def resolve_backend(fused: str, device: torch.device, numel: int | None = None) -> str:
    """The backend ``fused`` picks for ``numel`` direction entries on ``device``."""
    if fused not in _BACKENDS:
        raise ValueError(f"fused must be one of {_BACKENDS}, got {fused!r}")
    if fused != "auto":
        return fused
    if _triton_available(device) is None:
        return "triton"
    if _compile_broken is not None or (numel is not None and numel < _AUTO_MIN_NUMEL):
        return "eager"
    return "compile"


def ce_hvp(
    logits: Tensor,
    u: Tensor,
    targets_mask_or_labels: Tensor,
    *,
    ignore_index: int = -100,
    normalizer: float | None = None,
    fused: FusedCE = "auto",
    out: Tensor | None = None,
) -> Tensor:
    r"""Cross-entropy Hessian applied to ``u``: ``(p * u - p <p, u>) * mask / n_valid`` per row.

    Args:
        logits: ``(N, V)`` (any float dtype; computed in float32).
        u: ``(N, V)`` or a block ``(k, N, V)``.
        targets_mask_or_labels: ``(N,)`` bool mask of valid rows, or integer
            labels whose ``ignore_index`` entries are masked.
        ignore_index: masked label value.
        normalizer: divide by this instead of the number of valid rows
            (``1.0`` for a summed loss).
        fused: ``"auto"``, ``"eager"``, ``"compile"`` or ``"triton"``.
        out: where to write the result (``u``'s shape and dtype); may be ``u``
            itself, which then saves the one ``u``-sized buffer the product
            allocates otherwise.

    Returns:
        ``u``'s shape and dtype (``out`` when given).

    Raises:
        RuntimeError: when an explicitly requested backend cannot run (``auto``
            falls back instead).

    Example:
        >>> z = torch.zeros(2, 3); u = torch.tensor([[1., 0, 0], [0, 1, 0]])
        >>> ce_hvp(z, u, torch.tensor([0, -100]), fused="eager")
        tensor([[ 0.2222, -0.1111, -0.1111],
                [ 0.0000,  0.0000,  0.0000]])
    """
    global _compile_broken
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be (N, V), got shape {tuple(logits.shape)}; flatten positions first"
        )
    if u.shape[-2:] != logits.shape or u.dim() not in (2, 3):
        raise ValueError(
            f"u must be (N, V) = {tuple(logits.shape)} or a block (k, N, V), got {tuple(u.shape)}"
        )
    if targets_mask_or_labels.numel() != logits.shape[0]:
        raise ValueError(
            f"targets_mask_or_labels must have one entry per row ({logits.shape[0]}), "
            f"got {targets_mask_or_labels.numel()}"
        )
    scale = ce_row_scale(targets_mask_or_labels, ignore_index=ignore_index, normalizer=normalizer)
    scale = scale.to(
        device=logits.device,
        dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
    )
    block = u if u.dim() == 3 else u.unsqueeze(0)
    target = _check_out(out, u)
    if target is not None and target.dim() == 2:
        target = target.unsqueeze(0)
    backend = resolve_backend(fused, logits.device, block.numel())
    if backend == "triton":
        reason = _triton_available(logits.device)
        if reason is not None:
            raise RuntimeError(
                f"fused='triton' cannot run: {reason}; use fused='auto' or 'compile'"
            )
        from hessian_spectra.losses._triton_ce import triton_ce_hvp

        res = triton_ce_hvp(logits, block, scale, out_dtype=u.dtype, out=target)
    else:
        if target is None:
            target = torch.empty_like(block)
        done = [0]
        if backend == "compile":
            try:
                res = _by_rows(_compile_run, logits, block, scale, target, done)
            except Exception as err:
                if fused == "compile":
                    raise RuntimeError(
                        f"fused='compile' failed ({type(err).__name__}: {err}); use "
                        "fused='eager' or 'auto'"
                    ) from err
                _compile_broken = f"{type(err).__name__}: {err}"
                log.warning(
                    "torch.compile of the CE Hessian-vector product failed, using eager: %s",
                    _compile_broken,
                )
                res = _by_rows(_eager, logits, block, scale, target, done)  # the rows left
        else:
            res = _by_rows(_eager, logits, block, scale, target, done)
    return res if u.dim() == 3 else res[0]


def _check_out(out: Tensor | None, u: Tensor) -> Tensor | None:
    if out is None:
        return None
    if not isinstance(out, Tensor) or out.shape != u.shape or out.dtype != u.dtype:
        what = f"shape {tuple(out.shape)}, {out.dtype}" if isinstance(out, Tensor) else type(out)
        raise ValueError(
            f"out must be a tensor of u's shape {tuple(u.shape)} and dtype {u.dtype}, got {what}"
        )
    if out.device != u.device:
        raise ValueError(f"out must be on u's device {u.device}, got {out.device}")
    same = out.data_ptr() == u.data_ptr() and out.stride() == u.stride()
    if not same and out.untyped_storage().data_ptr() == u.untyped_storage().data_ptr():
        raise ValueError("out must be u itself or a tensor that shares no memory with u")
    return out
