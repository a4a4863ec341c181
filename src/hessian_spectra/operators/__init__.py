"""Curvature operators: matrices known through their products."""

from hessian_spectra.operators.base import CurvatureOperator, DenseOperator, LambdaOperator, as_operator

__all__ = ["CurvatureOperator", "DenseOperator", "LambdaOperator", "as_operator"]
