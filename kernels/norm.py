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


class SlotSums:
    """A residual not yet combined: an MoE block's expert outputs as fp32 sums per (token, slot)
    pair, sums (T * top_k, C), to be weighted by weights (T, top_k) (in the output dtype), summed per
    token in fp32 in slot order and rounded to `dtype` (kernels.moe_tc's combine), after which the
    sums must be zero again (a resident buffer that the next MoE call adds into).

    add_rms_norm takes it as its residual and combines inside the norm's launch; anything else calls
    `combine()`. Either way it is used once (`taken`)."""

    def __init__(self, sums: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype):
        self.sums, self.weights, self.dtype = sums, weights, dtype
        self.taken = False
        self.shape = (weights.shape[0], sums.shape[1])

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.taken:
            raise RuntimeError("SlotSums used twice: its sums were already combined and zeroed")
        self.taken = True
        return self.sums, self.weights

    def combine(self) -> torch.Tensor:
        """(T, C) in dtype, the reference combine in PyTorch ops; zeroes the sums."""
        sums, weights = self.take()
        T, k = weights.shape
        acc = torch.zeros(self.shape, dtype=torch.float32, device=sums.device)
        for j in range(k):
            acc += weights[:, j, None].float() * sums.view(T, k, -1)[:, j]
        sums.zero_()
        return acc.to(self.dtype)


@triton.jit
def add_rms_norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, row, C, eps, stride_x, stride_r, stride_y, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr = 0, wt_ptr=None):
    """One row: stores y = norm(x + residual) and the sum s; returns y (BLOCK,) as stored, in fp32
    (0 past C), for kernels that go on with it (kernels.moe's fused router). With SLOTS = top_k > 0
    the residual is a SlotSums: fp32 rows row * SLOTS + j of r_ptr (stride_r apart) weighted by
    wt_ptr's, combined as kernels.moe_tc does, then zeroed."""
    cols = tl.arange(0, BLOCK)
    ok = cols < C
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)  # (BLOCK,) in x's dtype
    if HAS_RESIDUAL:
        if SLOTS == 0:
            r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
            for j in tl.static_range(SLOTS):
                p = row * SLOTS + j
                acc += tl.load(wt_ptr + p).to(tl.float32) * tl.load(r_ptr + p * stride_r + cols, mask=ok, other=0.0)
            r = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the combine's rounding
            tl.debug_barrier()  # all loaded before the zeros (Triton may lay the stores out differently)
            for j in tl.static_range(SLOTS):
                tl.store(r_ptr + (row * SLOTS + j) * stride_r + cols, tl.zeros([BLOCK], tl.float32), mask=ok)
        x = (x.to(tl.float32) + r).to(x_ptr.dtype.element_ty)  # the rounded sum
        tl.store(s_ptr + row * stride_s + cols, x, mask=ok)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=0) / C + eps)
    h = (h * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as the reference
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (w * h).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=ok)
    return y.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, wt_ptr, C, eps,
                         stride_x, stride_r, stride_y, stride_s,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    add_rms_norm_row(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, tl.program_id(0).to(tl.int64), C, eps,
                     stride_x, stride_r, stride_y, stride_s, HAS_RESIDUAL, BLOCK, SLOTS, wt_ptr)


def norm_fits(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs (2-D rows with unit stride, one dtype, no gradient)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight))
    return not (needs_grad or x.dim() != 2 or x.stride(-1) != 1 or weight.shape != x.shape[-1:]
                or weight.stride(-1) != 1
                or (residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape
                                              or residual.stride(-1) != 1)))


def add_rms_norm(x: torch.Tensor, residual: "torch.Tensor | SlotSums | None", weight: torch.Tensor, eps: float,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (M, C) of one dtype (residual may be None: a plain RMSNorm; or a SlotSums in x's
    dtype, combined inside the launch), weight (C,) -> (weight * rmsnorm(x + residual) (M, C) in the
    promoted dtype, x + residual (M, C), or x itself when residual is None). One launch on CUDA;
    backend "reference" / "triton" forces a path."""
    use_kernel = backend == "triton" or (backend is None and x.is_cuda)
    slots = isinstance(residual, SlotSums)
    if slots and not (use_kernel and residual.dtype == x.dtype and residual.shape == tuple(x.shape)
                      and norm_fits(x, None, weight) and residual.sums.stride(-1) == 1):
        residual = residual.combine()
        slots = False
    if not use_kernel or (not slots and not norm_fits(x, residual, weight)):
        return add_rms_norm_reference(x, residual, weight, eps)
    M, C = x.shape
    y = torch.empty((M, C), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)  # (M, C)
    s = torch.empty_like(x) if residual is not None else x  # (M, C)
    if slots:
        r, wt = residual.take()
    else:
        r, wt = (residual if residual is not None else x), x
    BLOCK = triton.next_power_of_2(C)
    _add_rms_norm_kernel[(M,)](x, r, weight, y, s, wt, C, eps, x.stride(0), r.stride(0), y.stride(0), s.stride(0),
                               HAS_RESIDUAL=residual is not None, BLOCK=BLOCK, SLOTS=wt.shape[1] if slots else 0,
                               num_warps=min(16, max(1, BLOCK // 512)), enable_fp_fusion=False)
    return y, s
