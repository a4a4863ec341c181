"""Vector-arithmetic backends (``LinAlgBackend``, ``SingleDeviceBackend``)."""

from hessian_spectra.linalg.backend import (
    LinAlgBackend,
    ShardedBackend,
    SingleDeviceBackend,
    check_backend,
)

__all__ = ["LinAlgBackend", "ShardedBackend", "SingleDeviceBackend", "check_backend"]
