"""Every result type round-trips through to_dict/from_dict and save/load (.json/.pt/.safetensors)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_spectra import (
    BlockSpectra,
    CurvatureRecord,
    CurvatureTracker,
    DiagonalResult,
    EigenResult,
    HessianOperator,
    LanczosTridiagonal,
    SpectralDensityResult,
    TraceResult,
    block_spectra,
    diagonal,
    lanczos,
    lanczos_tridiagonal,
    load_result,
    spectral_density,
    supervised_loss,
    trace,
)
from reference import sym_matrix_with_spectrum

SUFFIXES = [".json", ".pt", ".safetensors"]


def _same(a, b) -> None:
    """Field-by-field equality: tensors equal in value and dtype, floats equal (nan == nan)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.cpu(), b.cpu()) or (
            a.is_floating_point() and torch.allclose(a.cpu(), b.cpu(), equal_nan=True, rtol=0)
        )
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for name in a.__dataclass_fields__:
            _same(getattr(a, name), getattr(b, name))
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same(a[k], b[k])
    else:
        assert a == b


def _results():
    A = sym_matrix_with_spectrum(torch.linspace(-1.0, 4.0, 30, dtype=torch.float64), seed=3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, generator=g, dtype=torch.float64), torch.arange(8) % 2)]
    return [
        lanczos(A.float(), k=2, seed=0),
        trace(A, num_matvecs=12, method="hutchinson", seed=0),
        diagonal(A, 6, seed=0),
        spectral_density(
            A, num_runs=2, lanczos_steps=8, num_grid_points=50, seed=0, return_eigenvectors=True
        ),
        lanczos_tridiagonal(A, torch.ones(30, dtype=torch.float64), 6),
        CurvatureRecord(3, [1.0, 0.5], [1e-9, float("nan")], True, 40, 0.1, False, None, None),
        block_spectra(model, data, supervised_loss(F.cross_entropy), k=1, trace_matvecs=3),
    ]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_result_round_trips(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    for res in _results():
        path = res.save(tmp_path / f"{type(res).__name__}{suffix}", include_vectors=True)
        back = type(res).load(path)
        _same(res, back)
        _same(res, load_result(path))
        if suffix == ".pt":  # a plain dict of tensors: the default safe loader reads it
            blob = torch.load(path, weights_only=True)
            assert blob["data"]["type"] == type(res).__name__


def test_types_listed():
    kinds = {type(r) for r in _results()}
    assert kinds == {
        EigenResult,
        TraceResult,
        DiagonalResult,
        SpectralDensityResult,
        LanczosTridiagonal,
        CurvatureRecord,
        BlockSpectra,
    }


def test_from_dict_without_vectors_and_json_is_plain():
    A = sym_matrix_with_spectrum(torch.linspace(0.0, 3.0, 20, dtype=torch.float64), seed=1)
    res = lanczos(A, k=3, seed=0)
    d = json.loads(json.dumps(res.to_dict()))
    back = EigenResult.from_dict(d)
    assert torch.equal(back.eigenvalues, res.eigenvalues) and back.eigenvectors.shape == (3, 0)
    assert torch.equal(back.converged_mask, res.converged_mask)
    diag = diagonal(A, 4, seed=0)
    with pytest.raises(ValueError, match=r"'estimate' is missing.*include_vectors=True"):
        DiagonalResult.from_dict(diag.to_dict())
    with pytest.raises(ValueError, match="holds a 'EigenResult'"):
        TraceResult.from_dict(d)


def test_bad_files(tmp_path):
    A = torch.eye(3, dtype=torch.float64)
    res = trace(A, num_matvecs=3, seed=0)
    with pytest.raises(ValueError, match=r"writes \.json, \.pt or \.safetensors"):
        res.save(tmp_path / "x.txt")
    torch.save({"a": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a result file"):
        load_result(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no result file"):
        load_result(tmp_path / "missing.json")


def test_tracker_history_round_trips(tmp_path):
    model = nn.Linear(3, 1, bias=False).double()
    X = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    data = [(X, torch.ones(3, 1, dtype=torch.float64))]

    def loss(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    H = HessianOperator(model, data, loss)
    tracker = CurvatureTracker(H, k=2, every=1, trace_matvecs=3)
    for s in range(2):
        tracker.measure(s)
    for suffix in (".json", ".pt"):
        path = tracker.save(tmp_path / f"c{suffix}")
        _same(tracker.history, CurvatureTracker.load_history(path))
        again = CurvatureTracker.load(path, H)
        assert (again.k, again.which, again.trace_matvecs) == (2, "LA", 3)
        _same(tracker.history, again.history)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["data"]["k"] == 2
    # the Hessian 2/3 diag(9, 4, 1): its top two eigenvalues, saved and read back
    assert CurvatureTracker.load_history(tmp_path / "c.json")[-1].eigenvalues == pytest.approx(
        [6.0, 8 / 3], rel=1e-10
    )
