"""The Mixtral sparse mixture-of-experts block (plain PyTorch reference path).

Routing follows Mixtral exactly: softmax over the router logits in fp32, top-k, renormalize the
k weights to sum to one, cast back to the activation dtype. Each expert is a SwiGLU MLP
w2(silu(w1 x) * w3 x). Tokens are grouped by expert so each expert runs one dense matmul over
just the rows routed to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class SparseMoE(nn.Module):
    """Mixtral's `block_sparse_moe`: a linear router `gate` and `experts.{e}`."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, experts = route(self.gate(x), self.top_k, x.dtype)  # (N, k), (N, k)
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
        return out.reshape(shape)
