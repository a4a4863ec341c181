"""Vector-arithmetic backends (``LinAlgBackend``, ``SingleDeviceBackend``)."""

from hessian_spectra.linalg.backend import LinAlgBackend, SingleDeviceBackend, check_backend

__all__ = ["LinAlgBackend", "SingleDeviceBackend", "check_backend"]
