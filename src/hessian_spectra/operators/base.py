"""The operator contract: a symmetric matrix known only through its products.

A subclass implements ``_matmat(V)`` for a ``(k, n)`` block (one vector per row)
plus ``size``/``dtype``/``device``; the public :meth:`CurvatureOperator.matvec`,
:meth:`CurvatureOperator.matmat` and ``@`` validate the input, count the products
and delegate.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor

from hessian_spectra.operators._finite import (
    NonFiniteError,
    all_finite,
    check_finite_input,
    nonfinite_rows,
)

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "ForeignOperator",
    "LambdaOperator",
    "as_device",
    "as_dtype",
    "as_operator",
    "keeping_graphs",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def keeping_graphs(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` inside :meth:`CurvatureOperator.keep_graphs` of every operator among
    its arguments: what an operator keeps between the products of one call (a
    Hessian's gradient graphs) is dropped when the call returns or raises."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with contextlib.ExitStack() as scopes:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, CurvatureOperator):
                    scopes.enter_context(arg.keep_graphs())
            return fn(*args, **kwargs)

    return run


class CurvatureOperator(ABC):
    """A real ``n x n`` matrix available through matrix-vector products.

    Blocks of vectors are ``(k, n)`` tensors, one vector per row; ``op @ V``
    returns the ``(k, n)`` block whose rows are ``A v_i``.

    Attributes:
        num_matvecs: products computed so far (a block of ``k`` counts ``k``).
    """

    symmetric: bool = True
    num_matvecs: int = 0  # also for subclasses that do not call __init__
    _checks_finite: bool = False  # True: _matmat raises NonFiniteError itself (per batch)
    _graph_scopes: int = 0  # open keep_graphs() blocks

    def __init__(self) -> None:
        self.num_matvecs = 0

    # -- what a subclass provides -------------------------------------------------
    @property
    @abstractmethod
    def size(self) -> int:
        """The dimension ``n``."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the vectors the operator takes and returns."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device of the vectors the operator takes and returns."""

    def _matmat(self, V: Tensor) -> Tensor:
        """``(k, n) -> (k, n)`` product of the already validated block ``V``.

        Implement this (sharing work across the rows where possible). A subclass
        written for hessian-eigenthings implements ``matvec(v)`` (or ``_matvec(v)``)
        for one vector instead; blocks then go through it row by row.
        """
        one = self._one_vector_product()
        return torch.stack([one(v) for v in V])

    def _one_vector_product(self) -> Callable[[Tensor], Tensor]:
        cls = type(self)
        if cls.matvec is not CurvatureOperator.matvec:
            return self.matvec
        mv = getattr(self, "_matvec", None)
        if callable(mv):
            return mv
        raise TypeError(
            f"{cls.__name__} implements no product: a CurvatureOperator subclass implements "
            "_matmat(V) for a (k, n) block, or matvec(v) / _matvec(v) for one vector"
        )

    # -- public interface ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def vector_length(self) -> int:
        """Entries of the vectors this process holds: ``size``, or this rank's slice for an
        operator on vectors split across ranks (see :attr:`backend`)."""
        return self.size

    @property
    def backend(self) -> Any:
        """How the operator's vectors are stored: a
        :class:`~hessian_spectra.linalg.SingleDeviceBackend` (plain tensors), or a
        :class:`~hessian_spectra.linalg.ShardedBackend` for vectors split across ranks."""
        from hessian_spectra.linalg.backend import SINGLE_DEVICE

        return SINGLE_DEVICE

    def _check(self, V: Tensor, what: str) -> None:
        if not isinstance(V, Tensor):
            raise TypeError(f"{what} expects a torch.Tensor, got {type(V).__name__}")
        if V.layout != torch.strided:
            raise TypeError(
                f"{what} expects a dense (strided) tensor, got one with layout {V.layout}; "
                "convert it with v.to_dense()"
            )
        if V.dtype != self.dtype:
            raise ValueError(
                f"{what}: expected dtype {self.dtype}, got {V.dtype}; convert with v.to({self.dtype})"
            )
        if V.device != self.device and not (
            V.device.type == self.device.type
            and (V.device.index is None or self.device.index is None)
        ):
            raise ValueError(
                f"{what}: expected a tensor on {self.device}, got one on {V.device}; "
                f"move it with v.to('{self.device}')"
            )

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a vector of shape ``(n,)``."""
        self._check(v, "matvec")
        if v.dim() != 1 or v.shape[0] != self.vector_length:
            raise ValueError(
                f"matvec: expected a vector of shape ({self.vector_length},), got {tuple(v.shape)}"
                + ("; use matmat for a (k, n) block" if v.dim() == 2 else "")
            )
        return self._counted(v.unsqueeze(0))[0]

    def matmat(self, V: Tensor) -> Tensor:
        """Rows ``A v_i`` for a block ``V`` of shape ``(k, n)``."""
        self._check(V, "matmat")
        if V.dim() != 2 or V.shape[1] != self.vector_length:
            hint = ""
            if V.dim() == 2 and V.shape[0] == self.vector_length:
                hint = "; blocks are (k, n), one vector per row: pass V.T"
            raise ValueError(
                f"matmat: expected a block of shape (k, {self.vector_length}), got "
                f"{tuple(V.shape)}{hint}"
            )
        if V.shape[0] == 0:
            return V.clone()
        return self._counted(V)

    def _counted(self, V: Tensor) -> Tensor:
        out = self._matmat(V).detach()  # products never carry an autograd graph out
        if out.shape != V.shape:
            raise RuntimeError(
                f"{type(self).__name__}._matmat returned shape {tuple(out.shape)} for input {tuple(V.shape)}"
            )
        self.num_matvecs += V.shape[0]
        if not self._checks_finite and not all_finite(out):
            who = type(self).__name__
            check_finite_input(V, who)
            raise NonFiniteError(
                f"{who}: the product of a finite block holds NaN or inf (rows "
                f"{nonfinite_rows(out)} of {V.shape[0]}); no algorithm can use it. Check the "
                "matrix or the function behind the operator for NaN/inf (or an overflow in "
                f"{self.dtype})"
            )
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 1:
            return self.matvec(x)
        return self.matmat(x)

    def __call__(self, x: Tensor) -> Tensor:
        """``op(v)`` is ``op @ v``."""
        return self @ x

    def rmatvec(self, v: Tensor) -> Tensor:
        """``v^T A`` as a vector: ``A^T v``, which is ``A v`` for a symmetric operator."""
        if not self.symmetric:
            raise NotImplementedError(
                f"{type(self).__name__} is declared non-symmetric and has no transpose product"
            )
        return self.matvec(v)

    @property
    def product_mechanisms(self) -> tuple[str, ...]:
        """How this operator runs a block's rows, if it has a choice (``"auto"``,
        ``"vmap"`` or ``"loop"``: :mod:`~hessian_spectra.operators._mechanism`); ``()``
        for an operator with one way."""
        return ()

    @property
    def block_row_cost(self) -> float | None:
        """What each row of a block adds to its cost, relative to one product on its own
        (``r``: a block of ``b`` costs about ``1 + r (b - 1)`` single products; ``1.0``:
        the rows share no work), when the operator knows it; ``None`` when it does not.
        A stated property of the operator, never a timing. ``eigenpairs(method="auto")``
        chooses blocks from it, and ``lanczos`` when it is ``None``."""
        return None

    def common_seed(self, seed: Any) -> Any:
        """The seed an algorithm uses for ``seed``: ``seed`` itself, except that an operator
        shared by several processes replaces ``None`` by one random draw that every process
        receives (so all ranks multiply the same random vectors)."""
        return seed

    @contextlib.contextmanager
    def keep_graphs(self) -> Iterator[None]:
        """A block inside which the operator may keep work between products.

        A model operator's product runs a forward pass and a first backward per batch
        that do not depend on the vectors; inside this block the operator may keep
        them (the :class:`~hessian_spectra.operators.HessianOperator` keeps each
        batch's gradient graph) so later products cost only their second backward.
        Every algorithm opens one around its own products. On exit, normal or by an
        exception (``KeyboardInterrupt`` too), whatever was kept is dropped; an inner
        block leaves the outer one's work in place. Outside any block every product
        starts from the model, data and loss as they are then.

        Inside the block, change nothing the products depend on (parameters, buffers,
        module attributes or modes, the loss function or what it captures, the data,
        ``seed``, autocast): products would keep using what was kept. An operator
        that keeps nothing ignores the block.

        Example:
            >>> op = DenseOperator(torch.eye(3))
            >>> with op.keep_graphs():
            ...     w = op @ (op @ torch.ones(3))
        """
        self._graph_scopes += 1
        try:
            yield
        finally:
            self._graph_scopes -= 1
            if self._graph_scopes == 0:
                self.clear_graphs()

    def clear_graphs(self) -> None:
        """Drop what :meth:`keep_graphs` kept (this operator keeps nothing)."""
        return None

    def reset_counter(self) -> None:
        """Set :attr:`num_matvecs` back to zero."""
        self.num_matvecs = 0

    @keeping_graphs
    def to_dense(self, *, chunk_size: int = 64, progress: bool = False) -> Tensor:
        """The full ``(n, n)`` matrix, built from products with identity rows.

        Only for small operators: costs ``n`` products and ``n^2`` memory. ``progress``
        shows a bar of the products (``HESSIAN_SPECTRA_PROGRESS=0`` turns every bar off).
        """
        from hessian_spectra.progress import progress_bar

        n = self.size
        if n > 50_000:
            raise ValueError(
                f"to_dense() on an operator of size {n} would need {n * n} entries; too large"
            )
        rows = []
        with progress_bar(progress, total=n, desc="to_dense") as update:
            for start in range(0, n, chunk_size):
                stop = min(n, start + chunk_size)
                E = torch.zeros(stop - start, n, dtype=self.dtype, device=self.device)
                E[torch.arange(stop - start), torch.arange(start, stop)] = 1
                rows.append(self.matmat(E))
                update(stop - start)
        # rows are A e_i = column i of A; stack as columns
        return torch.cat(rows, dim=0).T.contiguous()

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` view in float64 (products go through NumPy)."""
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - scipy is a test dependency
            raise ImportError(
                "to_scipy() needs scipy: pip install 'hessian-spectra[scipy]'"
            ) from err

        def _mm(X: Any) -> Any:
            X = np.asarray(X, dtype=np.float64)
            vec = X.ndim == 1
            t = torch.as_tensor(X.reshape(X.shape[0], -1).T.copy(), device=self.device).to(
                self.dtype
            )
            out = self.matmat(t).T.detach().to("cpu", torch.float64).numpy()
            return out[:, 0] if vec else out

        return LinearOperator(
            shape=self.shape, matvec=_mm, rmatvec=_mm, matmat=_mm, dtype=np.float64
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device})"


class LambdaOperator(CurvatureOperator):
    """An operator from a function: ``matvec`` for one vector or ``matmat`` for a block.

    Args:
        matvec_fn: ``(n,) -> (n,)``; a block is then computed row by row (also
            accepted as ``matvec=``). Positional order as in hessian-eigenthings:
            ``LambdaOperator(matvec_fn, size, device, dtype)``.
        size: the dimension ``n``.
        device, dtype: of the vectors (default float32 on CPU); a dtype may be
            given by name (``"float64"``), and a device this machine lacks
            (``"cuda"`` on a CPU build) is refused at once.
        matmat: ``(k, n) -> (k, n)`` instead of ``matvec``; preferred when the
            function can batch.
        symmetric: whether the matrix is symmetric (symmetric-only algorithms
            refuse an operator declared non-symmetric).

    Example:
        >>> op = LambdaOperator(matvec=lambda v: 2.0 * v, size=3)
        >>> op @ torch.ones(3)
        tensor([2., 2., 2.])
    """

    def __init__(
        self,
        matvec_fn: Callable[[Tensor], Tensor] | None = None,
        size: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        matvec: Callable[[Tensor], Tensor] | None = None,
        matmat: Callable[[Tensor], Tensor] | None = None,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if matvec_fn is not None and matvec is not None:
            raise ValueError("LambdaOperator: matvec_fn and matvec are the same function; give one")
        matvec = matvec if matvec is not None else matvec_fn
        if (matvec is None) == (matmat is None):
            raise ValueError("LambdaOperator needs exactly one of matvec= or matmat=")
        for name, fn in (("matvec", matvec), ("matmat", matmat)):
            if fn is not None and not callable(fn):
                raise TypeError(f"LambdaOperator: {name} must be callable, got {type(fn).__name__}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self._mv, self._mm = matvec, matmat
        self._size, self._dtype, self._device = size, as_dtype(dtype), as_device(device)
        self.symmetric = symmetric

    @property
    def size(self) -> int:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _matmat(self, V: Tensor) -> Tensor:
        if self._mm is not None:
            return self._mm(V)
        assert self._mv is not None
        return torch.stack([self._mv(v) for v in V])


def as_dtype(dtype: Any) -> torch.dtype:
    """A ``torch.dtype`` from itself or its name (``"float64"``, ``"torch.float64"``).

    Raises:
        TypeError: anything else.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise TypeError(
        f"dtype must be a torch.dtype (e.g. torch.float64) or its name ('float64'), got {dtype!r}"
    )


def as_device(device: Any) -> torch.device:
    """A ``torch.device`` that this machine has, from a device or its name.

    Raises:
        ValueError: not a device name, or a CUDA/MPS device that this build of torch
            or this machine does not have.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {device!r}"
            ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(dev)!r} needs CUDA, but torch.cuda.is_available() is False (a CPU "
            "build of torch, or no GPU visible); use device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(dev)!r} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and not (mps is not None and mps.is_available()):
        raise ValueError(f"device {str(dev)!r} needs MPS, which is not available here")
    return dev


class DenseOperator(CurvatureOperator):
    """An explicit ``(n, n)`` matrix as an operator (tests, small problems).

    Args:
        matrix: a square tensor.
        symmetric: declared symmetry; ``None`` checks it to a dtype tolerance.
    """

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None) -> None:
        super().__init__()
        if (
            not isinstance(matrix, Tensor)
            or matrix.dim() != 2
            or matrix.shape[0] != matrix.shape[1]
        ):
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"DenseOperator needs a square (n, n) tensor, got {shape}")
        if matrix.shape[0] == 0:
            raise ValueError(
                "DenseOperator needs a non-empty (n, n) matrix with n >= 1, got shape (0, 0)"
            )
        if matrix.layout != torch.strided:
            raise TypeError(
                f"DenseOperator needs a dense (strided) matrix, got layout {matrix.layout}; "
                "convert it with matrix.to_dense()"
            )
        self.matrix = matrix
        if symmetric is None:
            tol = 100 * torch.finfo(matrix.dtype).eps if matrix.is_floating_point() else 0.0
            scale = matrix.abs().max().item() if matrix.numel() else 0.0
            symmetric = bool((matrix - matrix.T).abs().max().item() <= tol * max(scale, 1e-300))
        self.symmetric = symmetric

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def _matmat(self, V: Tensor) -> Tensor:
        return V @ self.matrix.T

    @keeping_graphs
    def to_dense(self, *, chunk_size: int = 64, progress: bool = False) -> Tensor:
        return self.matrix.clone()


def as_operator(op: Any) -> CurvatureOperator:
    """Accept an operator, a plain square tensor (wrapped in :class:`DenseOperator`), a
    :class:`scipy.sparse.linalg.LinearOperator` or NumPy array, or a torch linear operator
    of another library (curvlinops' ``CurvatureLinearOperator``: ``shape``, a torch
    ``dtype``, ``device`` and ``op @ X`` for ``(n, k)`` tensors); see
    :class:`ForeignOperator`.

    Raises:
        TypeError: ``op`` is none of these, or its dtype is not a real floating-point
            one (integer, bool or complex): the algorithms compute in real floating
            point, so such an operator is refused rather than converted.
    """
    if isinstance(op, CurvatureOperator | Tensor):
        _check_real_float(op)
        return op if isinstance(op, CurvatureOperator) else DenseOperator(op)
    if ForeignOperator.accepts(op):
        foreign = ForeignOperator(op)
        _check_real_float(foreign)
        return foreign
    raise TypeError(
        f"expected a CurvatureOperator, a square torch.Tensor, a scipy LinearOperator or a "
        f"curvlinops operator, got {type(op).__name__}; "
        "wrap a function with LambdaOperator(matvec=..., size=n)"
    )


class ForeignOperator(CurvatureOperator):
    """A square linear operator of another library, seen through this contract.

    * torch operators (curvlinops 2.x ``CurvatureLinearOperator`` and the like):
      ``shape``, a ``torch.dtype`` ``dtype``, ``device``, and ``op @ X`` for a
      ``(n, k)`` tensor; a block ``V`` goes in as ``V.T``.
    * :class:`scipy.sparse.linalg.LinearOperator` and NumPy arrays (curvlinops 1.x
      operators are scipy ones): ``matmat`` (or ``@``) on float64/float32 NumPy
      arrays; each block goes through the CPU.

    Like scipy's ``eigsh``, the symmetric algorithms take it as symmetric (curvature
    matrices are); pass ``symmetric=False`` for one that is not.

    Example:
        >>> from scipy.sparse.linalg import aslinearoperator
        >>> import numpy as np
        >>> op = as_operator(aslinearoperator(np.diag([1.0, 2.0, 3.0])))
        >>> op @ torch.ones(3, dtype=torch.float64)
        tensor([1., 2., 3.], dtype=torch.float64)
    """

    def __init__(self, op: Any, *, symmetric: bool = True) -> None:
        super().__init__()
        shape = tuple(op.shape)
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
            raise ValueError(f"expected a square operator, got shape {shape}")
        self.wrapped, self.symmetric = op, symmetric
        self._size = int(shape[0])
        self._torch = isinstance(getattr(op, "dtype", None), torch.dtype)
        if self._torch:
            self._dtype: torch.dtype = op.dtype
            self._device = torch.device(getattr(op, "device", "cpu"))
        else:
            import numpy as np

            kind = np.dtype(op.dtype)
            if kind.kind != "f":
                raise TypeError(
                    f"expected a real floating-point operator, got dtype {kind}; "
                    "convert it to float64 or float32"
                )
            self._dtype = torch.float64 if kind.itemsize == 8 else torch.float32
            self._device = torch.device("cpu")

    @staticmethod
    def accepts(op: Any) -> bool:
        shape = getattr(op, "shape", None)
        if shape is None or len(tuple(shape)) != 2:
            return False
        return callable(getattr(op, "matmat", None)) or callable(getattr(op, "__matmul__", None))

    @property
    def size(self) -> int:
        return self._size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _matmat(self, V: Tensor) -> Tensor:
        if self._torch:
            return (self.wrapped @ V.T.contiguous()).T.to(self._dtype)
        X = V.T.detach().cpu().numpy()
        mm = getattr(self.wrapped, "matmat", None)
        Y = mm(X) if callable(mm) else self.wrapped @ X
        return torch.as_tensor(Y, dtype=self._dtype).T.contiguous()

    def __repr__(self) -> str:
        return (
            f"ForeignOperator({type(self.wrapped).__name__}, size={self.size}, dtype={self.dtype})"
        )


def _check_real_float(op: CurvatureOperator | Tensor) -> None:
    dtype = op.dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return
    matrix = isinstance(op, Tensor | DenseOperator)
    what = "a matrix" if matrix else f"a {type(op).__name__}"
    fix = (
        "convert it with A.to(torch.float64) (or float32)"
        if matrix
        else "build it with dtype=torch.float64 (or float32) and return real floating products"
    )
    raise TypeError(
        f"expected an operator of a real floating-point dtype (float64, float32, float16 or "
        f"bfloat16), got {what} of dtype {dtype}: integer products would be truncated and "
        f"complex ones are not supported; {fix}"
    )
