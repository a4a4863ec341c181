r"""Triton kernel for the cross-entropy Hessian-vector product (CUDA only).

One program per ``(row, direction)``. Pass 1 walks the vocabulary in tiles of
``BLOCK_V`` with an online softmax (Milakov & Gimelshein, 2018, "Online
normalizer calculation for softmax"): it keeps the running max ``m``, the
normaliser :math:`d = \sum e^{z - m}` and :math:`t = \sum e^{z - m} u`,
rescaling both by :math:`e^{m_{old} - m_{new}}` when the max grows. Then
:math:`\langle p, u\rangle = t / d`, and pass 2 writes

.. math::  out = s \cdot e^{z - m} / d \cdot (u - t/d).

Only the output is allocated. Logits and directions of any float dtype are
loaded and computed in float32; tails (``V`` not a multiple of ``BLOCK_V``) are
masked with ``-inf`` logits and zero directions. Rows with scale 0 (masked
positions) write zeros without reading anything.

Importing this module raises :class:`ImportError` when Triton is missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["triton_ce_hvp"]

_MAX_BLOCK_V = 4096  # vocabulary tile; tests lower it to exercise tails


@triton.jit
def _ce_hvp_kernel(
    logits_ptr,
    u_ptr,
    scale_ptr,
    out_ptr,
    V,
    stride_zn,
    stride_uk,
    stride_un,
    stride_ok,
    stride_on,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    s = tl.load(scale_ptr + row)
    z_row = logits_ptr + row * stride_zn
    u_row = u_ptr + k * stride_uk + row * stride_un
    o_row = out_ptr + k * stride_ok + row * stride_on
    offs = tl.arange(0, BLOCK_V)
    if s == 0.0:
        zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            tl.store(o_row + idx, zeros.to(out_ptr.dtype.element_ty), mask=idx < V)
    else:
        m = tl.full([1], float("-inf"), dtype=tl.float32)
        d = tl.zeros([1], dtype=tl.float32)
        t = tl.zeros([1], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            valid = idx < V
            z = tl.load(z_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
            u = tl.load(u_row + idx, mask=valid, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            d = d * alpha + tl.sum(e, axis=0)
            t = t * alpha + tl.sum(e * u, axis=0)
            m = m_new
        inv_d = 1.0 / d
        pu = t * inv_d
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            valid = idx < V
            z = tl.load(z_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
            u = tl.load(u_row + idx, mask=valid, other=0.0).to(tl.float32)
            p = tl.exp(z - m) * inv_d
            out = s * p * (u - pu)
            tl.store(o_row + idx, out.to(out_ptr.dtype.element_ty), mask=valid)


def triton_ce_hvp(
    logits: Tensor,
    u: Tensor,
    scale: Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``(N, V)`` logits, ``(k, N, V)`` directions, ``(N,)`` row scales -> ``(k, N, V)`` (CUDA).

    The output has ``out_dtype`` (default ``u.dtype``), or is ``out`` (``u``'s
    shape; may be ``u`` itself: each program reads an entry of its row before
    it writes it).
    """
    if not (logits.is_cuda and u.is_cuda and scale.is_cuda):
        raise ValueError("the Triton CE kernel needs CUDA tensors")
    return _launch(logits, u, scale, out_dtype, out)


def _launch(
    logits: Tensor,
    u: Tensor,
    scale: Tensor,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Launch the kernel (also on CPU tensors under ``TRITON_INTERPRET=1``, for tests)."""
    N, V = logits.shape
    k = u.shape[0]
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    scale = scale.to(torch.float32).contiguous()
    if out is not None and out.stride(-1) != 1:
        res = _launch(logits, u, scale, out.dtype)
        return out.copy_(res)
    u = u if u.stride(-1) == 1 else u.contiguous()
    if out is None:
        out = torch.empty(u.shape, dtype=out_dtype or u.dtype, device=u.device)
    if N == 0 or k == 0 or V == 0:
        return out.zero_()
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    _ce_hvp_kernel[(N, k)](
        logits,
        u,
        scale,
        out,
        V,
        logits.stride(0),
        u.stride(0),
        u.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_V=block_v,
        num_warps=4 if block_v <= 1024 else 8,
    )
    return out
