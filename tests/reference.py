"""Independent references and tolerances shared by the tests.

Tolerances come from the dtype (a multiple of its machine epsilon) and live
here only. Dense Hessians are built with ``torch.func`` (``jacfwd(grad(f))``) over a
``functional_call`` in float64, independently of the library's operators.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

EPS_FACTOR = {torch.float64: 1e3, torch.float32: 1e2, torch.float16: 10.0, torch.bfloat16: 10.0}


def tol(dtype: torch.dtype, factor: float | None = None) -> float:
    """Relative tolerance for results computed in ``dtype``."""
    f = EPS_FACTOR.get(dtype, 1e2) if factor is None else factor
    return f * torch.finfo(dtype).eps


def flat_params(model: nn.Module, names: Sequence[str] | None = None) -> tuple[list[str], Tensor]:
    named = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, p in named.items() if p.requires_grad]
    return names, torch.cat([named[n].detach().reshape(-1) for n in names])


def dense_loss_hessian(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    names: Sequence[str] | None = None,
    *,
    batch_size: Callable[[Any], int] = lambda b: int(b[0].shape[0]),
) -> Tensor:
    """float64 Hessian of the sample-weighted mean loss over ``batches``.

    ``loss_fn(model, batch)`` is called on a float64 deep copy whose selected
    parameters are replaced through ``functional_call``.
    """
    m = copy.deepcopy(model).double()
    batches = [
        tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in b)
        if isinstance(b, (tuple, list))
        else b
        for b in batches
    ]
    names, theta = flat_params(m, names)
    shapes = [dict(m.named_parameters())[n].shape for n in names]
    sizes = [s.numel() for s in shapes]
    counts = [batch_size(b) for b in batches]
    total = sum(counts)

    def f(vec: Tensor) -> Tensor:
        parts = torch.split(vec, sizes)
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        proxy = _Proxy(m, params)
        return sum(c / total * loss_fn(proxy, b) for c, b in zip(counts, batches, strict=True))

    # forward-over-reverse of the gradient: torch.func.hessian (jacfwd of jacrev) is wrong
    # in torch 2.13 for LayerNorm/BatchNorm after a parameterised layer (it differentiates a
    # vmapped norm backward); jacfwd(grad(f)) agrees with torch.autograd.functional.hessian.
    return torch.func.jacfwd(torch.func.grad(f))(theta)


class _Proxy(nn.Module):
    """Calls ``model`` with some parameters replaced; looks like the model to a loss_fn."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_params", params)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._model, self._params, args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_model"), name)


def sym_matrix_with_spectrum(
    eigs: Sequence[float] | Tensor, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Q diag(eigs) Q^T with a random orthogonal Q (fixed by ``seed``)."""
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return ((Q * eigs) @ Q.T).to(dtype)


def matrix_operator(A: Tensor, dtype: torch.dtype = torch.float64):
    """``A`` as a :class:`LambdaOperator` in ``dtype`` (products ``V @ A``)."""
    from hessian_spectra.operators.base import LambdaOperator

    Ad = A.to(dtype)
    return LambdaOperator(matmat=lambda V: V @ Ad, size=A.shape[0], dtype=dtype)


def extreme_eigenvalues(A: Tensor, k: int, which: str) -> Tensor:
    """The ``k`` most wanted eigenvalues of ``A`` by ``eigvalsh`` (``"LA"``, ``"SA"``, ``"LM"``)."""
    ev = torch.linalg.eigvalsh(A)
    if which == "LA":
        return ev.flip(0)[:k]
    if which == "SA":
        return ev[:k]
    return ev[torch.argsort(ev.abs(), descending=True)][:k]


def check_pairs(A: Tensor, res: Any, k: int, which: str, rtol: float = 1e-6) -> None:
    """An eigensolver's result against ``eigvalsh``: values within ``rtol max|lambda|``
    (1e-6: what the default arguments promise)
    (sorted for ``"LM"``, where equal magnitudes may come in either order) and
    orthonormal vectors (no ghost copies)."""
    ref = extreme_eigenvalues(A, k, which)
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (k, A.shape[0])
    if which == "LM":
        got, want = res.eigenvalues.sort().values, ref.sort().values
    else:
        got, want = res.eigenvalues, ref
    assert torch.allclose(got, want, rtol=0, atol=rtol * scale)
    X = res.eigenvectors.double()
    assert torch.allclose(X @ X.T, torch.eye(k, dtype=torch.float64), atol=1e-5)
