"""Fused cross-entropy HVP backends agree with the eager reference on awkward shapes."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from hessian_spectra.losses import fused_ce
from hessian_spectra.losses.fused_ce import ce_hvp, ce_row_scale, resolve_backend
from reference import tol

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++"))


def _case(N, V, k, dtype=torch.float32, seed=0, all_masked_rows=(), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    u = torch.randn(k, N, V, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    for r in all_masked_rows:
        y[r] = -100
    return z.to(device), u.to(device), y.to(device)


def _autograd_reference(z, u, y):
    """H u of mean cross-entropy over non-ignored rows, from torch.func.hessian in float64."""
    z64 = z.double()
    H = torch.func.hessian(lambda t: F.cross_entropy(t, y, ignore_index=-100))(z64)
    return torch.einsum("ncmd,kmd->knc", H, u.double())


def test_eager_matches_autograd_in_float64():
    z, u, y = _case(6, 7, 2, torch.float64)
    got = ce_hvp(z, u, y, fused="eager")
    want = _autograd_reference(z, u, y)
    torch.testing.assert_close(got, want, rtol=0, atol=tol(torch.float64) * want.abs().max().item())
    # a boolean mask is the same as labels; normalizer overrides n_valid (sum reduction)
    torch.testing.assert_close(ce_hvp(z, u, y != -100, fused="eager"), got)
    n = int((y != -100).sum())
    torch.testing.assert_close(ce_hvp(z, u, y, normalizer=1.0, fused="eager"), n * got)


def test_all_rows_masked_gives_zeros_not_nan():
    z, u, y = _case(3, 5, 1, torch.float64)
    y[:] = -100
    out = ce_hvp(z, u[0], y, fused="eager")
    assert out.shape == u[0].shape and torch.count_nonzero(out) == 0


@pytest.mark.skipif(not HAS_CC, reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize(
    "N,V,k,dtype",
    [
        (5, 37, 1, torch.float32),  # V not a multiple of any tile
        (9, 4099, 2, torch.bfloat16),  # half inputs computed in float32
        (33, 515, 3, torch.float16),
    ],
)
def test_compile_matches_eager(N, V, k, dtype):
    z, u, y = _case(N, V, k, dtype, all_masked_rows=(1,))
    eager = ce_hvp(z, u, y, fused="eager")
    got = ce_hvp(z, u, y, fused="compile")
    assert got.dtype == dtype and got.shape == u.shape
    assert torch.count_nonzero(got[:, 1]) == 0
    ref = ce_hvp(z.double(), u.double(), y, fused="eager")  # the same half inputs, in float64
    atol = (tol(torch.float32) if dtype == torch.float32 else tol(dtype)) * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)
    torch.testing.assert_close(eager.double(), ref, rtol=0, atol=atol)
    w = u.clone()
    assert ce_hvp(z, w, y, fused="compile", out=w).data_ptr() == w.data_ptr()
    torch.testing.assert_close(w, got, rtol=0, atol=0)  # the same chunks, in place


def test_auto_resolution_and_fallback(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, numel=10) == "eager"  # small: compiling would not pay
    assert resolve_backend("auto", cpu, numel=1 << 24) == "compile"
    assert resolve_backend("eager", cpu) == "eager"

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused_ce, "_compile_run", broken)
    monkeypatch.setattr(fused_ce, "_compile_broken", None)
    monkeypatch.setattr(fused_ce, "_AUTO_MIN_NUMEL", 0)
    z, u, y = _case(4, 9, 1)
    with caplog.at_level(logging.WARNING, logger="hessian_spectra.losses.fused_ce"):
        out = ce_hvp(z, u, y, fused="auto")
    assert "no C++ compiler" in caplog.text
    torch.testing.assert_close(out, ce_hvp(z, u, y, fused="eager"))
    assert resolve_backend("auto", cpu, numel=1 << 24) == "eager"  # remembered
    with pytest.raises(RuntimeError, match="fused='compile' failed"):
        ce_hvp(z, u, y, fused="compile")


@pytest.mark.skipif(HAS_CUDA and HAS_TRITON, reason="Triton can run here")
def test_triton_refuses_cleanly_without_cuda():
    z, u, y = _case(4, 9, 1)
    with pytest.raises(RuntimeError, match="fused='triton' cannot run"):
        ce_hvp(z, u, y, fused="triton")


def test_errors():
    z, u, y = _case(4, 9, 2)
    with pytest.raises(ValueError, match="fused must be one of"):
        ce_hvp(z, u, y, fused="cuda")
    with pytest.raises(ValueError, match="logits must be"):
        ce_hvp(z[None], u, y)
    with pytest.raises(ValueError, match="u must be"):
        ce_hvp(z, u[:, :3], y)
    with pytest.raises(ValueError, match="one entry per row"):
        ce_hvp(z, u, y[:3])
    with pytest.raises(TypeError, match="bool mask or integer labels"):
        ce_row_scale(torch.zeros(3))


AWKWARD = [
    (7, 37, 1, torch.float32),
    (16, 5000, 2, torch.float32),  # two tiles of 4096, ragged tail
    (8, 50257, 1, torch.bfloat16),
    (8, 3001, 3, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("N,V,k,dtype", AWKWARD)
def test_triton_matches_eager_on_cuda(N, V, k, dtype):
    z, u, y = _case(N, V, k, dtype, all_masked_rows=(2,), device="cuda")
    ref = ce_hvp(z.double(), u.double(), y, fused="eager")
    got = ce_hvp(z, u, y, fused="triton")
    assert got.dtype == dtype and torch.count_nonzero(got[:, 2]) == 0
    atol = (tol(torch.float32) if dtype == torch.float32 else tol(dtype)) * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)
    assert resolve_backend("auto", z.device) == "triton"
    w = u.clone()
    same = ce_hvp(z, w, y, fused="triton", out=w)  # in place
    assert same.data_ptr() == w.data_ptr()
    torch.testing.assert_close(same, got, rtol=0, atol=0)


@pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="runs the Triton kernel on the CPU under TRITON_INTERPRET=1 (needs triton installed)",
)
@pytest.mark.parametrize(
    "N,V,k,dtype,block",
    [(5, 37, 1, torch.float32, 16), (6, 70, 2, torch.bfloat16, 16), (4, 100, 2, torch.float16, 32)],
)
def test_triton_kernel_under_the_interpreter(N, V, k, dtype, block, monkeypatch):
    from hessian_spectra.losses import _triton_ce

    monkeypatch.setattr(_triton_ce, "_MAX_BLOCK_V", block)  # several tiles with a ragged tail
    z, u, y = _case(N, V, k, dtype, all_masked_rows=(1,))
    got = _triton_ce._launch(z, u, ce_row_scale(y))
    ref = ce_hvp(z.double(), u.double(), y, fused="eager")
    atol = (tol(torch.float32) if dtype == torch.float32 else tol(dtype)) * ref.abs().max().item()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)
    assert torch.count_nonzero(got[:, 1]) == 0
    w = u.clone()
    assert _triton_ce._launch(z, w, ce_row_scale(y), out=w).data_ptr() == w.data_ptr()
    torch.testing.assert_close(w, got, rtol=0, atol=0)  # in place: each entry read before written
