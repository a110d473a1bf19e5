"""Fused rotary embedding for q and k in Triton, with the KV-cache write folded in.

In PyTorch, RoPE on q and k is ~10 kernels (neg, cat, two multiplies and an add, twice) and the
cache write two more (index_put for k and v). Here one launch does all of it: program (row, head)
rotates one head of q or k, and for a k head writes the rotated k and the matching v row straight
into the static cache at the token's slot (k and v are never stored elsewhere).

Numerics equal the half-rotation RoPE of transformers (`x * cos + rotate_half(x) * sin`) as PyTorch
computes it in x's dtype: each product rounded to x's dtype, then their sum rounded; no FMA
(`enable_fp_fusion=False`), so the result is bit-identical in fp32, fp16 and bf16. The cache
stores the rotated k cast to the cache's dtype, as `KVCache.update` does.

Forward only (inference, decoding). Entry point: `rope_qkv(q, k, v, cos, sin, cache)`; CUDA tensors
take Triton, CPU tensors the PyTorch reference; backend="triton" forces the kernel (tests run it
through TRITON_INTERPRET=1).

Shapes: B batch, T new tokens, M = B*T rows (token-major: row b*T + t), H heads, K kv heads,
D head dim, S cache length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, 1, T, D): rotate the two halves of each head dim (HF `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_qkv_reference(q, k, v, cos, sin, cache=None):
    """See `rope_qkv`; the PyTorch ops the kernel replaces."""
    T, D = cos.shape[-2], cos.shape[-1]
    M = q.shape[0]
    B = M // T
    cos, sin = cos.reshape(-1, 1, T, D), sin.reshape(-1, 1, T, D)  # (B|1, 1, T, D)
    heads = lambda t: t.reshape(B, T, -1, D).transpose(1, 2)  # (M, n*D) -> (B, n, T, D)  # noqa: E731
    q_rot = apply_rope_reference(heads(q), cos, sin).transpose(1, 2).reshape(M, -1)  # (M, H*D)
    k_rot = apply_rope_reference(heads(k), cos, sin)  # (B, K, T, D)
    if cache is None:
        return q_rot, k_rot.transpose(1, 2).reshape(M, -1)
    cache_k, cache_v, input_pos = cache
    cache_k[:, :, input_pos] = k_rot.to(cache_k.dtype)
    cache_v[:, :, input_pos] = heads(v).to(cache_v.dtype)
    return q_rot, None


@triton.jit
def _rotate(src, dst, cos_row, sin_row, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """dst[:D] = src * cos + rotate_half(src) * sin for one head, each product rounded to src's dtype."""
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    x1 = tl.load(src + d, mask=ok, other=0.0)  # (BLOCK,) first half
    x2 = tl.load(src + HALF + d, mask=ok, other=0.0)  # second half
    _rotate_values(x1, x2, dst, cos_row, sin_row, HALF, BLOCK)


@triton.jit
def _rotate_values(x1, x2, dst, cos_row, sin_row, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """_rotate on a head's two halves x1, x2 (BLOCK,): products rounded to x1's dtype, stored in dst's."""
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    c1 = tl.load(cos_row + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=ok, other=0.0).to(tl.float32)
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32)
    b1 = (x2.to(tl.float32) * s1).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
    tl.store(dst + d, (a1 - b1).to(dt), mask=ok)  # x1 cos - x2 sin
    tl.store(dst + HALF + d, (a2 + b2).to(dt), mask=ok)  # x2 cos + x1 sin


@triton.jit
def _rope_qkv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, ck_ptr, cv_ptr, pos_ptr,
                     T, stride_q, stride_k, stride_v, stride_qo, stride_ko,
                     stride_cos_b, stride_cos_t, stride_sin_b, stride_sin_t,
                     stride_c_b, stride_c_h, stride_c_s, stride_cv_b, stride_cv_h, stride_cv_s,
                     H: tl.constexpr, D: tl.constexpr, WRITE_CACHE: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)  # row = b * T + t
    head = tl.program_id(1)  # 0..H-1: a q head; H..H+K-1: a k head (and its v)
    b, t = m // T, m % T
    cos_row = cos_ptr + b * stride_cos_b + t * stride_cos_t
    sin_row = sin_ptr + b * stride_sin_b + t * stride_sin_t
    if head < H:
        _rotate(q_ptr + m * stride_q + head * D, qo_ptr + m * stride_qo + head * D, cos_row, sin_row,
                D // 2, BLOCK)
    else:
        kh = head - H
        if WRITE_CACHE:
            slot = tl.load(pos_ptr + t).to(tl.int64)
            _rotate(k_ptr + m * stride_k + kh * D, ck_ptr + b * stride_c_b + kh * stride_c_h + slot * stride_c_s,
                    cos_row, sin_row, D // 2, BLOCK)
            d = tl.arange(0, 2 * BLOCK)
            v = tl.load(v_ptr + m * stride_v + kh * D + d, mask=d < D)
            tl.store(cv_ptr + b * stride_cv_b + kh * stride_cv_h + slot * stride_cv_s + d, v, mask=d < D)
        else:
            _rotate(k_ptr + m * stride_k + kh * D, ko_ptr + m * stride_ko + kh * D, cos_row, sin_row,
                    D // 2, BLOCK)


def _tables_fit(cos: torch.Tensor, M: int) -> bool:
    """Whether the kernels take cos (and sin, same shape) for M = B*T rows: an even head dim, and one
    table row per batch row or one shared by all."""
    T, D = cos.shape[-2], cos.shape[-1]
    return D % 2 == 0 and M % T == 0 and cos.numel() // (T * D) in (1, M // T)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """cos, sin as (B|1, T, D), and their (batch, token) strides as the kernels take them (batch
    stride 0 when one table row serves every batch row)."""
    T, D = cos.shape[-2], cos.shape[-1]
    cos, sin = cos.reshape(-1, T, D), sin.reshape(-1, T, D)
    row_stride = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731
    return cos, sin, (row_stride(cos), cos.stride(1), row_stride(sin), sin.stride(1))


def rope_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             cache: tuple | None = None, backend: str | None = None):
    """RoPE on q and k in one launch; with a cache, k and v also go into it.

    q (M, H*D), k and v (M, K*D), rows token-major (M = B*T); cos, sin (B|1, 1, T, D) or
    (B|1, T, D) in q's dtype (models.transformer.rope_cos_sin). cache: None, or (cache_k, cache_v
    (B, K, S, D), input_pos (T,) the slots of the T tokens).
    Returns (q_rot (M, H*D), k_rot (M, K*D)), or (q_rot, None) when k and v went into the cache.
    """
    T, D = cos.shape[-2], cos.shape[-1]
    M = q.shape[0]
    use_kernel = backend == "triton" or (backend is None and q.is_cuda)
    tensors = (q, k, v, cos, sin) + (tuple(cache[:2]) if cache is not None else ())
    if (not use_kernel or not _tables_fit(cos, M) or q.dim() != 2 or q.shape[1] % D or k.shape[1] % D
            or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1
            or any(t.stride(-1) != 1 for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        return rope_qkv_reference(q, k, v, cos, sin, cache)
    H, K = q.shape[1] // D, k.shape[1] // D
    cos, sin, table_strides = _tables(cos, sin)  # (B|1, T, D)
    q_out = torch.empty((M, H * D), dtype=q.dtype, device=q.device)
    k_out = None if cache is not None else torch.empty((M, K * D), dtype=k.dtype, device=k.device)
    ko = k_out if k_out is not None else q_out  # without a cache the kernel writes k_out, else never
    ck, cv, pos = (cache[0], cache[1], cache[2].contiguous()) if cache is not None else (q_out, q_out, q_out)
    c_strides = (*ck.stride()[:3], *cv.stride()[:3]) if cache is not None else (0,) * 6
    _rope_qkv_kernel[(M, H + K)](
        q, k, v, cos, sin, q_out, ko, ck, cv, pos, T, q.stride(0), k.stride(0), v.stride(0),
        q_out.stride(0), ko.stride(0), *table_strides, *c_strides, H=H, D=D, WRITE_CACHE=cache is not None,
        BLOCK=triton.next_power_of_2(D // 2), num_warps=1, enable_fp_fusion=False)
    return q_out, k_out


# ----------------------------------------------------------------------------------------------
# The same from the fp32 sums of kernels.moe_tc.multi_gemv (q, k, v in one GEMV launch)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _rope_sums_kernel(sums_ptr, cos_ptr, sin_ptr, qo_ptr, ck_ptr, cv_ptr, pos_ptr, M, T, ROWS,
                      stride_qo, stride_cos_b, stride_cos_t, stride_sin_b, stride_sin_t,
                      stride_c_b, stride_c_h, stride_c_s, stride_cv_b, stride_cv_h, stride_cv_s,
                      H: tl.constexpr, K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row m = b * T + t, head): the head's columns of the sums (segment s = col // ROWS,
    laid out (segments, M, ROWS)) cast to the output dtype, then what _rope_qkv_kernel does with
    them (q rotated into qo; k rotated and v into the cache at the token's slot); the sums read are
    zeroed (a resident buffer the next launch adds into)."""
    m = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # 0..H-1: a q head; H..H+K-1: a k head (and its v)
    b, t = m // T, m % T
    cos_row = cos_ptr + b * stride_cos_b + t * stride_cos_t
    sin_row = sin_ptr + b * stride_sin_b + t * stride_sin_t
    d = tl.arange(0, BLOCK)
    ok = d < D // 2
    col = head * D  # q heads, then k heads, then v heads, side by side
    src = sums_ptr + ((col // ROWS) * M + m) * ROWS + col % ROWS
    dt = qo_ptr.dtype.element_ty
    x1 = tl.load(src + d, mask=ok, other=0.0).to(dt)
    x2 = tl.load(src + D // 2 + d, mask=ok, other=0.0).to(dt)
    if head < H:
        _rotate_values(x1, x2, qo_ptr + m * stride_qo + head * D, cos_row, sin_row, D // 2, BLOCK)
    else:
        kh = head - H
        slot = tl.load(pos_ptr + t).to(tl.int64)
        _rotate_values(x1, x2, ck_ptr + b * stride_c_b + kh * stride_c_h + slot * stride_c_s, cos_row, sin_row,
                       D // 2, BLOCK)
        vcol = (H + K + kh) * D
        vsrc = sums_ptr + ((vcol // ROWS) * M + m) * ROWS + vcol % ROWS
        dv = tl.arange(0, 2 * BLOCK)
        v = tl.load(vsrc + dv, mask=dv < D, other=0.0)
        tl.store(cv_ptr + b * stride_cv_b + kh * stride_cv_h + slot * stride_cv_s + dv,
                 v.to(cv_ptr.dtype.element_ty), mask=dv < D)
        tl.debug_barrier()  # loaded before the zeros (Triton may lay the stores out differently)
        tl.store(vsrc + dv, tl.zeros([2 * BLOCK], tl.float32), mask=dv < D)
    tl.debug_barrier()
    tl.store(src + d, tl.zeros([BLOCK], tl.float32), mask=ok)
    tl.store(src + D // 2 + d, tl.zeros([BLOCK], tl.float32), mask=ok)


def rope_from_sums(sums: torch.Tensor, rows: int, n_heads: int, n_kv: int, cos: torch.Tensor, sin: torch.Tensor,
                   cache: tuple, dtype: torch.dtype) -> torch.Tensor:
    """rope_qkv with a cache, where q, k and v are still the fp32 sums of kernels.moe_tc.multi_gemv:
    (segments, M, rows), the columns of [q | k | v] cut into segments of `rows`; one launch casts them
    to dtype, rotates q and k, writes k and v into the cache (cache_k, cache_v (B, K, S, D), input_pos
    (T,)) and zeroes the sums it read. -> q_rot (M, H*D) in dtype. The caller checks `sums_fit`."""
    T, D = cos.shape[-2], cos.shape[-1]
    M = sums.shape[1]
    cos, sin, table_strides = _tables(cos, sin)  # (B|1, T, D)
    ck, cv, pos = cache[0], cache[1], cache[2].contiguous()
    q_out = torch.empty((M, n_heads * D), dtype=dtype, device=sums.device)
    _rope_sums_kernel[(M, n_heads + n_kv)](
        sums, cos, sin, q_out, ck, cv, pos, M, T, rows, q_out.stride(0), *table_strides,
        *ck.stride()[:3], *cv.stride()[:3], H=n_heads, K=n_kv, D=D,
        BLOCK=triton.next_power_of_2(D // 2), num_warps=1, enable_fp_fusion=False)
    return q_out


def sums_fit(rows: int, n_heads: int, n_kv: int, cos: torch.Tensor, sin: torch.Tensor, cache: tuple,
             dtype: torch.dtype, M: int) -> bool:
    """Whether rope_from_sums takes these: whole heads per segment, the cos/sin and cache layouts
    rope_qkv takes, all in dtype (so it rounds where rope_qkv rounds)."""
    D = cos.shape[-1]
    ck, cv = cache[0], cache[1]
    return (_tables_fit(cos, M) and rows % D == 0
            and cos.dtype == sin.dtype == ck.dtype == cv.dtype == dtype and ck.shape[1] == n_kv
            and ck.shape[-1] == D and all(t.stride(-1) == 1 for t in (cos, sin, ck, cv)))
