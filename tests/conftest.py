import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _deterministic_global_seed():
    """Tests never rely on the global RNG, but building random models does; fix it per test."""
    torch.manual_seed(1234)
    yield
