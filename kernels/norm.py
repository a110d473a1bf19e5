"""Fused residual add + RMSNorm in Triton: (x, residual, weight) -> (norm(x + residual), x + residual).

A decoder layer adds each sublayer's output to the residual stream and normalizes the sum for
the next sublayer. In PyTorch that is ~8 kernels per norm (casts, pow, mean, add, rsqrt, two
multiplies) plus the add; under CUDA-graph decoding each still costs a few microseconds of GPU
time. Here it is one launch, one program per row, the row held in registers.

Numerics follow models.transformer.RMSNorm (Llama/HF): the sum is rounded to x's dtype (what
`x + residual` stores), then in fp32 y = s * rsqrt(mean(s^2) + eps), rounded to x's dtype, then
multiplied by the weight in the promoted dtype. No multiply-add is fused into an FMA
(`enable_fp_fusion=False`), as PyTorch's separate kernels cannot; only the order of the mean's
reduction and the rsqrt's rounding can differ from PyTorch (a few fp32 ulps; tests state the
tolerance). Needs no gradient: with one required, it falls back to the reference.

Forward only (inference, decoding): training keeps the PyTorch path and its autograd.
Entry point: `add_rms_norm(x, residual, weight, eps)`; CUDA tensors take Triton, CPU tensors the
PyTorch reference; backend="triton" forces the kernel (tests run it through TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (M, C), weight (C,) -> (normed (M, C), x + residual (M, C)); residual may be None."""
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), x


@triton.jit
def add_rms_norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, row, C, eps, stride_x, stride_r, stride_y, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row: stores y = norm(x + residual) and the sum s; returns y (BLOCK,) as stored, in fp32
    (0 past C), for kernels that go on with it (kernels.moe's fused router)."""
    cols = tl.arange(0, BLOCK)
    ok = cols < C
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)  # (BLOCK,) in x's dtype
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the rounded sum
        tl.store(s_ptr + row * stride_s + cols, x, mask=ok)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=0) / C + eps)
    h = (h * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * h).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=ok)
    return y.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, C, eps,
                         stride_x, stride_r, stride_y, stride_s,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    add_rms_norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, tl.program_id(0).to(tl.int64), C, eps,
                     stride_x, stride_r, stride_y, stride_s, HAS_RESIDUAL, BLOCK)


def norm_fits(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (2-D rows with unit stride, one dtype, no gradient)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight))
    return not (needs_grad or x.dim() != 2 or x.stride(-1) != 1 or weight.shape != x.shape[-1:]
                or weight.stride(-1) != 1
                or (residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape
                                              or residual.stride(-1) != 1)))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (M, C) of one dtype (residual may be None: a plain RMSNorm), weight (C,) ->
    (weight * rmsnorm(x + residual) (M, C) in the promoted dtype, x + residual (M, C), or x itself
    when residual is None). One launch on CUDA; backend "reference" / "triton" forces a path."""
    use_kernel = backend == "triton" or (backend is None and x.is_cuda)
    if not use_kernel or not norm_fits(x, residual, weight):
        return add_rms_norm_reference(x, residual, weight, eps)
    M, C = x.shape
    y = torch.empty((M, C), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # (M, C)
    s = torch.empty_like(x) if residual is not None else x  # (M, C)
    r = residual if residual is not None else x
    BLOCK = triton.next_power_of_2(C)
    _add_rms_norm_kernel[(M,)](x, r, weight, y, s, C, eps, x.stride(0), r.stride(0), y.stride(0), s.stride(0),
                               HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
                               num_warps=min(16, max(1, BLOCK // 512)), enable_fp_fusion=False)
    return y, s
