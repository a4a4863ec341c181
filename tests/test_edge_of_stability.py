"""The edge-of-stability example, shortened: under full-batch gradient descent the sharpness
rises to 2 / lr and stays near it (Cohen et al. 2021)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import edge_of_stability as eos


def test_gradient_descent_sharpens_to_two_over_lr_and_hovers():
    run = eos.run(0.2, steps=400, every=25)
    threshold = run["threshold"]
    assert threshold == 10.0
    rows = run["rows"]
    assert rows[0]["sharpness"] < 0.8 * threshold  # it starts well below: progressive sharpening
    late = [r["sharpness"] for r in rows if r["step"] >= 200]
    # at the edge: within 20% of 2 / lr at every late measurement (the run does not diverge)
    assert all(0.9 * threshold <= s <= 1.2 * threshold for s in late), late
