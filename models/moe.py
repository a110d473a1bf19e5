"""The Mixtral sparse mixture-of-experts block.

Routing follows Mixtral exactly: softmax over the router logits in fp32, top-k, renormalize the
k weights to sum to one, cast back to the activation dtype. Each expert is a SwiGLU MLP
w2(silu(w1 x) * w3 x).

Three paths compute the experts:
  - the reference loop (any weights, any token count, the CPU path): tokens are grouped by expert
    so each expert runs one dense matmul over just the rows routed to it; the group sizes come to
    the host (a sync), so it cannot live in a CUDA graph.
  - grouped GEMMs (`kernels.moe_grouped`), on sm_90 GPUs (H100/H200) for bf16 NF4 experts with
    more tokens than the decode kernels take (training, prefill): one `torch._grouped_mm` per
    projection over a transient dequantized stack of the experts, no host sync, differentiable in x. LoRA
    adapters on the experts (unmerged) ride along as two more grouped GEMMs per projection (H100,
    v5 step with LoRA on the experts: 35.5 ms per layer against the loop's 65.5, benchmarks/RESULTS.md).
  - the decode kernels (`kernels.moe`), on CUDA when the experts are NF4 and at most
    `kernels.moe.MAX_PAIRS` (token, slot) pairs come in without needing a gradient: two launches
    for all experts, every touched expert read once, no host sync, static shapes (graph-safe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe import (MAX_PAIRS, ROUTE_MAX_TOKENS, NF4Experts, add_rms_norm_route, moe_decode, moe_route,
                         takes_tc)
from kernels.moe_grouped import PROJECTIONS, GroupedLoRA, has_grouped_mm, moe_experts_grouped
from kernels.norm import SlotSums
from models.nf4 import NF4Linear


class Expert(nn.Module):
    """One SwiGLU expert; names w1 (gate), w3 (up), w2 (down) as in Mixtral checkpoints."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(router_logits: torch.Tensor, top_k: int, dtype: torch.dtype):
    """(N, E) router logits -> (N, k) weights in `dtype` and (N, k) expert ids."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, k)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def _is_lora(m: nn.Module) -> bool:
    """A LoRA wrapper (models.lora.LoRALinear, duck-typed: models.lora imports nothing from here)."""
    return hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "base")


class SparseMoE(nn.Module):
    """Mixtral's `block_sparse_moe`: a linear router `gate` and `experts.{e}`.

    backend: None picks per call (decode kernels on CUDA when eligible, else grouped GEMMs where
    `has_grouped_mm`, else the loop); "reference" always loops; "triton" takes the decode kernels
    whenever the experts allow it, on any device (tests run them on CPU through the Triton
    interpreter), else loops; "grouped" takes the grouped GEMMs whenever the experts allow it, on
    any device (torch's CPU fallback of `_grouped_mm` in tests).
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate) for _ in range(num_experts))
        self.backend: str | None = None
        self._nf4_cache: tuple | None = None  # (packed buffers it was built from, NF4Experts)

    def forward(self, x: torch.Tensor, routing: tuple | None = None, combine: bool = True):
        """x (..., D) -> (..., D). routing: (weights (N, k), ids (N, k), moe_tc's plan or None) already
        computed from x by this block's router (`add_norm_route`), else the router runs here.
        combine=False (decoding, 2-D x): the output may come as a kernels.norm.SlotSums that the next
        RMSNorm combines in its own launch (kernels.moe_tc), else it is a tensor."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        nf4 = self._decode_experts(x.shape[0], x.device, x.requires_grad)
        plan = None
        if routing is not None:
            weights, experts, plan = routing
        elif nf4 is not None and self._plain_gate(x):
            weights, experts = moe_route(x, self.gate.weight, self.top_k)  # one launch, same routing
        else:
            weights, experts = route(self.gate(x), self.top_k, x.dtype)  # (N, k), (N, k)
        if nf4 is not None:
            experts_nf4, dtype = nf4
            same = dtype in (None, x.dtype) and x.dim() == 2
            out = moe_decode(x.to(dtype or x.dtype), weights, experts, experts_nf4, plan=plan,
                             combine=combine or not same)
            if isinstance(out, SlotSums):
                return out
            out = out.to(x.dtype)
        elif (grouped := self._grouped_experts(x)) is not None:
            out = moe_experts_grouped(x, weights, experts, grouped[0], adapters=grouped[1])
        else:
            out = self._forward_loop(x, weights, experts)
        return out.reshape(shape)

    def add_norm_route(self, norm: nn.Module, x: torch.Tensor, delta: torch.Tensor):
        """Decoding: the residual add, the RMSNorm before this block and its router in one launch
        (kernels.moe.add_rms_norm_route) -> (h = norm(x + delta), x + delta, routing for forward), or
        None where this block would not run its decode kernels or the kernel does not take the inputs.
        x, delta (N, D)."""
        nf4 = self._decode_experts(x.shape[0], x.device, x.requires_grad)
        if nf4 is None or not self._plain_gate(x):
            return None
        plan = nf4[1] in (None, x.dtype) and takes_tc(x, nf4[0])  # the router also plans moe_tc's experts
        fused = add_rms_norm_route(x, delta, norm.weight, norm.eps, self.gate.weight, self.top_k, plan=plan)
        return None if fused is None else (fused[0], fused[1], fused[2:])

    def _forward_loop(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # Sort the (token, slot) pairs by expert once, then run each expert over its rows.
        flat_expert = experts.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()
        token_of = order // self.top_k  # (N*k,) token index of each sorted pair
        weight_of = weights.reshape(-1)[order]  # (N*k,)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start:start + n]
            y = self.experts[e](x[rows]) * weight_of[start:start + n, None]  # (n, D)
            out.index_add_(0, rows, y)
            start += n
        return out

    # ---- the decode kernels ----

    def uses_decode_kernels(self, num_tokens: int, device, requires_grad: bool = False) -> bool:
        """Whether forward on `num_tokens` tokens takes the sync-free kernel path (CUDA-graph safe)."""
        return self._eligible(num_tokens, device, requires_grad) and self._nf4_linears() is not None

    def _eligible(self, num_tokens: int, device, requires_grad: bool) -> bool:
        if self.backend in ("reference", "grouped") or num_tokens * self.top_k > MAX_PAIRS:
            return False
        if self.backend != "triton" and torch.device(device).type != "cuda":
            return False
        return not (requires_grad and torch.is_grad_enabled())  # no backward: training loops

    def _plain_gate(self, x: torch.Tensor) -> bool:
        """The router is a bias-free nn.Linear in x's dtype (not quantized, not wrapped): the fused
        router kernel can replace gate + route."""
        g = self.gate
        return (type(g) is nn.Linear and g.bias is None and g.weight.dtype == x.dtype
                and x.shape[0] <= ROUTE_MAX_TOKENS)

    def _nf4_linears(self, lora: bool = False) -> list[NF4Linear] | None:
        """w1, w3, w2 of every expert (in that order) as NF4Linear without bias and of one compute
        dtype, else None. A merged LoRA wrapper counts as its NF4 base (its forward is the base's);
        with `lora`, an unmerged one does too (the caller adds the adapters: `_expert_adapters`)."""
        mods = []
        for ex in self.experts:
            for m in (ex.w1, ex.w3, ex.w2):
                if getattr(m, "merged", False) or (lora and _is_lora(m)):
                    m = getattr(m, "base", None)
                if not isinstance(m, NF4Linear) or m.bias is not None or m.weight.is_meta:
                    return None
                mods.append(m)
        if len({m.compute_dtype for m in mods}) != 1:
            return None
        return mods

    def _expert_adapters(self) -> dict[str, GroupedLoRA] | None:
        """Unmerged LoRA adapters on the experts' projections, per projection name, as `GroupedLoRA`;
        {} when there are none, None when they cannot be grouped (a projection adapted on some
        experts only, or with different ranks, scales or dropout)."""
        adapters = {}
        for which in PROJECTIONS:
            mods = [getattr(ex, which) for ex in self.experts]
            wrapped = [_is_lora(m) and not m.merged for m in mods]
            if not any(wrapped):
                continue
            if not all(wrapped) or len({(m.r, m.scale, m.dropout_p) for m in mods}) != 1:
                return None
            adapters[which] = GroupedLoRA([m.lora_A.weight for m in mods], [m.lora_B.weight for m in mods],
                                          mods[0].scale, mods[0].dropout_p if mods[0].training else 0.0)
        return adapters

    def _grouped_experts(self, x: torch.Tensor) -> tuple[NF4Experts, dict] | None:
        """(the experts' tables, their LoRA adapters per projection) when this (non-decode) call
        takes the grouped GEMMs, else None: NF4 experts computing in x's dtype (so each op rounds
        as the loop's does), on a device where `has_grouped_mm` holds or with backend "grouped"."""
        if self.backend not in (None, "grouped"):
            return None
        if self.backend is None and not has_grouped_mm(x.device, x.dtype):
            return None
        mods = self._nf4_linears(lora=True)
        if mods is None or mods[0].compute_dtype not in (None, x.dtype):
            return None
        if self.backend is None and (mods[0].in_features % 8 or mods[0].out_features % 8):
            return None  # the grouped GEMM needs 16-byte rows
        adapters = self._expert_adapters()
        if adapters is None:  # adapters the grouped GEMMs cannot carry: the loop
            return None
        return self._experts_table(mods), adapters

    def _decode_experts(self, num_tokens: int, device, requires_grad: bool):
        """(NF4Experts, compute dtype) when this call takes the kernels, else None."""
        if not self._eligible(num_tokens, device, requires_grad):
            return None
        mods = self._nf4_linears()
        if mods is None:
            return None
        return self._experts_table(mods), mods[0].compute_dtype

    def _experts_table(self, mods: list[NF4Linear]) -> NF4Experts:
        """The pointer tables of `mods` (w1, w3, w2 per expert), built once and rebuilt only when an
        expert's packed buffer is replaced (a reload or re-quantization); moving the module drops
        them (`_apply`)."""
        packed = [m.weight for m in mods]
        cached = self._nf4_cache
        if cached is None or len(cached[0]) != len(packed) or any(a is not b for a, b in zip(cached[0], packed)):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("SparseMoE: expert weights changed during CUDA-graph capture; "
                                   "run one step eagerly before capturing")
            q = [m.nf4 for m in mods]
            cached = self._nf4_cache = (packed, NF4Experts.build(q[0::3], q[1::3], q[2::3]))
        return cached[1]

    def _apply(self, fn, recurse=True):
        self._nf4_cache = None  # moved or cast: the tables would point at the old buffers
        return super()._apply(fn, recurse)
