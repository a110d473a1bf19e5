"""One decoding step's sampling in one Triton launch: temperature, top-p, Gumbel-max, and the record.

Sampling is temperature + top-p through the Gumbel-max trick with counter-based noise: the uniform
for (stream key, step, token) is a hash of those numbers, so a sequence's tokens depend only on its
own stream, never on the batch (engine.sampling). In PyTorch ops one step's sampling is ~40 kernels
(a sort of the vocabulary, a cumsum, a scatter, the hash as int64 ops, the record's updates): about
0.25 ms of a 32-layer Mixtral decode step, mostly a slow row scan and the radix sort. Here it is one
program per sequence, and no sort.

Top-p is defined without an order among equal logits: a token is kept when the probability mass of
the tokens with a strictly larger logit is below top_p (the most likely token is always kept). Tied
logits are kept or dropped together, so the result does not depend on how a sort breaks ties.

The kernel finds argmax over the kept set K of (x + g) (x = logit / temperature, g the Gumbel noise)
without computing K: j = argmax of x + g over S = all tokens; if the mass above x_j is below top_p, j
is in K and, as K is a subset of S, it is the answer. Otherwise no token with x <= x_j is kept, so S
becomes {x > x_j} and the argmax is taken again. K is a subset of every S, so the loop ends with the
reference's answer. By the Gumbel-max property, each round's j is a draw from the softmax restricted
to S, which lands in K with probability mass(K) / mass(S) >= top_p: the expected number of extra
rounds is below 1 / top_p - 1 (~0.05 at 0.95), and a step usually costs two passes over the logits
(noise, argmax and max logit in the first; the normalizer and the mass above j in the second). Each
lane keeps its own running argmax and sums across the chunks of the vocabulary, reduced once at
the end of a pass.

Numerics: the reference (`sample_reference`) sums probabilities in sorted order, the kernel per
lane and then in a tree, so a token whose mass above lies within a few fp32 ulps of top_p can
be kept by one and dropped by the other; the kernel's log may differ from torch's by an ulp, which
can only flip an argmax between scores that close. Tests compare tokens on CPU (the interpreter,
exact logs) and, on the GPU, the chosen token's score against the reference's best score.

Entry points: `sample_reference(logits, keys, step, temperature, top_p)` (PyTorch) and
`sample_and_record(...)`, which samples and also writes the token into the decoder's buffers (the
output row, the done / hit flags, the lengths), as `engine.sampling._Decoder.record` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

M32 = 0xFFFFFFFF
STEP_MIX = 0x9E3779B9  # the step's multiplier in the noise key
TOKEN_MIX = 0x85EBCA6B  # the token id's multiplier in its hash


# ----------------------------------------------------------------------------------------------
# The reference: counter-based noise and top-p sampling in PyTorch ops
# ----------------------------------------------------------------------------------------------

def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def stream_keys(seed: int, streams: torch.Tensor) -> torch.Tensor:
    """(S,) stream ids -> (S,) per-stream keys of the noise hash."""
    return hash32(hash32(torch.tensor(seed & M32, device=streams.device)) ^ streams.long())


def token_hashes(vocab: int, device) -> torch.Tensor:
    """(V,) the per-token half of the noise hash."""
    return hash32(torch.arange(vocab, device=device, dtype=torch.long) * TOKEN_MIX)


def noise(keys: torch.Tensor, step, tok: torch.Tensor) -> torch.Tensor:
    """(S, V) uniforms in (0, 1) from stream keys (S,), a step (int or (1,) tensor), token hashes (V,)."""
    key = hash32(keys ^ (step * STEP_MIX & M32))  # (S,)
    bits = hash32(key[:, None] ^ tok[None, :]) >> 8  # (S, V), 24 random bits
    return (bits.float() + 0.5) / float(1 << 24)


def top_p_keep(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """x (S, V) fp32 -> (S, V) bool: kept where the mass of strictly larger logits is below top_p."""
    probs = x.softmax(dim=-1)
    sorted_x, order = x.sort(dim=-1, descending=True)
    p_sorted = probs.gather(-1, order)
    before = p_sorted.cumsum(dim=-1) - p_sorted  # mass sorted ahead of each token
    first = torch.searchsorted(-sorted_x, -sorted_x, side="left")  # first index of each tie group
    keep_sorted = before.gather(-1, first) < top_p  # mass strictly above each token's logit
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_reference(logits: torch.Tensor, keys: torch.Tensor, step, tok: torch.Tensor,
                     temperature: float, top_p: float) -> torch.Tensor:
    """logits (S, V), stream keys (S,), token hashes tok (V,) -> next tokens (S,); no host sync
    (step may be a (1,) device tensor). temperature <= 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    x = logits.float() * (1.0 / temperature)  # (S, V); the kernel multiplies by the same fp32 factor
    if top_p < 1.0:
        x = x.masked_fill(~top_p_keep(x, top_p), float("-inf"))
    return (x - torch.log(-torch.log(noise(keys, step, tok)))).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# The kernel: one program per sequence, the vocabulary in chunks
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping multiplies, logical shifts), as `hash32`."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _chunk(row_ptr, start, V, inv_temp, key, BLOCK: tl.constexpr, GREEDY: tl.constexpr):
    """Token ids (BLOCK,), x = logit * inv_temp (-inf past V), score = x + Gumbel noise (x if GREEDY)."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(row_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
    if GREEDY:
        score = x
    else:
        tok = _mix32(offs.to(tl.uint32) * tl.full([BLOCK], 0x85EBCA6B, tl.uint32))
        bits = _mix32(key ^ tok) >> 8  # 24 random bits
        u = (bits.to(tl.float32) + 0.5) / 16777216.0
        score = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
    return offs, x, score


@triton.jit
def _first_max(best_v, best_i, V):
    """Per-lane (best score, its token) (BLOCK,) -> the first token of the largest score."""
    best = tl.max(best_v, axis=0)
    return tl.min(tl.where(best_v == best, best_i, V), axis=0)


@triton.jit
def _argmax_above(row_ptr, V, inv_temp, key, x_j, BLOCK: tl.constexpr, GREEDY: tl.constexpr,
                  ABOVE: tl.constexpr):
    """(the first token of the largest score, over all tokens or (ABOVE) those with x > x_j; the
    largest x). Each lane keeps its own best across chunks (a later chunk wins only with a larger
    score), so the chunks need no reduction; one at the end."""
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    m_v = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        offs, x, score = _chunk(row_ptr, start, V, inv_temp, key, BLOCK, GREEDY)
        if ABOVE:
            score = tl.where(x > x_j, score, float("-inf"))
        take = score > best_v
        best_v = tl.where(take, score, best_v)
        best_i = tl.where(take, offs, best_i)
        m_v = tl.maximum(m_v, x)
    return _first_max(best_v, best_i, V), tl.max(m_v, axis=0)


@triton.jit
def _mass_above(row_ptr, V, inv_temp, key, m, x_j, BLOCK: tl.constexpr):
    """(sum of exp(x - m) over x > x_j, over all tokens): per-lane sums, reduced once."""
    above = tl.zeros([BLOCK], tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs, x, score = _chunk(row_ptr, start, V, inv_temp, key, BLOCK, True)
        e = tl.exp(x - m)
        total += e
        above += tl.where(x > x_j, e, 0.0)
    return tl.sum(above, axis=0), tl.sum(total, axis=0)


@triton.jit
def _sample_record_kernel(logits_ptr, stride_l, keys_ptr, t_ptr, done_ptr, eos_ptr, n_eos,
                          tok_ptr, out_ptr, stride_o, lengths_ptr, hit_ptr,
                          V, inv_temp, top_p, pad_id,
                          GREEDY: tl.constexpr, TOP_P: tl.constexpr, BLOCK: tl.constexpr,
                          EOS_BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + r * stride_l
    t = tl.load(t_ptr)  # int64 index of the token sampled now
    key = _mix32(tl.load(keys_ptr + r).to(tl.uint32) ^ (t.to(tl.uint32) * tl.full([], 0x9E3779B9, tl.uint32)))

    # Pass 1: the argmax of the scores over all tokens, and the max logit (for top-p).
    best_i, m = _argmax_above(row_ptr, V, inv_temp, key, 0.0, BLOCK, GREEDY, False)

    if TOP_P:
        # Pass 2 (+ rare rounds): while the mass above the chosen logit reaches top_p, the chosen
        # token is not kept, nor is any with a logit <= its logit: take the argmax above it.
        m = tl.where(m == float("-inf"), 0.0, m)  # all logits -inf: nothing to normalize
        x_j = tl.load(row_ptr + best_i).to(tl.float32) * inv_temp
        above, z = _mass_above(row_ptr, V, inv_temp, key, m, x_j, BLOCK)
        while above / z >= top_p:
            best_i, _ = _argmax_above(row_ptr, V, inv_temp, key, x_j, BLOCK, GREEDY, True)
            x_j = tl.load(row_ptr + best_i).to(tl.float32) * inv_temp
            above, z = _mass_above(row_ptr, V, inv_temp, key, m, x_j, BLOCK)

    # The record: a finished sequence gets pad; EOS marks it finished at step t.
    d = tl.load(done_ptr + r)  # uint8
    tok = tl.where(d != 0, pad_id, best_i).to(tl.int64)
    tl.store(tok_ptr + r, tok)
    tl.store(out_ptr + r * stride_o + t, tok)
    e = tl.arange(0, EOS_BLOCK)
    eos = tl.load(eos_ptr + e, mask=e < n_eos, other=-1)
    hit = (tl.sum((eos == tok).to(tl.int32), axis=0) > 0) & (d == 0)
    tl.store(hit_ptr + r, hit.to(tl.uint8))
    tl.store(done_ptr + r, ((d != 0) | hit).to(tl.uint8))
    tl.store(lengths_ptr + r, t, mask=hit)


def sample_and_record(logits: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, *, temperature: float,
                      top_p: float, pad_id: int, eos: torch.Tensor, tok: torch.Tensor, out: torch.Tensor,
                      lengths: torch.Tensor, done: torch.Tensor, hit: torch.Tensor) -> None:
    """One launch: sample token t of every sequence from logits (R, V) and record it.

    keys (R,) int64 stream keys; t (1,) int64 step; eos (E,) int64. In place: tok (R,) int64 the
    token (pad_id where done), out (R, max_new) int64 column t, hit (R,) bool finished now,
    done (R,) bool |= hit, lengths (R,) int64 = t where hit. No host sync: CUDA-graph safe.
    """
    R, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    for name, buf in (("keys", keys), ("tok", tok), ("lengths", lengths), ("done", done), ("hit", hit)):
        if buf.shape != (R,) or not buf.is_contiguous():
            raise ValueError(f"sample_and_record: {name} must be contiguous of shape ({R},), got {tuple(buf.shape)}")
    if done.dtype != torch.bool or hit.dtype != torch.bool:
        raise ValueError("sample_and_record: done and hit must be bool tensors")
    if not 0 < top_p <= 1:  # top_p <= 0 keeps nothing: the kernel's rounds would never end
        raise ValueError(f"sample_and_record: top_p must be in (0, 1], got {top_p}")
    greedy = temperature <= 0
    BLOCK = min(4096, triton.next_power_of_2(V))
    _sample_record_kernel[(R,)](
        logits, logits.stride(0), keys, t, done.view(torch.uint8), eos, eos.numel(),
        tok, out, out.stride(0), lengths, hit.view(torch.uint8),
        V, 1.0 if greedy else 1.0 / temperature, float(top_p), pad_id,
        GREEDY=greedy, TOP_P=(not greedy) and top_p < 1.0, BLOCK=BLOCK,
        EOS_BLOCK=triton.next_power_of_2(max(1, eos.numel())), num_warps=16)
