import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The test models are tiny: one intra-op thread avoids threading overhead that dominates
# small kernels (10x slower products on a loaded 2-core machine). OMP_NUM_THREADS overrides.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
if not torch.cuda.is_available():  # Triton kernels run in its interpreter (tests/test_fused_ce.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic_global_seed():
    """Tests never rely on the global RNG, but building random models does; fix it per test."""
    torch.manual_seed(1234)
    yield
