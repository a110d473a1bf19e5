"""Fused RoPE on q and k with the KV-cache write (kernels/rope.py) against its PyTorch reference.

Bit-identical: each product is rounded to the activation dtype and no FMA is formed, as in
PyTorch's separate kernels. Interpreter on CPU (fp32, fp16); GPU runs add bf16. GQA head counts,
head dims that are not powers of two (12, 20), positions that do not start at 0 and differ by row
(left padding), a cache of another dtype.
"""
import pytest
import torch

from kernels.rope import apply_rope_reference, rope_qkv, rope_qkv_reference
from models.transformer import apply_rope, rope_cos_sin

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SHAPES = [(4, 2, 12), (6, 2, 20), (4, 4, 16), (8, 1, 16)]  # (H, K, D)


def _inputs(B, T, H, K, D, dtype, seed=0, theta=1e4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B * T, H * D, generator=g).to(DEV, dtype)  # (M, H*D)
    k = torch.randn(B * T, K * D, generator=g).to(DEV, dtype)
    v = torch.randn(B * T, K * D, generator=g).to(DEV, dtype)
    pos = 17 + torch.arange(T)[None] + 3 * torch.arange(B)[:, None]  # (B, T), from 17, per row
    cos, sin = rope_cos_sin(pos.to(DEV), D, theta, dtype)  # (B, 1, T, D)
    return q, k, v, cos, sin


def test_reference_is_the_model_rope():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, 5) + 9, 16, 1e6, torch.float32)
    assert torch.equal(apply_rope_reference(x, cos, sin), apply_rope(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,K,D", SHAPES)
@pytest.mark.parametrize("T", [1, 3])
def test_rope_without_cache(dtype, H, K, D, T):
    B = 3
    q, k, v, cos, sin = _inputs(B, T, H, K, D, dtype)
    q_rot, k_rot = rope_qkv(q, k, v, cos, sin, backend="triton")
    q_ref, k_ref = rope_qkv_reference(q, k, v, cos, sin)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,K,D", SHAPES)
@pytest.mark.parametrize("T", [1, 4])
def test_rope_writes_the_cache(dtype, H, K, D, T):
    B, S = 3, 29
    q, k, v, cos, sin = _inputs(B, T, H, K, D, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    ck, cv = (torch.randn(B, K, S, D, generator=g).to(DEV, dtype) for _ in range(2))  # (B, K, S, D)
    ck_ref, cv_ref = ck.clone(), cv.clone()
    slots = torch.arange(20, 20 + T, device=DEV)  # (T,)
    q_rot, k_none = rope_qkv(q, k, v, cos, sin, (ck, cv, slots), backend="triton")
    q_ref, _ = rope_qkv_reference(q, k, v, cos, sin, (ck_ref, cv_ref, slots))
    assert k_none is None
    assert torch.equal(q_rot, q_ref)
    assert torch.equal(ck, ck_ref) and torch.equal(cv, cv_ref)  # written slots equal, others untouched


def test_cache_of_another_dtype_and_broadcast_tables():
    """An fp32 cache under fp16 activations (stored as k.to(cache dtype)); cos/sin shared by rows."""
    B, T, H, K, D, S = 2, 2, 4, 2, 12, 9
    q, k, v, _, _ = _inputs(B, T, H, K, D, torch.float16)
    cos, sin = rope_cos_sin(torch.tensor([[5, 6]], device=DEV), D, 1e6, torch.float16)  # (1, 1, T, D)
    ck, cv = torch.zeros(B, K, S, D, device=DEV), torch.zeros(B, K, S, D, device=DEV)
    ck_ref, cv_ref = ck.clone(), cv.clone()
    slots = torch.tensor([3, 4], device=DEV)
    q_rot, _ = rope_qkv(q, k, v, cos, sin, (ck, cv, slots), backend="triton")
    q_ref, _ = rope_qkv_reference(q, k, v, cos, sin, (ck_ref, cv_ref, slots))
    assert torch.equal(q_rot, q_ref) and torch.equal(ck, ck_ref) and torch.equal(cv, cv_ref)
    assert ck[:, :, 3:5].abs().sum() > 0


def test_inv_freq_is_kept_and_equals_the_formula():
    from models.transformer import rope_inv_freq

    a = rope_inv_freq(16, 1e6, "cpu")
    want = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    assert torch.equal(a, want) and rope_inv_freq(16, 1e6, "cpu") is a
    assert not torch.equal(rope_inv_freq(16, 1e4, "cpu"), a)  # keyed by theta too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,K,D,rows", [(3, 1, 4, 2, 16, 32), (2, 2, 8, 2, 12, 24), (1, 3, 4, 4, 16, 16)])
def test_rope_from_sums_equals_cast_then_rope(dtype, B, T, H, K, D, rows):
    """From multi_gemv's fp32 sums (segments of `rows` columns of [q | k | v]): the cast, rotation and
    cache write equal rope_qkv on the cast q, k, v, bit for bit; the sums end at zero."""
    from kernels.rope import rope_from_sums, sums_fit

    M, S = B * T, 9
    g = torch.Generator().manual_seed(B + T + D)
    y = torch.randn(M, (H + 2 * K) * D, generator=g).to(DEV)  # fp32 [q | k | v]
    R = y.shape[1] // rows
    sums = y.view(M, R, rows).permute(1, 0, 2).contiguous()  # (segments, M, rows)
    pos = 2 + torch.arange(T)[None] + torch.arange(B)[:, None]
    cos, sin = rope_cos_sin(pos.to(DEV), D, 1e4, dtype)
    slots = torch.arange(T, device=DEV) + 4
    ck, cv = torch.zeros(B, K, S, D, device=DEV, dtype=dtype), torch.zeros(B, K, S, D, device=DEV, dtype=dtype)
    ck_ref, cv_ref = ck.clone(), cv.clone()
    assert sums_fit(rows, H, K, cos, sin, (ck, cv, slots), dtype, M)
    q = rope_from_sums(sums, rows, H, K, cos, sin, (ck, cv, slots), dtype)
    yd = y.to(dtype)
    q_ref, _ = rope_qkv(yd[:, :H * D], yd[:, H * D:(H + K) * D], yd[:, (H + K) * D:], cos, sin,
                        (ck_ref, cv_ref, slots), backend="triton")
    assert torch.equal(q, q_ref) and torch.equal(ck, ck_ref) and torch.equal(cv, cv_ref)
    assert ck[:, :, 4:4 + T].abs().sum() > 0 and not sums.any()


def test_sums_fit_refuses_heads_across_segments_and_other_cache_dtypes():
    from kernels.rope import sums_fit

    cos, sin = rope_cos_sin(torch.tensor([[3]]), 16, 1e4, torch.float16)
    cache = (torch.zeros(1, 2, 8, 16, dtype=torch.float16), torch.zeros(1, 2, 8, 16, dtype=torch.float16),
             torch.tensor([3]))
    assert sums_fit(32, 4, 2, cos, sin, cache, torch.float16, 1)
    assert not sums_fit(24, 4, 2, cos, sin, cache, torch.float16, 1)  # a head would span two segments
    fp32_cache = (cache[0].float(), cache[1].float(), cache[2])
    assert not sums_fit(32, 4, 2, cos, sin, fp32_cache, torch.float16, 1)
