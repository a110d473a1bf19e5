"""Attention of a few new tokens against the static KV cache, in two Triton launches.

The decode step's attention in PyTorch builds a boolean (B, 1, T, S) mask each step (~10 kernels)
and SDPA then expands k and v for GQA or runs a general kernel (several launches). Here the
queries of one kv head (all H/K query heads and T tokens it serves: the GQA group sits on the rows
of one tile) meet its cache rows, which are read once. The cache is cut into slices of whole key
blocks (flash-decoding): program (b, kv head, slice) runs an online softmax over its slice, and a
second launch merges the slices' partial results per (b, kv head), a few slices per step. (The
merge done by the last slice program of each pair, found by an atomic counter, was measured slower:
7.6 vs 7.1 us per call on Mixtral's decode shapes, H100, both on 8 warps.) A decode step has few
(b, kv head) pairs (3 x 8 for Mixtral with 3 samples); without the split each program walked the
whole cache alone and the kernel was latency-bound (12 us per layer measured on the H100 for
~430 keys, about SDPA's time).

Visibility comes from the inputs themselves, with no mask tensor: key slot s is visible to the
token at slot p when s <= p, p - s < window (sliding window), and attention_mask[b, s] != 0. As in
models.transformer, a query that sees no key at all (a pad token) attends to every key instead of
producing NaN; the merge recomputes such rows over the whole cache, and never does otherwise.

Scores and the softmax are fp32; p is cast to the value dtype for the second product (as flash
attention does), so bf16 results differ from SDPA's by bf16 rounding; fp32 is within ~1e-6.

Forward only (inference, decoding). Entry point: `decode_attention(q, k, v, input_pos, ...)` for
T * H/K <= MAX_ROWS query rows per kv head (`fits`); CUDA tensors take Triton, CPU tensors the
PyTorch reference; backend="triton" forces the kernel (tests run it through TRITON_INTERPRET=1).

Shapes: B batch, T new tokens, H heads, K kv heads, G = H/K, D head dim, S cache length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 64  # T * G query rows per program (one tile); more (a long prefill) take SDPA
TARGET_PROGRAMS = 256  # split the cache until about this many programs run (an H100 has 132 SMs)
UNROLL: int | None = None  # slices merged per step (their loads in flight together); None: by tile (config)


def fits(T: int, n_heads: int, n_kv: int) -> bool:
    """Whether T new tokens of n_heads query heads over n_kv kv heads fit the kernel."""
    return T * (n_heads // n_kv) <= MAX_ROWS


def config(block_m: int, block_d: int) -> dict:
    """Keys per block, warps and slices merged per step by tile size, chosen so no tile spills
    registers on sm_90 (tests/kernels/test_decode_ops_sm90.py, Triton 3.6 and 3.9): 16 x 128 -> 64
    keys, 4 warps, 4 slices per step (the decode step); 32 x 128 -> 64 keys, 8 warps, 2 per step;
    64 x 128 -> 32 keys, 8 warps, 1 per step. Measured on the decode step's shapes (H100, 448 / 1088
    slots): 6.3 / 9.4 us per call, against 6.7 / 9.8 with 8 warps and 7.8 / 11.2 with one slice per
    step; 128-key blocks were faster at 448 slots only (6.1 / 11.0)."""
    tile = block_m * block_d
    return dict(BLOCK_S=64 if tile <= 32 * 128 else 32, num_warps=4 if tile <= 16 * 128 else 8,
                UNROLL=UNROLL or (4 if tile <= 16 * 128 else 2 if tile <= 32 * 128 else 1))


def visible_reference(input_pos, S, attention_mask=None, window=None):
    """(T,) query slots -> boolean (B|1, 1, T, S) visibility (models.transformer's mask for a cache)."""
    k_pos = torch.arange(S, device=input_pos.device)  # (S,)
    vis = k_pos[None, :] <= input_pos[:, None]  # (T, S)
    if window is not None:
        vis = vis & (input_pos[:, None] - k_pos[None, :] < window)
    vis = vis[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        vis = vis & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    return vis | ~vis.any(dim=-1, keepdim=True)  # a query with no visible key sees all


def decode_attention_reference(q, k, v, input_pos, attention_mask=None, window=None):
    """See `decode_attention`; the PyTorch ops the kernel replaces."""
    mask = visible_reference(input_pos, k.shape[2], attention_mask, window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                       enable_gqa=q.shape[2] != k.shape[1])  # (B, H, T, D)
    return y.transpose(1, 2).contiguous()  # (B, T, H, D)


@triton.jit
def _queries(q_ptr, pos_ptr, b, kh, T, stride_qb, stride_qt, stride_qh,
             G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile of kv head kh's queries: row r is token r // G of query head kh * G + r % G.
    -> q (BLOCK_M, BLOCK_D), the slot of each row's token (BLOCK_M,)."""
    r = tl.arange(0, BLOCK_M)
    t, h = r // G, kh * G + r % G
    d = tl.arange(0, BLOCK_D)
    q_off = b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=(t < T)[:, None] & (d[None, :] < D), other=0.0)
    return q, tl.load(pos_ptr + t, mask=t < T, other=0)


@triton.jit
def _attend(q, q_pos, force, k_row, v_row, m_row, stride_ks, stride_vs, start, end, window, scale,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Online softmax of q (BLOCK_M, BLOCK_D) over cache rows start..end-1 -> (m, l, acc) in fp32:
    the running max, the sum of exp(score - m), and the exp-weighted sum of values. Rows where
    `force` is set see every key."""
    d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) key slots
        s_ok = s < end
        kv_ok = s_ok[:, None] & (d[None, :] < D)
        k = tl.load(k_row + s[:, None] * stride_ks + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
        # v's load is issued with k's, before the scores need k: one memory latency per block, not two
        v = tl.load(v_row + s[:, None] * stride_vs + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_S) fp32
        vis = (s[None, :] <= q_pos[:, None]) & s_ok[None, :]
        if HAS_WINDOW:
            vis = vis & (q_pos[:, None] - s[None, :] < window)
        if HAS_MASK:
            vis = vis & (tl.load(m_row + s, mask=s_ok, other=0) != 0)[None, :]
        vis = vis | (force[:, None] & s_ok[None, :])
        scores = tl.where(vis, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])  # (BLOCK_M, BLOCK_S)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, ml_ptr, acc_ptr, T, S, window, scale, BLOCKS_PER_SPLIT,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs, stride_mb,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Program (b, kh, split): the online softmax of kv head kh's queries over one slice of the
    cache -> its partial (m, l) and acc, for _combine_kernel."""
    b, kh, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q, q_pos = _queries(q_ptr, pos_ptr, b, kh, T, stride_qb, stride_qt, stride_qh, G, D, BLOCK_M, BLOCK_D)
    start = split * BLOCKS_PER_SPLIT * BLOCK_S
    end = tl.minimum(S, start + BLOCKS_PER_SPLIT * BLOCK_S)
    r = tl.arange(0, BLOCK_M)
    m_i, l_i, acc = _attend(q, q_pos, r < 0, k_ptr + b * stride_kb + kh * stride_kh,
                            v_ptr + b * stride_vb + kh * stride_vh, m_ptr + b * stride_mb, stride_ks, stride_vs,
                            start, end, window, scale, D, BLOCK_M, BLOCK_D, BLOCK_S, HAS_MASK, HAS_WINDOW)
    part = (b * tl.num_programs(1) + kh) * tl.num_programs(2) + split  # (B, K, n_split) row-major
    row_ok = r // G < T
    d = tl.arange(0, BLOCK_D)
    tl.store(ml_ptr + part * 2 * BLOCK_M + r, m_i, mask=row_ok)
    tl.store(ml_ptr + part * 2 * BLOCK_M + BLOCK_M + r, l_i, mask=row_ok)
    tl.store(acc_ptr + part * BLOCK_M * BLOCK_D + r[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, m_ptr, ml_ptr, acc_ptr, T, S, window, scale, N_SPLIT,
                    stride_qb, stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ob, stride_ot, stride_oh, stride_mb,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, UNROLL: tl.constexpr):
    """Program (b, kh): merge the N_SPLIT partials of kv head kh's queries and write o. A row that
    saw no key in any slice (a pad token) is recomputed over the whole cache seeing every key. One
    online pass, UNROLL slices per step: their loads are independent, so they are in flight together."""
    b, kh = tl.program_id(0).to(tl.int64), tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    t, h = r // G, kh * G + r % G
    row_ok = t < T
    first = (b * tl.num_programs(1) + kh) * N_SPLIT
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for c in range(0, N_SPLIT, UNROLL):
        for j in tl.static_range(UNROLL):
            part = first + c + j
            ok = row_ok & (r * 0 + c + j < N_SPLIT)  # (BLOCK_M,): rows of a slice that exists
            m = tl.load(ml_ptr + part * 2 * BLOCK_M + r, mask=ok, other=float("-inf"))
            l = tl.load(ml_ptr + part * 2 * BLOCK_M + BLOCK_M + r, mask=ok, other=0.0)
            a = tl.load(acc_ptr + part * BLOCK_M * BLOCK_D + r[:, None] * BLOCK_D + d[None, :], mask=ok[:, None],
                        other=0.0)
            m_new = tl.maximum(m_i, m)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key so far
            alpha = tl.exp(m_i - m_safe)
            w = tl.exp(m - m_safe)
            l_i = l_i * alpha + w * l
            acc = acc * alpha[:, None] + w[:, None] * a
            m_i = m_new
    empty = row_ok & (l_i == 0.0)  # no visible key: attend to all (models.transformer's rule)
    if tl.max(empty.to(tl.int32), axis=0) > 0:
        q, q_pos = _queries(q_ptr, pos_ptr, b, kh, T, stride_qb, stride_qt, stride_qh, G, D, BLOCK_M, BLOCK_D)
        _, l_j, acc_j = _attend(q, q_pos, empty, k_ptr + b * stride_kb + kh * stride_kh,
                                v_ptr + b * stride_vb + kh * stride_vh, m_ptr + b * stride_mb, stride_ks,
                                stride_vs, 0, S, window, scale, D, BLOCK_M, BLOCK_D, BLOCK_S, HAS_MASK, HAS_WINDOW)
        l_i = tl.where(empty, l_j, l_i)
        acc = tl.where(empty[:, None], acc_j, acc)
    o = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    o_off = b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))


def splits(S: int, block_s: int, programs: int) -> tuple[int, int]:
    """Cut the S keys into slices of whole blocks so that about TARGET_PROGRAMS programs run
    (`programs` = B * K without a split) -> (number of slices, blocks per slice)."""
    blocks = triton.cdiv(S, block_s)
    per_split = triton.cdiv(blocks, max(1, min(blocks, TARGET_PROGRAMS // programs)))
    return triton.cdiv(blocks, per_split), per_split


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, window: int | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Softmax attention of T new tokens over the whole static cache, with the causal-by-slot,
    sliding-window and padding mask of models.transformer applied inside. Two launches: the
    slices of the cache in parallel, then their merge.

    q (B, T, H, D) (any row strides, D contiguous); k, v (B, K, S, D) the cache (cast to q's dtype
    when read); input_pos (T,) the cache slots of the T tokens; attention_mask (B|1, S) nonzero for
    real tokens, or None; window: the sliding window, or None. -> (B, T, H, D) contiguous.
    """
    B, T, H, D = q.shape
    K, S = k.shape[1], k.shape[2]
    use_kernel = backend == "triton" or (backend is None and q.is_cuda)
    if (not use_kernel or H % K or not fits(T, H, K) or q.stride(-1) != 1 or k.stride(-1) != 1
            or v.stride(-1) != 1 or (attention_mask is not None and (attention_mask.shape[-1] != S
                                                                     or attention_mask.shape[0] not in (1, B)
                                                                     or attention_mask.stride(-1) != 1))
            or (torch.is_grad_enabled() and q.requires_grad)):
        return decode_attention_reference(q, k, v, input_pos, attention_mask, window)
    G = H // K
    mask = attention_mask if attention_mask is not None else input_pos  # unused when None
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    stride_mb = mask.stride(0) if attention_mask is not None and mask.shape[0] > 1 else 0
    input_pos = input_pos.contiguous()
    BLOCK_M, BLOCK_D = max(16, triton.next_power_of_2(T * G)), max(16, triton.next_power_of_2(D))
    cfg = config(BLOCK_M, BLOCK_D)
    n_split, per_split = splits(S, cfg["BLOCK_S"], B * K)
    ml = torch.empty((B, K, n_split, 2, BLOCK_M), dtype=torch.float32, device=q.device)  # partial m, l
    acc = torch.empty((B, K, n_split, BLOCK_M, BLOCK_D), dtype=torch.float32, device=q.device)  # partial acc
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)  # (B, T, H, D)
    unroll = cfg.pop("UNROLL")  # the merge's only
    common = dict(G=G, D=D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, HAS_MASK=attention_mask is not None,
                  HAS_WINDOW=window is not None, **cfg)
    args = (T, S, window or 0, D ** -0.5)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    _split_kernel[(B, K, n_split)](q, k, v, input_pos, mask, ml, acc, *args, per_split, *strides, stride_mb,
                                   **common)
    _combine_kernel[(B, K)](q, k, v, o, input_pos, mask, ml, acc, *args, n_split, *strides, *o.stride()[:3],
                            stride_mb, UNROLL=unroll, **common)
    return o
