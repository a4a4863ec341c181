"""Argument checks and precision rules shared by the algorithms."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from hessian_spectra.algorithms._space import allreduce_max, allreduce_sum, sharded, vector_space
from hessian_spectra.operators.base import CurvatureOperator, as_operator

logger = logging.getLogger("hessian_spectra")

__all__ = [
    "BlockApply",
    "counts_progress",
    "default_block_size",
    "default_tol",
    "gram",
    "in_vector_space",
    "log_eigen",
    "norm64",
    "orthonormal_rows",
    "positive_int",
    "product_bar",
    "symmetric_operator",
    "work_dtype",
]


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def in_vector_space(fn: _Fn) -> _Fn:
    """Run an algorithm ``fn(operator, ...)`` in its operator's vector space (plain, or
    sliced across ranks: see :mod:`._space`)."""

    @functools.wraps(fn)
    def run(operator: Any, *args: Any, **kwargs: Any) -> Any:
        with vector_space(operator):
            return fn(operator, *args, **kwargs)

    return cast(_Fn, run)


def counts_progress(desc: str, total: Callable[[dict[str, Any], Any], int]) -> Callable[[_Fn], _Fn]:
    """Give ``fn(operator, ..., progress=False)`` a bar of its operator's products:
    ``total(arguments, operator)`` products expected (the bar grows if more come)."""

    def decorate(fn: _Fn) -> _Fn:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if not bound.arguments.get("progress"):
                return fn(*args, **kwargs)
            from hessian_spectra.progress import operator_progress

            op = as_operator(bound.arguments["operator"])
            bound.arguments["operator"] = op
            try:
                expected = int(total(bound.arguments, op))
            except (TypeError, ValueError):  # bad arguments: the function says what is wrong
                expected = 0
            with operator_progress(op, True, total=max(expected, 0), desc=desc):
                return fn(*bound.args, **bound.kwargs)

        return cast(_Fn, run)

    return decorate


def symmetric_operator(op: CurvatureOperator | Tensor, fn: str) -> CurvatureOperator:
    """``as_operator(op)``, refusing an operator declared non-symmetric."""
    op = as_operator(op)
    if not getattr(op, "symmetric", True):
        raise ValueError(
            f"{fn} needs a symmetric operator, got {type(op).__name__} declared symmetric=False; "
            "symmetrise it, e.g. with a LambdaOperator computing (A v + A^T v) / 2"
        )
    return op


def positive_int(value: object, name: str, fn: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; ``TypeError``/``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return int(value)


def positive_float(value: object, name: str, fn: str) -> float:
    """``value`` as a finite float ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value}")
    return float(value)


def gram(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B^T`` for row blocks ``(p, n)`` and ``(q, n)``, accumulated in float64.

    Float32 BLAS products sum along ``n`` in float32 (a relative error near
    ``sqrt(n) eps``: 2e-6 for ``n = 2e5``, too much for a 1e-6 residual test), so
    float32 inputs are multiplied in column chunks (at most 64 of them, at least
    8192 columns each) whose partial products are added in float64. For vectors
    split across ranks (:mod:`._space`) the slices' products are summed over them.
    """
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return allreduce_sum(A @ B.T)
    n = A.shape[1]
    chunk = max(8192, -(-n // 64))
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for s in range(0, n, chunk):
        out += (A[:, s : s + chunk] @ B[:, s : s + chunk].T).double()
    return allreduce_sum(out)


def norm64(x: Tensor, dim: int | None = None) -> Tensor:
    """Euclidean norm accumulated in float64 (see :func:`gram`), over all ranks' slices."""
    if not sharded():
        return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64)
    sq = x.double().pow(2).sum() if dim is None else x.double().pow(2).sum(dim)
    return allreduce_sum(sq).sqrt()


def orthonormal_rows(B: Tensor, rtol: float = 1e-10) -> Tensor:
    """An orthonormal basis of the span of the rows of ``B`` (``(k, n)`` to ``(r, n)``,
    ``r <= k``; directions below ``rtol`` of ``B``'s scale are dropped).

    Householder QR of ``B^T`` on plain vectors; on vectors split across ranks, the
    eigendecomposition of the Gram matrix ``B B^T`` (summed over the ranks), applied
    twice for orthogonality to working precision.
    """
    if not sharded():
        Q, R = torch.linalg.qr(B.T)
        d = R.diagonal().abs()
        good = d > rtol * max(float(d.max()) if d.numel() else 0.0, 1e-300)
        return Q.T[good].contiguous()
    X = B
    for _ in range(2):
        S, U = torch.linalg.eigh(gram(X, X).cpu())
        keep = (rtol**2 * S.max().clamp_min(1e-300)) < S
        U, S = U[:, keep], S[keep]
        X = ((U / S.sqrt()).T.to(device=X.device, dtype=X.dtype)) @ X
    return X.contiguous()


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the vectors an algorithm keeps: float64 for float64 operators, else float32.

    bf16/fp16 operators get float32 vectors (cast to the operator dtype only for
    the products), so orthogonality is kept to float32 accuracy.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_tol(dtype: torch.dtype) -> float:
    """Default relative residual tolerance for an operator of ``dtype``.

    ``1e-6`` for float64, ``1e-5`` for float32, ``max(1e-6, 4 * eps)`` otherwise
    (``3.9e-3`` for float16, ``3.1e-2`` for bfloat16). Products rounded to
    ``dtype`` leave a residual floor: for float32 network Hessians it was measured
    at ``2e-7 - 7e-7 * max|lambda|`` (rounding accumulates through the layers), so
    ``1e-6`` sat too close to it and runs stalled just above it; ``1e-5`` keeps
    the eigenvalue error near ``residual^2 / gap``, far below ``1e-6`` relative
    on ordinary spectra.
    """
    if not dtype.is_floating_point:
        return 1e-6
    if dtype == torch.float32:
        return 1e-5
    return max(1e-6, 4.0 * torch.finfo(dtype).eps)


def default_block_size(n: int, dtype: torch.dtype, num: int, *, budget_bytes: int = 2**28) -> int:
    """Vectors per product block: all ``num`` if they fit in ``budget_bytes`` (256 MiB)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    fit = max(1, budget_bytes // max(1, n * itemsize))
    return max(1, min(num, fit))


class BlockApply:
    """Products of work-precision blocks with an operator, counted, optionally rescaled.

    ``apply(V)`` casts the ``(b, n)`` block to the operator dtype, multiplies and
    casts back to the work dtype; :attr:`count` holds the products done and an
    optional ``on_products(b)`` callback sees each block (progress bars).

    With ``rescale=True`` the products are those of ``factor * A``, where the
    power of two :attr:`factor` is fixed by the first non-zero product: ``1``
    when its largest entry lies within ``2^(+-e/4)`` (``e`` the work dtype's
    largest exponent: ``2^(+-256)`` in float64), else the power of two that
    brings it to about 1. Squares of the entries (norms, Gram matrices) then
    neither overflow nor underflow, so the algebra is the same at any scale;
    the algorithms divide eigenvalues and residuals by :attr:`factor` again
    (:meth:`unscale`). Scaling by a power of two is exact.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        wd: torch.dtype,
        on_products: Callable[[int], None] | None = None,
        *,
        rescale: bool = False,
        factor: float | None = None,
    ) -> None:
        self.op, self.wd, self.count, self._cb = op, wd, 0, on_products
        self.factor = 1.0 if factor is None else factor
        self._decided = not rescale or factor is not None

    def __call__(self, V: Tensor) -> Tensor:
        out = self.op.matmat(V.to(self.op.dtype)).to(self.wd)
        self.count += V.shape[0]
        if self._cb is not None:
            self._cb(V.shape[0])
        if not self._decided:
            self._decide(out)
        return out if self.factor == 1.0 else out * self.factor

    def _decide(self, out: Tensor) -> None:
        big = allreduce_max(float(out.abs().max()) if out.numel() else 0.0)
        if big == 0.0 or not math.isfinite(big):
            return  # all products so far are zero: any factor fits them; decide later
        self._decided = True
        limit = math.frexp(torch.finfo(self.wd).max)[1] // 4  # 256 in float64, 32 in float32
        e = math.frexp(big)[1]
        if abs(e) > limit:
            self.factor = math.ldexp(1.0, -e)

    @property
    def decided_factor(self) -> float | None:
        """:attr:`factor` once fixed, ``None`` while every product has been zero."""
        return self.factor if self._decided else None

    def unscale(self, x: Tensor | float) -> Any:
        """``x`` measured on the rescaled products, in the operator's own units."""
        return x if self.factor == 1.0 else x / self.factor


def log_eigen(fn: str, res: Any, **settings: Any) -> Any:
    """Record an eigensolver's settings and outcome on the ``hessian_spectra`` logger; returns ``res``."""
    if logger.isEnabledFor(logging.INFO):
        extra = ", ".join(f"{k}={v}" for k, v in settings.items())
        logger.info(
            "%s: k=%d which=%s %s: %d products, %d steps, restarts=%s, converged=%s (max residual %.2e)",
            fn,
            len(res.eigenvalues),
            res.which,
            extra,
            res.num_matvecs,
            res.iterations,
            res.info.get("restarts"),
            res.converged,
            float(res.residuals.max()) if res.residuals.numel() else 0.0,
        )
    return res


@contextlib.contextmanager
def product_bar(
    progress: bool | None, total: int, desc: str, expected: int | None = None
) -> Iterator[Callable[[int], Any] | None]:
    """A tqdm bar of products used (its ``update``), or ``None`` without ``progress``.

    The bar's total is the ``expected`` number of products (one Krylov space and the
    residual checks), not the budget ``total``; it grows (up to the budget) when a
    run needs more, and is set to the count at the end, so a finished run reads 100%.
    ``HESSIAN_SPECTRA_PROGRESS=0`` turns every bar off.
    """
    from hessian_spectra.progress import bars_allowed

    if not progress or not bars_allowed():
        yield None
        return
    from tqdm.auto import tqdm

    first = min(total, expected) if expected else total
    step = max(first, 1)
    with tqdm(total=first, desc=desc, unit="matvec") as bar:

        def update(b: int) -> None:
            if bar.n + b > bar.total:
                bar.total = min(total, max(bar.n + b, bar.total + step))
            bar.update(b)

        try:
            yield update
        finally:
            bar.total = bar.n
            bar.refresh()
