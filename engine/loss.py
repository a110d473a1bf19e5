"""Chunked cross-entropy over the labelled positions only.

The full batch of fp32 logits (B*T x V: 8 x 640 x 32000 x 4 bytes = 655 MB for Mixtral) is
never materialized: the hidden states at labelled positions are gathered first, then the
lm_head projection and the cross-entropy run chunk by chunk, so each chunk's logits live only
while that chunk is computed.

With a frozen lm_head (LoRA) the gradient towards the hidden states is computed chunk by chunk in
the forward itself (`_FrozenHeadCrossEntropy`): each chunk's loss and d(loss)/d(hidden) come from
one local autograd pass, and the backward only scales the stored gradient. That costs the two
lm_head GEMMs of plain autograd and keeps one hidden-sized gradient. The other case (a trainable
lm_head) runs each chunk under activation checkpointing, which recomputes its logits in the
backward: three GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight.to(h.dtype)).float()  # (n, V)
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 2048) -> tuple[torch.Tensor, int]:
    """hidden (B, T, C), labels (B, T) -> (summed loss over next-token targets, target count).

    Position t predicts labels[t + 1]; labels of -100 are skipped. Dividing the sum by the
    count gives the mean token loss; callers that accumulate gradients divide by the count of
    the whole optimizer step instead, so every target token weighs the same.
    """
    C = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, C)  # (B*(T-1), C)
    y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    keep = (y != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    h, y = h[keep], y[keep]
    if torch.is_grad_enabled() and h.requires_grad and not lm_head_weight.requires_grad:
        return _FrozenHeadCrossEntropy.apply(h, lm_head_weight, y, chunk_size), int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk_size):
        hi, yi = h[i:i + chunk_size], y[i:i + chunk_size]
        if torch.is_grad_enabled() and (hi.requires_grad or lm_head_weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, hi, lm_head_weight, yi, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hi, lm_head_weight, yi)
    return total, int(y.numel())


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) for h (N, C) and a frozen W (V, C). The forward computes dL/dh chunk
    by chunk (the same ops as autograd through `_chunk_loss_sum`), so nothing is recomputed."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk_size):
        total = h.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(h)  # (N, C): dL/dh for a loss gradient of 1
        for i in range(0, y.numel(), chunk_size):
            hi = h[i:i + chunk_size].detach().requires_grad_()
            with torch.enable_grad():
                loss = _chunk_loss_sum(hi, weight, y[i:i + chunk_size])
                (grad[i:i + chunk_size],) = torch.autograd.grad(loss, hi)
            total = total + loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return (grad.float() * dloss).to(grad.dtype), None, None, None  # one rounding


def cross_entropy_reference(hidden, lm_head_weight, labels):
    """The plain version: full logits, then the mean over labelled targets."""
    logits = F.linear(hidden, lm_head_weight).float()[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
