"""Curvature in the training loops people use: a HuggingFace ``Trainer`` callback
(:mod:`.huggingface`) and a Lightning callback (:mod:`.lightning`), each importing its
framework only when used. The plain-loop form is :class:`~hessian_spectra.CurvatureTracker`.
"""

from hessian_spectra.integrations._measure import Measurement, fixed_batches

__all__ = ["Measurement", "fixed_batches"]
