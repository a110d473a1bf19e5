"""Mixtral MoE experts for many tokens (training, prefill): one grouped GEMM per projection.

The expert loop (models/moe.py) runs each expert as its own dense matmuls: per layer and pass it
brings the routing counts to the host (a sync) and issues ~14 launches per expert (gather,
dequant, GEMM, activation, weighting, index_add, each once more in the backward), 25-100 us of
host time each. A GEMM whose row count cuBLAS has not seen costs ~870 us, and the routing gives
each expert a new row count every step. At a training batch (5120 tokens, ~1280 rows per expert)
the step was host-bound (benchmarks/NOTES.md, session 4). Here the (token, slot) pairs are sorted by expert
once and each projection is one `torch._grouped_mm` (CUTLASS grouped GEMM on sm_90) over a
transient stack of the E experts' weights, dequantized by one Triton launch
(`dequantize_experts`): no host sync (the counts come from a searchsorted on the GPU), three
GEMM launches per pass instead of 24.

Memory: the stack of one projection (E x N x K in the compute dtype, 0.94 GB for Mixtral's w1)
lives only for one GEMM; the backward dequantizes it again rather than keeping it (as the
expert loop's `nf4_matmul` does per expert). The frozen experts get no weight gradient.

`grouped_nf4_matmul` (autograd) is the entry point; `dequantize_experts_reference` and the
expert loop are the references.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.moe import NF4Experts, _expert_fields
from kernels.nf4 import cuda_capability, dequant_launch, dequantize_nf4_reference, nf4_dequant_blocks
from kernels.swiglu import swiglu

PROJECTIONS = ("w1", "w3", "w2")


@triton.jit
def _dequant_experts_kernel(table_ptr, pairs_ptr, out_ptr, E, n_elements, n_bytes, n_blocks,
                            BLOCKS: tl.constexpr, EVEN: tl.constexpr, PACKED_ALIGNED: tl.constexpr):
    # grid (cdiv(n_blocks, BLOCKS), E): program (i, e) dequantizes blocks of expert e's weight into
    # out[e] (every expert's weight has the same shape: n_elements values, n_bytes packed bytes).
    e = tl.program_id(1)
    packed, absmax, absmax2, code2, offset = _expert_fields(table_ptr, e, E, PACKED_ALIGNED)
    nf4_dequant_blocks(packed, absmax, absmax2, code2, offset, pairs_ptr, out_ptr + e.to(tl.int64) * n_elements,
                       tl.program_id(0), n_elements, n_bytes, n_blocks, BLOCKS, EVEN)


def _fields(w: NF4Experts, which: str):
    """(the NF4Tensors, their (5, E) pointer table) of projection `which`."""
    if which not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {which!r}")
    return getattr(w, which), (w.table2 if which == "w2" else w.table13[PROJECTIONS.index(which)])


def dequantize_experts(w: NF4Experts, which: str, dtype: torch.dtype, backend: str | None = None) -> torch.Tensor:
    """(E, N, K) stack of the experts' `which` weights in `dtype`, bit-equal to dequantizing each.

    backend: None = Triton on CUDA, the reference on CPU; "triton" forces the kernel (the
    interpreter on CPU); "reference" forces PyTorch.
    """
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be None, 'triton' or 'reference', got {backend!r}")
    qs, table = _fields(w, which)
    N, K = qs[0].shape
    if not (backend == "triton" or (backend is None and w.device.type == "cuda")):
        return dequantize_experts_reference(w, which, dtype)
    out = torch.empty((len(qs), N, K), dtype=dtype, device=w.device)
    n = N * K
    if n == 0:
        return out
    programs, n_blocks, meta = dequant_launch(n)
    _dequant_experts_kernel[(programs, len(qs))](table, qs[0].tensors()[5], out, len(qs), n, qs[0].packed.numel(),
                                                 n_blocks, PACKED_ALIGNED=w.packed_aligned, **meta)
    return out


def dequantize_experts_reference(w: NF4Experts, which: str, dtype: torch.dtype) -> torch.Tensor:
    qs, _ = _fields(w, which)
    return torch.stack([dequantize_nf4_reference(q, dtype) for q in qs])


def has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM serves this device and dtype well: its CUTLASS kernel in bf16 on
    sm_90 (H100/H200), the architecture it was measured on. Elsewhere torch falls back to a
    per-group loop or lacks the op, so the expert loop runs; on CPU the path runs only when forced."""
    if not hasattr(torch, "_grouped_mm") or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return cuda_capability(device) == (9, 0)


class _GroupedNF4Matmul(torch.autograd.Function):
    """y (P, N) = x (P, K) @ W_e^T for the rows of each expert e (rows sorted by expert; offs (E,)
    int32 cumulative row counts). W is frozen: the backward returns dX only."""

    @staticmethod
    def forward(ctx, x, w: NF4Experts, which: str, offs, backend):
        ctx.w, ctx.which, ctx.backend = w, which, backend
        ctx.save_for_backward(offs)
        stack = dequantize_experts(w, which, x.dtype, backend)  # (E, N, K)
        return torch._grouped_mm(x, stack.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        (offs,) = ctx.saved_tensors
        stack = dequantize_experts(ctx.w, ctx.which, dy.dtype, ctx.backend)  # again, not kept
        return torch._grouped_mm(dy.contiguous(), stack, offs=offs), None, None, None, None


def grouped_nf4_matmul(x: torch.Tensor, w: NF4Experts, which: str, offs: torch.Tensor,
                       backend: str | None = None) -> torch.Tensor:
    """x (P, K), rows sorted by expert with offs (E,) int32 = cumulative counts -> (P, N) in x.dtype."""
    qs, _ = _fields(w, which)
    if x.dim() != 2 or x.shape[1] != qs[0].shape[1]:
        raise ValueError(f"grouped_nf4_matmul: x {tuple(x.shape)} must be (rows, {qs[0].shape[1]}) for {which}")
    if offs.shape != (len(qs),) or offs.dtype != torch.int32:
        raise ValueError(f"grouped_nf4_matmul: offs must be ({len(qs)},) int32 cumulative counts, "
                         f"got {tuple(offs.shape)} {offs.dtype}")
    return _GroupedNF4Matmul.apply(x, w, which, offs, backend)


@dataclass
class GroupedLoRA:
    """LoRA adapters of one projection on all E experts: y += scale * (dropout(x) A_e^T) B_e^T for
    the rows of expert e. A (r, K) and B (N, r) per expert are the fp32 master weights (trained);
    the products run in x's dtype, as the GEMM path of `kernels.lora` does (QLoRA's numerics)."""

    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scale: float
    dropout: float = 0.0  # 0 in eval mode

    def __call__(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs (P, K) sorted by expert, offs (E,) -> the adapters' share (P, N) in xs.dtype."""
        a = torch.stack(self.A).to(xs.dtype)  # (E, r, K)
        b = torch.stack(self.B).to(xs.dtype)  # (E, N, r)
        pad = -a.shape[1] % (16 // xs.element_size())  # CUTLASS needs 16-byte strides: r to a multiple
        if pad:  # zero rows of A and columns of B add nothing (r = 4 in bf16 failed on the H100)
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        if self.dropout:
            xs = F.dropout(xs, self.dropout, training=True)
        t = torch._grouped_mm(xs, a.transpose(1, 2), offs=offs)  # (P, r)
        return torch._grouped_mm(t, b.transpose(1, 2), offs=offs) * self.scale


def moe_experts_grouped(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w: NF4Experts,
                        backend: str | None = None, adapters: dict[str, GroupedLoRA] | None = None) -> torch.Tensor:
    """out (T, C) = sum_k weights[t, k] * expert_{experts[t, k]}(x[t]), differentiable in x and weights.

    adapters: `GroupedLoRA` per projection name ("w1", "w3", "w2") with LoRA on the experts
    (differentiable in their A and B too).

    The per-row math is the expert loop's (each op rounds to x.dtype where the loop's does; silu(g)
    * u through `kernels.swiglu`, which rounds as the eager ops do), so outputs agree with it up to
    the GEMMs' accumulation order.
    """
    top_k = experts.shape[-1]
    flat = experts.reshape(-1)  # (P,)
    sorted_ids, order = torch.sort(flat, stable=True)  # pairs sorted by expert
    # offs[e] = pairs routed to experts <= e; searchsorted, not bincount, which syncs on CUDA
    ids = torch.arange(w.num_experts, device=flat.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, ids, right=True).to(torch.int32)  # (E,)
    token_of = order // top_k  # (P,)
    xs = x[token_of]  # (P, C)
    adapters = adapters or {}

    def project(a, which):
        y = grouped_nf4_matmul(a, w, which, offs, backend)
        return y if which not in adapters else y + adapters[which](a, offs)

    g = project(xs, "w1")  # (P, I)
    u = project(xs, "w3")
    y = project(swiglu(g, u, "triton" if backend == "triton" else None), "w2")  # (P, C)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, y)
