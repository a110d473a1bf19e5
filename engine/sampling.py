"""Batched decoding with a static KV cache and one shared prefill for N samples per prompt.

Rows are left padded and prefilled once; the cache is then repeated N times (row b's samples
are rows b*N .. b*N+N-1) and all B*N sequences decode together, each stopping at its own EOS.

Sampling is temperature + top-p through the Gumbel-max trick with counter-based noise: the
uniform draw for (seed, stream, step, token) is a hash of those four numbers. A sequence's
tokens therefore depend only on its own stream id (the caller's row id and the sample index),
never on what else shares the batch, so a shared prefill gives exactly the tokens of
independent runs, on CPU and GPU alike.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: int, streams: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(S,) stream ids -> (S, vocab) uniforms in (0, 1), a pure function of its arguments."""
    device = streams.device
    key = _hash32(_hash32(torch.tensor(seed & _M32, device=device)) ^ streams.long())  # (S,)
    key = _hash32(key ^ (step * 0x9E3779B9 & _M32))  # (S,)
    tok = _hash32(torch.arange(vocab, device=device, dtype=torch.long) * 0x85EBCA6B)  # (V,)
    bits = _hash32(key[:, None] ^ tok[None, :]) >> 8  # (S, V), 24 random bits
    return (bits.float() + 0.5) / float(1 << 24)


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, seed: int,
                streams: torch.Tensor, step: int) -> torch.Tensor:
    """logits (S, V) -> next tokens (S,). temperature <= 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seed, streams, step, logits.shape[-1])))
    return (logits + gumbel).argmax(dim=-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 64, samples: int = 1,
             temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, eos_ids=(),
             pad_id: int = 0, stream_ids: list[int] | None = None,
             on_step=None) -> list[list[list[int]]]:
    """Decode `samples` continuations of each prompt; returns tokens[row][sample] (EOS excluded).

    stream_ids: a stable id per prompt (e.g. its row number in the dataset) that keys its random
    stream; by default the prompt's index in this call. on_step(n_new_tokens) is called after
    every decode step (progress bars).
    """
    device = next(model.parameters()).device
    B, N = len(prompts), samples
    L = max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L + max_new_tokens), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        mask[i, L - len(p):] = 1
    pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L)
    stream_base = torch.tensor(stream_ids if stream_ids is not None else range(B), device=device)
    streams = (stream_base[:, None] * N + torch.arange(N, device=device)).reshape(-1)  # (B*N,)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)

    model.setup_kv_cache(B, L + max_new_tokens)
    try:
        logits = model(ids, attention_mask=mask, position_ids=pos,
                       input_pos=torch.arange(L, device=device))[:, -1]  # (B, V)
        if N > 1:
            model.repeat_kv_cache(N)
            logits = logits.repeat_interleave(N, dim=0)  # (B*N, V)
            mask = mask.repeat_interleave(N, dim=0)
        next_pos = pos[:, -1].repeat_interleave(N) + 1  # (B*N,)
        out = torch.full((B * N, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B * N, dtype=torch.bool, device=device)
        lengths = torch.full((B * N,), max_new_tokens, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            tok = sample_next(logits, temperature=temperature, top_p=top_p, seed=seed,
                              streams=streams, step=t)  # (B*N,)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out[:, t] = tok
            hit = torch.isin(tok, eos) & ~done
            lengths = torch.where(hit, torch.full_like(lengths, t), lengths)
            done |= hit
            if on_step is not None:
                on_step(int((~done).sum()) + int(hit.sum()))
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits = model(tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           input_pos=torch.tensor([L + t], device=device))[:, -1]
            next_pos = next_pos + 1
    finally:
        model.clear_kv_cache()
    out, lengths = out.cpu(), lengths.cpu()
    seqs = [out[i, :lengths[i]].tolist() for i in range(B * N)]
    return [seqs[b * N:(b + 1) * N] for b in range(B)]
