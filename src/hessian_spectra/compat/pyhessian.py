"""PyHessian's ``hessian`` class, computed by this library.

Code written for PyHessian (Yao, Gholami, Keutzer, Mahoney 2020) runs with the
import changed::

    from hessian_spectra.compat.pyhessian import hessian

    hessian_comp = hessian(model, criterion, dataloader=train_loader, cuda=False)
    top_eigenvalues, top_eigenvectors = hessian_comp.eigenvalues(top_n=2)
    trace = np.mean(hessian_comp.trace())
    density_eigen, density_weight = hessian_comp.density()

The return values have PyHessian's shapes (lists of floats; eigenvectors as
lists of per-parameter tensors; per-run lists of Ritz values and weights). The
numbers come from :func:`~hessian_spectra.lanczos`,
:func:`~hessian_spectra.hutch_plus_plus` and
:func:`~hessian_spectra.spectral_density` on a
:class:`~hessian_spectra.HessianOperator`, so they differ from PyHessian's where
PyHessian's are wrong:

* ``eigenvalues`` are converged to a true residual (PyHessian stops power
  iteration when the eigenvalue changes by less than ``tol``, far from the
  eigenvector); ``maxIter`` and ``tol`` are accepted and not used.
* ``trace`` returns up to ``maxIter`` per-probe values whose mean is the Hutch++
  estimate of ``maxIter`` products (the values of its Hutchinson part, shifted) (PyHessian stops when the running mean changes little, and never when
  it is negative); ``tol`` is not used.
* ``density`` runs fully reorthogonalized Lanczos.
* Batches are weighted by their sample counts (PyHessian does too), on the
  model's own device (``cuda=`` is accepted; the model's device decides), in
  eval mode as PyHessian computes, but the model's mode is restored afterwards
  (PyHessian leaves it in eval mode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hessian_spectra.algorithms import hutch_plus_plus, lanczos, spectral_density
from hessian_spectra.algorithms.results import EigenResult, SpectralDensityResult, TraceResult
from hessian_spectra.dense.blocks import analysed
from hessian_spectra.losses.standard import supervised_loss
from hessian_spectra.operators.hessian import HessianOperator

__all__ = ["hessian"]


class hessian:  # noqa: N801 - PyHessian's name
    """PyHessian's entry point: the Hessian of ``criterion(model(x), y)``.

    Args:
        model: the network (left bit-identical, its train/eval mode included).
        criterion: ``(outputs, targets) -> loss``, e.g. ``nn.CrossEntropyLoss()``.
        data: one ``(inputs, targets)`` batch; or
        dataloader: an iterable of such batches (exactly one of the two).
        cuda: accepted for PyHessian's signature; tensors follow the model's device.
        seed: seed of the random vectors (``None``: fresh entropy).

    Attributes:
        operator: the :class:`~hessian_spectra.HessianOperator` behind it.
        results: the full result objects of the last calls (``"eigenvalues"``,
            ``"trace"``, ``"density"``), with residuals, standard errors and
            ``converged`` flags.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Any,
        data: Any = None,
        dataloader: Any = None,
        cuda: bool = True,
        *,
        seed: int | None = None,
    ) -> None:
        if (data is None) == (dataloader is None):
            raise ValueError(
                "hessian(model, criterion, data=..., dataloader=...) takes exactly one of data "
                "(one (inputs, targets) batch) and dataloader (an iterable of batches)"
            )
        if not callable(criterion):
            raise TypeError(
                f"criterion must be a callable (outputs, targets) -> loss such as "
                f"nn.CrossEntropyLoss(), got {type(criterion).__name__}"
            )
        self.model, self.criterion, self.cuda, self.seed = model, criterion, cuda, seed
        self.full_dataset = data is None
        batches = dataloader if data is None else [data]
        device = next(model.parameters()).device
        with analysed(model, eval_mode=True):
            self.operator = HessianOperator(
                model, _on(batches, device), supervised_loss(criterion), cache=True
            )
        self.params = list(self.operator.params)
        self.results: dict[str, EigenResult | TraceResult | SpectralDensityResult] = {}

    def _split(self, v: Tensor) -> list[Tensor]:
        return [t.clone() for t in self.operator.layout.split(v)]

    def eigenvalues(
        self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1
    ) -> tuple[list[float], list[list[Tensor]]]:
        """The ``top_n`` eigenvalues of largest magnitude (as power iteration finds them)
        and their eigenvectors as lists of per-parameter tensors."""
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be an int >= 1, got {top_n!r}")
        with analysed(self.model, eval_mode=True):
            res = lanczos(self.operator, k=top_n, which="LM", seed=self.seed)
        self.results["eigenvalues"] = res
        vectors = [self._split(v) for v in res.eigenvectors]
        return [float(x) for x in res.eigenvalues], vectors

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:
        """Per-probe values whose mean is the Hutch++ trace estimate of ``maxIter`` products
        (its Hutchinson part's values, shifted by the exact part, so their spread gives the
        standard error)."""
        if isinstance(maxIter, bool) or not isinstance(maxIter, int) or maxIter < 1:
            raise ValueError(f"maxIter must be an int >= 1, got {maxIter!r}")
        with analysed(self.model, eval_mode=True):
            res = hutch_plus_plus(self.operator, max(3, maxIter), seed=self.seed)
        self.results["trace"] = res
        assert res.samples is not None
        samples = res.samples.to(torch.float64)
        centred = samples - samples.mean() + res.estimate
        return [float(x) for x in centred]

    def density(self, iter: int = 100, n_v: int = 1) -> tuple[list[list[float]], list[list[float]]]:
        """Stochastic Lanczos quadrature: per run, the Ritz values and their weights."""
        steps = min(iter, self.operator.size) if isinstance(iter, int) else iter
        with analysed(self.model, eval_mode=True):
            res = spectral_density(self.operator, num_runs=n_v, lanczos_steps=steps, seed=self.seed)
        self.results["density"] = res
        nodes, weights = [], []
        for r in range(res.nodes.shape[0]):
            live = res.weights[r] > 0
            nodes.append([float(x) for x in res.nodes[r][live]])
            weights.append([float(x) for x in res.weights[r][live]])
        return nodes, weights


def _on(batches: Any, device: torch.device) -> Any:
    """The ``(inputs, targets)`` batches on ``device`` (moved lazily, as they are read)."""

    class Moved:
        def __iter__(self) -> Any:
            for b in batches:
                if isinstance(b, list | tuple):
                    yield type(b)(t.to(device) if isinstance(t, Tensor) else t for t in b)
                else:
                    yield b

        def __len__(self) -> int:
            return len(batches)

    return Moved()
