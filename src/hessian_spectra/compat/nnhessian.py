"""NNHessian's ``NNHessianCalculator``, as a thin adapter over this library.

Code written against NNHessian runs with only its import changed::

    from hessian_spectra.compat.nnhessian import NNHessianCalculator
    calc = NNHessianCalculator(model, nn.MSELoss(), [(X, y)])
    trace = calc.hutchinson_trace()
    top = calc.max_eigenvalue_power()

Every number comes from a :class:`~hessian_spectra.operators.hessian.HessianOperator`
and the library's algorithms (:func:`~hessian_spectra.algorithms.hutchinson`,
:func:`~hessian_spectra.algorithms.lanczos`,
:func:`~hessian_spectra.algorithms.hutch_plus_plus`,
:func:`~hessian_spectra.algorithms.spectral_density`); this module only maps
arguments and return values.

The Hessian is that of the dataset loss

.. math::

    L_{\\text{mean}}(\\theta) = \\sum_b \\frac{n_b}{N}\\, \\ell_b(\\theta), \\qquad
    L_{\\text{sum}}(\\theta) = \\sum_b \\ell_b(\\theta),

with ``ℓ_b = loss_fn(model(inputs_b), targets_b)`` (reduced to its mean if the
criterion returns a tensor) and ``n_b`` the batch's sample count:
``aggregate_method="mean"`` (default) weights batches by their sample counts,
``"sum"`` adds the batch losses.

Where this differs from NNHessian (its faults, fixed here):

* batches default to ``(inputs, targets)`` pairs, so the README example runs
  (NNHessian has no default batch loader and raises);
* ``aggregate_method`` changes the result as its name says (NNHessian ignores it);
* ``which="la"`` is the largest algebraic eigenvalue (NNHessian runs the same
  power iteration for both and returns the dominant eigenvalue, whatever its
  sign), and ``which="lm"`` returns the signed eigenvalue of largest magnitude
  (NNHessian returns its absolute value); both come from Lanczos, which
  converges faster than power iteration for the same number of products;
* ``hutch_pp_trace_estimator`` accepts any budget ``m >= 3`` the library's
  Hutch++ accepts and a ``seed`` (NNHessian needs ``m ≡ 2 mod 4`` and uses the
  global RNG);
* the model is never changed: its mode, device, buffers and ``.grad`` are as
  before after every call (NNHessian leaves it in eval mode and zeroes its gradients).
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from hessian_spectra.algorithms._literals import Which
from hessian_spectra.algorithms._random import Distribution
from hessian_spectra.algorithms.results import ConvergenceWarning, EigenResult
from hessian_spectra.data import default_batch_size
from hessian_spectra.dense.blocks import analysed
from hessian_spectra.operators.base import CurvatureOperator
from hessian_spectra.params import ParamFilter, match_names, match_regex, selected_parameters

__all__ = ["NNHessianCalculator", "ParamSelector", "lanczos_extreme"]

ParamSelector = Union[str, "re.Pattern[str]", Callable[..., bool], nn.Parameter]
"""A name, glob, ``"re:<regex>"``, compiled regex, ``(name, param) -> bool`` or a parameter."""

_AGGREGATES = ("mean", "sum")
_WHICH = {"lm": "LM", "la": "LA"}
_DISTRIBUTIONS = {
    "rademacher": "rademacher",
    "rad": "rademacher",
    "normal": "gaussian",
    "gaussian": "gaussian",
}


def _selector_filter(selectors: list[Any]) -> ParamFilter:
    """One filter accepting a parameter when any selector does (NNHessian's semantics)."""
    tests: list[ParamFilter] = []
    for sel in selectors:
        if isinstance(sel, nn.Parameter):
            tests.append(_is_parameter(sel))
        elif isinstance(sel, re.Pattern):
            tests.append(_searches(sel))
        elif isinstance(sel, str):
            if sel.startswith("re:"):
                tests.append(match_regex(sel[3:]))
            else:
                tests.append(match_names(sel))  # an exact name is a glob without wildcards
        elif callable(sel):
            tests.append(_callable_selector(sel))
        else:
            raise TypeError(
                "assigned_parameters takes names, globs ('encoder.*.weight'), regexes "
                "(re.compile(...) or "
                "'re:...'), callables (name, param) -> bool or nn.Parameter objects; got "
                f"{type(sel).__name__}"
            )
    return lambda name, p: any(t(name, p) for t in tests)


def _is_parameter(param: nn.Parameter) -> ParamFilter:
    def test(name: str, p: nn.Parameter) -> bool:
        return p is param

    return test


def _searches(rx: re.Pattern[str]) -> ParamFilter:
    def test(name: str, p: nn.Parameter) -> bool:
        return rx.search(name) is not None

    return test


def _callable_selector(fn: Callable[..., Any]) -> ParamFilter:
    def test(name: str, p: nn.Parameter) -> bool:
        try:
            return bool(fn(name, p))
        except TypeError:
            return bool(fn(name))  # NNHessian also accepts callables of the name only

    return test


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be an (inputs, targets) pair, got {type(batch).__name__}; for other layouts "
        "pass "
        "external_load_batch_func=lambda batch, device: (inputs, targets, batch_size)"
    )


class NNHessianCalculator:
    """Hessian trace, top eigenvalue and spectral density of a model's loss over a dataset.

    Args:
        model: the network (not modified; evaluated in eval mode as NNHessian does).
        loss_fn: a criterion ``loss_fn(output, target)`` such as ``nn.MSELoss()``.
        dataloader: iterable of batches, ``(inputs, targets)`` pairs by default.
        external_load_batch_func: ``(batch, device) -> (inputs, targets, batch_size)``
            (or ``(inputs, targets)``; the size is then the inputs' leading dimension).
        assigned_parameters: selectors of the parameters to differentiate:
            exact names, globs (``"encoder.*.weight"``), regexes
            (``re.compile(r"bias$")`` or ``"re:bias$"``), callables
            ``(name, param) -> bool`` (or ``(name) -> bool``) and ``nn.Parameter``
            objects; ``None`` or empty for every trainable parameter.
        device: where the model lives. A model elsewhere is moved there with a
            warning (as NNHessian does, without the warning).
        aggregate_method: ``"mean"`` (sample-weighted mean of the batch losses)
            or ``"sum"`` (sum of the batch losses).

    Attributes:
        named_params: ``OrderedDict`` name -> parameter of the selection.
        total_params: number of selected scalars ``n``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        dataloader: Iterable[Any] | None = None,
        external_load_batch_func: Callable[..., Any] | None = None,
        assigned_parameters: Iterable[ParamSelector] | None = None,
        device: str | torch.device = "cpu",
        aggregate_method: str = "mean",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a criterion loss_fn(output, target), got {type(loss_fn).__name__}"
            )
        if aggregate_method not in _AGGREGATES:
            raise ValueError(
                f"aggregate_method must be one of {_AGGREGATES}, got {aggregate_method!r}"
            )
        if external_load_batch_func is not None and not callable(external_load_batch_func):
            raise TypeError(
                "external_load_batch_func must be callable as (batch, device) -> (inputs, targets, "
                "n)"
            )
        self.device = torch.device(device)
        current = next(iter(model.parameters()), None)
        if current is not None and not _same_device(current.device, self.device):
            warnings.warn(
                f"NNHessianCalculator moves the model from {current.device} to {self.device} as "
                "device= asks; "
                "pass the model's own device to keep it where it is",
                stacklevel=2,
            )
            model.to(self.device)
        self.model = model
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.aggregate_method = aggregate_method
        self.load_batch_func = external_load_batch_func
        selectors = list(assigned_parameters) if assigned_parameters is not None else []
        self.assigned_parameters = selectors or None
        self._filter = _selector_filter(selectors) if selectors else None
        names, params = selected_parameters(model, self._filter)
        self.named_params: OrderedDict[str, nn.Parameter] = OrderedDict(
            zip(names, params, strict=True)
        )
        self.total_params = sum(p.numel() for p in params)

    # -- data and operator -------------------------------------------------------------------
    def _load(self, batch: Any) -> tuple[Any, Any, int | None]:
        if self.load_batch_func is None:
            inputs, targets = _split_batch(batch)
            return inputs, targets, None
        out = self.load_batch_func(batch, self.device)
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise TypeError(
                "external_load_batch_func must return (inputs, targets, batch_size) or (inputs, "
                "targets), "
                f"got {type(out).__name__}"
            )
        size = out[2] if len(out) >= 3 else None
        return out[0], out[1], size

    def _batch_loss(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, targets, _ = self._load(batch)
        loss = self.loss_fn(model(inputs), targets)
        if isinstance(loss, Tensor) and loss.dim() > 0:
            loss = loss.mean()
        return loss

    def _batch_size(self, batch: Any) -> int:
        if self.aggregate_method == "sum":
            return 1  # weight 1 each: _operator sets the total to 1
        inputs, _, size = self._load(batch)
        return int(size) if size is not None else default_batch_size(inputs)

    def _operator(self, dataloader: Iterable[Any] | None) -> CurvatureOperator:
        from hessian_spectra.operators.hessian import HessianOperator

        data = dataloader if dataloader is not None else self.dataloader
        if data is None:
            raise ValueError(
                "no dataloader: pass one to NNHessianCalculator(model, loss_fn, dataloader) or to "
                "this method"
            )
        op = HessianOperator(
            self.model,
            data,
            self._batch_loss,
            param_filter=self._filter,
            batch_size_fn=self._batch_size,
        )
        if self.aggregate_method == "sum":
            # every batch counted as 1 sample out of a total of 1: weight 1 each, so the
            # operator is the sum of the per-batch Hessians (and keeps its graphs)
            op.batches.set_total(1)
        return op

    def _eval(self) -> Any:
        """Eval mode for the computation (as NNHessian); the model is restored afterwards."""
        return analysed(self.model, eval_mode=True)

    def _probe(self, distribution: str, seed: int | None, op: CurvatureOperator) -> Tensor:
        dist = _distribution(distribution)
        g = torch.Generator(device="cpu")
        g.manual_seed(seed if seed is not None else _random_seed())
        if dist == "rademacher":
            v = torch.randint(0, 2, (op.size,), generator=g, dtype=torch.float64) * 2 - 1
        else:
            v = torch.randn(op.size, generator=g, dtype=torch.float64)
        return v.to(device=op.device, dtype=op.dtype)

    # -- NNHessian's methods -------------------------------------------------------------------
    def hutchinson_trace(
        self,
        num_samples: int = 50,
        distribution: str = "rademacher",
        dataloader: Any = None,
        seed: int | None = None,
        return_std: bool = False,
    ) -> Any:
        """Hutchinson's estimate ``tr(H) ≈ (1/K) Σ_i z_iᵀ H z_i`` (Hutchinson 1989).

        Returns:
            the estimate (float); with ``return_std`` the tuple
            ``(estimate, sample_std, stderr)`` of the ``K`` quadratic forms.
        """
        from hessian_spectra.algorithms import hutchinson

        dist = _distribution(distribution)
        with self._eval():
            res = hutchinson(
                self._operator(dataloader),
                num_matvecs=num_samples,
                distribution=cast(Distribution, dist),
                seed=seed,
            )
        if not return_std:
            return float(res.estimate)
        if res.samples is not None and res.samples.numel() > 1:
            std = float(res.samples.double().std(unbiased=True))
        else:
            std = float(res.stderr) * float(num_samples) ** 0.5
        return float(res.estimate), std, float(res.stderr)

    def max_eigenvalue_power(
        self,
        num_iters: int = 50,
        tol: float = 1e-5,
        dataloader: Any = None,
        init_vec: Tensor | None = None,
        distribution: str = "rademacher",
        seed: int | None = None,
        which: str = "lm",
        return_vec: bool = False,
    ) -> Any:
        """The extreme eigenvalue: ``"lm"`` largest magnitude (signed), ``"la"`` largest algebraic.

        Computed by Lanczos (``which="LM"``/``"LA"``) with at most ``num_iters``
        Hessian-vector products and relative residual tolerance ``tol``,
        started from ``init_vec`` or a ``distribution`` probe drawn with ``seed``.

        Returns:
            the eigenvalue (float); with ``return_vec`` the tuple ``(eigenvalue,
            unit eigenvector)`` (a 1-d tensor on the model's device).
        """
        key = which.lower() if isinstance(which, str) else which
        if key not in _WHICH:
            raise ValueError(
                f"which must be 'lm' (largest magnitude) or 'la' (largest algebraic), got {which!r}"
            )
        with self._eval():
            op = self._operator(dataloader)
            if init_vec is not None:
                init = init_vec.detach().reshape(-1).to(device=op.device, dtype=op.dtype)
                if init.numel() != op.size:
                    raise ValueError(
                        f"init_vec has {init.numel()} entries; expected {op.size} (the selected "
                        "parameters)"
                    )
            else:
                init = self._probe(distribution, seed, op)
            res = lanczos_extreme(
                op,
                _WHICH[key],
                tol=tol,
                max_matvecs=num_iters,
                init=init,
                seed=seed,
                caller="max_eigenvalue_power",
                budget="num_iters",
            )
        lam = float(res.eigenvalues[0])
        return (lam, res.eigenvectors[0]) if return_vec else lam

    def hutch_pp_trace_estimator(
        self, m: int, *, dataloader: Any = None, seed: int | None = None
    ) -> Tensor:
        """Hutch++ trace estimate with ``m`` Hessian-vector products (Meyer et al. 2021).

        Returns:
            a 0-d tensor, as NNHessian returns.
        """
        from hessian_spectra.algorithms import hutch_plus_plus

        with self._eval():
            res = hutch_plus_plus(self._operator(dataloader), num_matvecs=m, seed=seed)
        return torch.tensor(float(res.estimate), dtype=torch.float64)

    def get_full_spectrum(
        self, n_v: int, n_iter: int, dataloader: Any = None, *, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): ``n_v`` runs, ``n_iter`` steps.

        Returns:
            ``(values, weights)``: NumPy arrays of the Ritz values and their
            quadrature weights, the ``n_v`` runs concatenated (each run's weights
            sum to 1), as NNHessian returns: ``n_v * min(n_iter, n)`` entries. A
            run whose Krylov space is exhausted early is padded with zero-weight
            nodes (NNHessian divides by a tiny ``beta`` instead).
        """
        from hessian_spectra.algorithms import spectral_density

        with self._eval():
            res = spectral_density(
                self._operator(dataloader), num_runs=n_v, lanczos_steps=n_iter, seed=seed
            )
        values = res.nodes.detach().to("cpu", torch.float64).numpy().reshape(-1)
        weights = res.weights.detach().to("cpu", torch.float64).numpy().reshape(-1)
        return values, weights


def lanczos_extreme(
    op: CurvatureOperator,
    which: str,
    *,
    tol: float,
    max_matvecs: int,
    init: Tensor | None,
    seed: int | None,
    caller: str,
    budget: str,
) -> EigenResult:
    """One extreme eigenpair by :func:`~hessian_spectra.algorithms.lanczos`, in the caller's terms.

    A run that misses ``tol`` warns with :class:`ConvergenceWarning` in the
    caller's terms (``raise num_iters``); the result is returned either way.
    """
    from hessian_spectra.algorithms.lanczos import lanczos

    least = 2 + (init is not None)
    if isinstance(max_matvecs, bool) or not isinstance(max_matvecs, int) or max_matvecs < least:
        raise ValueError(f"{caller}: {budget} must be an int >= {least}, got {max_matvecs!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lanczos(
            op, 1, which=cast(Which, which), tol=tol, max_matvecs=max_matvecs, init=init, seed=seed
        )
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            if res.converged:  # converged, but the budget ended the check for missed eigenvalues
                warnings.warn(
                    f"{caller}: the eigenpair converged, but {budget}={max_matvecs} ran out while "
                    f"checking for missed eigenvalues; raise {budget}",
                    ConvergenceWarning,
                    stacklevel=3,
                )
            continue
        warnings.warn(w.message, w.category, stacklevel=3)
    if not res.converged:
        scale = float(res.info.get("scale", abs(float(res.eigenvalues[0]))))
        rel = float(res.residuals[0]) / max(scale, 1e-300)
        warnings.warn(
            f"{caller}: the eigenpair did not reach tol={tol:g} within {budget}={max_matvecs} "
            "Hessian-vector "
            f"products (relative residual {rel:.2e}); raise {budget}",
            ConvergenceWarning,
            stacklevel=3,
        )
    return res


def _distribution(name: str) -> str:
    key = name.lower() if isinstance(name, str) else name
    if key not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be 'rademacher' or 'normal', got {name!r}")
    return _DISTRIBUTIONS[key]


def _random_seed() -> int:
    import secrets

    return secrets.randbits(63)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
