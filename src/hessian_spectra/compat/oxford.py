"""The Oxford loss-landscapes Hessian entry points, as thin adapters over this library.

Code written against the guide runs with its imports changed to this module::

    from hessian_spectra.compat.oxford import ModelWrapper, min_max_hessian_eigs, hessian_trace

or verbatim after :func:`install_import_aliases` (which makes the guide's
``oxford_loss_landscapes.model_interface.model_wrapper``,
``oxford_loss_landscapes.hessian.hessian`` and
``oxford_loss_landscapes.hessian.hessian_trace`` imports resolve here).

The Hessian is that of ``loss_fn(model(X))`` with respect to the model's
trainable parameters, through a
:class:`~hessian_spectra.operators.hessian.HessianOperator`; the extreme
eigenpairs come from :func:`~hessian_spectra.algorithms.lanczos`
(``which="SA"`` and ``which="LA"``) and the trace from
:func:`~hessian_spectra.algorithms.hutchinson`.

Where this differs from the original:

* ``min_max_hessian_eigs`` is right for every sign pattern: ``min_eig <= max_eig``,
  each with its own sign (the original runs ``eigsh(which="LM")`` and a shifted
  run, and swaps the two for negative-definite Hessians);
* the eigenvectors are 1-d torch tensors in the flat parameter order (the
  original returns NumPy arrays);
* ``use_cuda`` does not move anything: the computation runs on the model's
  device. ``use_cuda=True`` with no CUDA device (or a model on the CPU) falls
  back to the CPU with a :class:`CudaFallbackWarning`;
* the model is evaluated in eval mode, as in the original, but never changed:
  its mode, device, buffers and ``.grad`` are restored (the original moves it
  to CUDA, leaves it in eval mode and overwrites its ``.grad``).
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hessian_spectra.compat.nnhessian import lanczos_extreme
from hessian_spectra.dense.blocks import analysed

__all__ = [
    "CudaFallbackWarning",
    "ModelWrapper",
    "hessian_trace",
    "install_import_aliases",
    "min_max_hessian_eigs",
]

_ALIASES = (
    "oxford_loss_landscapes",
    "oxford_loss_landscapes.model_interface",
    "oxford_loss_landscapes.model_interface.model_wrapper",
    "oxford_loss_landscapes.hessian",
    "oxford_loss_landscapes.hessian.hessian",
    "oxford_loss_landscapes.hessian.hessian_trace",
)


class CudaFallbackWarning(UserWarning):
    """``use_cuda=True`` but the computation runs on the CPU (no CUDA, or a CPU model)."""


class ModelWrapper:
    """A model, its loss on the model's output and the inputs it is evaluated on.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model_output) -> scalar``; targets come from its closure.
        X: the inputs, passed as ``model(X)``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], Tensor], X: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelWrapper needs an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(model_output), got {type(loss_fn).__name__}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.X = X

    def forward(self, x: Any = None) -> Any:
        """``model(x)``, with ``x = X`` by default."""
        return self.model(self.X if x is None else x)

    __call__ = forward

    def loss(self, loss_fn: Callable[[Any], Tensor] | None = None) -> Tensor:
        """``loss_fn(model(X))`` (the wrapper's loss unless another is given)."""
        return (loss_fn or self.loss_fn)(self.forward())

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()


def _check_wrapper(model_wrapper: Any) -> ModelWrapper:
    if not isinstance(model_wrapper, ModelWrapper):
        raise TypeError(
            "expected a ModelWrapper(model, loss_fn, X) from hessian_spectra.compat.oxford, got "
            f"{type(model_wrapper).__name__}"
        )
    return model_wrapper


def _check_cuda(model: nn.Module, use_cuda: bool) -> None:
    if not use_cuda:
        return
    p = next(iter(model.parameters()), None)
    if p is not None and p.device.type == "cuda":
        return
    why = (
        "no CUDA device is available"
        if not torch.cuda.is_available()
        else "the model is on the CPU"
    )
    warnings.warn(
        f"use_cuda=True but {why}: computing on the CPU. The computation follows the model's "
        "device; "
        "move the model (and the loss's targets) with .to('cuda') to use a GPU",
        CudaFallbackWarning,
        stacklevel=3,
    )


def _operator(model_wrapper: ModelWrapper, loss_fn: Callable[[Any], Tensor] | None) -> Any:
    from hessian_spectra.operators.hessian import HessianOperator

    fn = loss_fn if loss_fn is not None else model_wrapper.loss_fn
    if not callable(fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(model_output), got {type(fn).__name__}"
        )

    def loss(model: nn.Module, X: Any) -> Tensor:
        return fn(model(X))

    return HessianOperator(model_wrapper.model, [model_wrapper.X], loss, batch_size_fn=lambda b: 1)


def min_max_hessian_eigs(
    model_wrapper: ModelWrapper,
    loss_fn: Callable[[Any], Tensor] | None = None,
    use_cuda: bool = False,
    max_iter: int = 100,
    tol: float = 1e-3,
    *,
    seed: int | None = 0,
) -> tuple[float, float, Tensor, Tensor]:
    """Smallest and largest eigenvalues of the Hessian, with their eigenvectors.

    Two Lanczos runs (``which="SA"`` and ``which="LA"``), each with at most
    ``max_iter`` Hessian-vector products and relative residual tolerance ``tol``
    (``||Hv - λv|| <= tol * max|λ|``); a run that misses it warns with a
    :class:`~hessian_spectra.algorithms.results.ConvergenceWarning`.

    Returns:
        ``(min_eig, max_eig, min_eigvec, max_eigvec)`` with ``min_eig <= max_eig``
        (floats) and unit eigenvectors (1-d tensors, flat parameter order, on the
        model's device).
    """
    wrapper = _check_wrapper(model_wrapper)
    _check_cuda(wrapper.model, use_cuda)
    op = _operator(wrapper, loss_fn)
    out = []
    for which in ("SA", "LA"):
        with analysed(wrapper.model, eval_mode=True):
            res = lanczos_extreme(
                op,
                which,
                tol=tol,
                max_matvecs=max_iter,
                init=None,
                seed=seed,
                caller="min_max_hessian_eigs",
                budget="max_iter",
            )
        out.append((float(res.eigenvalues[0]), res.eigenvectors[0]))
    (min_eig, min_vec), (max_eig, max_vec) = out
    return min_eig, max_eig, min_vec, max_vec


def hessian_trace(
    model_wrapper: ModelWrapper,
    loss_fn: Callable[[Any], Tensor] | None = None,
    num_random_vectors: int = 100,
    use_cuda: bool = False,
    *,
    seed: int | None = None,
) -> float:
    """Hutchinson's ``tr(H)`` estimate, ``num_random_vectors`` Rademacher probes (Hutchinson 1989).

    ``seed`` fixes the probes (``None``: random).
    """
    from hessian_spectra.algorithms import hutchinson

    wrapper = _check_wrapper(model_wrapper)
    _check_cuda(wrapper.model, use_cuda)
    with analysed(wrapper.model, eval_mode=True):
        res = hutchinson(_operator(wrapper, loss_fn), num_matvecs=num_random_vectors, seed=seed)
    return float(res.estimate)


def install_import_aliases() -> None:
    """Let the guide's ``oxford_loss_landscapes...`` imports resolve to this module.

    Registers ``oxford_loss_landscapes``, ``.model_interface.model_wrapper``,
    ``.hessian.hessian`` and ``.hessian.hessian_trace`` in :data:`sys.modules`.

    Raises:
        RuntimeError: if a real ``oxford_loss_landscapes`` package is already
            imported (the aliases would shadow it).
    """
    this = sys.modules[__name__]
    for name in _ALIASES:
        mod = sys.modules.get(name)
        if (
            mod is not None
            and mod is not this
            and not getattr(mod, "_hessian_spectra_alias", False)
        ):
            raise RuntimeError(
                f"{name} is already imported from {getattr(mod, '__file__', '?')}; the aliases "
                "would shadow "
                "it. Import from hessian_spectra.compat.oxford instead"
            )
    for name in _ALIASES:
        alias = types.ModuleType(name)
        alias.__dict__.update(
            {k: getattr(this, k) for k in ("ModelWrapper", "min_max_hessian_eigs", "hessian_trace")}
        )
        alias.__path__ = []  # a package, so that submodule imports resolve
        alias._hessian_spectra_alias = True  # type: ignore[attr-defined]
        sys.modules[name] = alias
