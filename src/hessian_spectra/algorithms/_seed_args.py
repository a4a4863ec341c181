"""Arguments the algorithms take under hessian-eigenthings' names, mapped onto ours."""

from __future__ import annotations

import warnings

from hessian_spectra.algorithms._common import positive_int

__all__ = ["budget_from_max_iter", "check_reorthogonalize"]


def check_reorthogonalize(value: object, fn: str) -> None:
    """``None``/``True`` are what the solvers do; ``False`` is refused with a warning.

    Lanczos without reorthogonalization loses orthogonality once a Ritz pair
    converges and then reports ghost copies of it as further eigenvalues (Paige
    1976), each with a small residual: a wrong answer that looks converged. The
    basis is therefore always reorthogonalized.
    """
    if value is None or value is True:
        return
    if value is False:
        warnings.warn(
            f"{fn}: reorthogonalize=False is ignored; the Lanczos basis is always fully "
            "reorthogonalized (without it, converged eigenvalues come back as ghost copies)",
            UserWarning,
            stacklevel=3,
        )
        return
    raise TypeError(f"{fn}: reorthogonalize must be None, True or False, got {value!r}")


def budget_from_max_iter(
    max_iter: object, minimum: int, k: int, keep_products: bool, fn: str
) -> int:
    """The product budget for ``max_iter`` Lanczos steps: at least ``minimum`` (two
    steps per wanted pair), plus the ``k`` residual products when they are not kept."""
    steps = positive_int(max_iter, "max_iter", fn)
    return max(steps, minimum) + (0 if keep_products else k)
