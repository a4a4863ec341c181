"""The operator contract: a symmetric matrix known only through its products.

A subclass implements ``_matmat(V)`` for a ``(k, n)`` block (one vector per row)
plus ``size``/``dtype``/``device``; the public :meth:`CurvatureOperator.matvec`,
:meth:`CurvatureOperator.matmat` and ``@`` validate the input, count the products
and delegate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "LambdaOperator",
    "as_device",
    "as_dtype",
    "as_operator",
]


class CurvatureOperator(ABC):
    """A real ``n x n`` matrix available through matrix-vector products.

    Blocks of vectors are ``(k, n)`` tensors, one vector per row; ``op @ V``
    returns the ``(k, n)`` block whose rows are ``A v_i``.

    Attributes:
        num_matvecs: products computed so far (a block of ``k`` counts ``k``).
    """

    symmetric: bool = True

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

    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """``(k, n) -> (k, n)`` product of the already validated block ``V``."""

    # -- public interface ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

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
        if v.dim() != 1 or v.shape[0] != self.size:
            raise ValueError(
                f"matvec: expected a vector of shape ({self.size},), got {tuple(v.shape)}"
                + ("; use matmat for a (k, n) block" if v.dim() == 2 else "")
            )
        return self._counted(v.unsqueeze(0))[0]

    def matmat(self, V: Tensor) -> Tensor:
        """Rows ``A v_i`` for a block ``V`` of shape ``(k, n)``."""
        self._check(V, "matmat")
        if V.dim() != 2 or V.shape[1] != self.size:
            hint = ""
            if V.dim() == 2 and V.shape[0] == self.size:
                hint = "; blocks are (k, n), one vector per row: pass V.T"
            raise ValueError(
                f"matmat: expected a block of shape (k, {self.size}), got {tuple(V.shape)}{hint}"
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
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 1:
            return self.matvec(x)
        return self.matmat(x)

    @property
    def product_mechanisms(self) -> tuple[str, ...]:
        """How this operator runs a block's rows, if it has a choice (``"auto"`` until
        its first block measures it, then ``"vmap"`` or ``"loop"``); ``()`` for an
        operator with one way. ``eigenpairs`` times a block again when it changed this."""
        return ()

    @property
    def block_row_cost(self) -> float | None:
        """What a row of a block cost in the last product, relative to a row done on its
        own (``1.0``: the rows shared no work, so a block of ``b`` costs about ``b``
        single products), when the operator knows it; ``None`` when it does not.
        ``eigenpairs`` runs ``lanczos`` at once when no block could pay at this cost."""
        return None

    def reset_counter(self) -> None:
        """Set :attr:`num_matvecs` back to zero."""
        self.num_matvecs = 0

    def to_dense(self, *, chunk_size: int = 64) -> Tensor:
        """The full ``(n, n)`` matrix, built from products with identity rows.

        Only for small operators: costs ``n`` products and ``n^2`` memory.
        """
        n = self.size
        if n > 50_000:
            raise ValueError(
                f"to_dense() on an operator of size {n} would need {n * n} entries; too large"
            )
        rows = []
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            E = torch.zeros(stop - start, n, dtype=self.dtype, device=self.device)
            E[torch.arange(stop - start), torch.arange(start, stop)] = 1
            rows.append(self.matmat(E))
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
        matvec: ``(n,) -> (n,)``; a block is then computed row by row.
        matmat: ``(k, n) -> (k, n)``; preferred when the function can batch.
        size: the dimension ``n``.
        dtype, device: of the vectors (default float32 on CPU); a dtype may be
            given by name (``"float64"``), and a device this machine lacks
            (``"cuda"`` on a CPU build) is refused at once.
        symmetric: whether the matrix is symmetric (symmetric-only algorithms
            refuse an operator declared non-symmetric).

    Example:
        >>> op = LambdaOperator(matvec=lambda v: 2.0 * v, size=3)
        >>> op @ torch.ones(3)
        tensor([2., 2., 2.])
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor] | None = None,
        matmat: Callable[[Tensor], Tensor] | None = None,
        *,
        size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if (matvec is None) == (matmat is None):
            raise ValueError("LambdaOperator needs exactly one of matvec= or matmat=")
        if not isinstance(size, int) or size < 1:
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

    def to_dense(self, *, chunk_size: int = 64) -> Tensor:
        return self.matrix.clone()


def as_operator(op: CurvatureOperator | Tensor) -> CurvatureOperator:
    """Accept an operator or a plain square tensor (wrapped in :class:`DenseOperator`)."""
    if isinstance(op, CurvatureOperator):
        return op
    if isinstance(op, Tensor):
        return DenseOperator(op)
    raise TypeError(
        f"expected a CurvatureOperator or a square torch.Tensor, got {type(op).__name__}; "
        "wrap a function with LambdaOperator(matvec=..., size=n)"
    )
