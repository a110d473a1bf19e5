"""Decode attention over the static KV cache (kernels/attention.py) against PyTorch SDPA with the
model's boolean mask (causal by slot, sliding window, padding, and "a query that sees nothing sees
everything").

Interpreter on CPU (fp32, fp16; the interpreter's bf16 tl.dot is broken); GPU runs add bf16. GQA
groups of 1 to 8, head dims 12/16/20, cache lengths that are not a multiple of the 64-key block,
several new tokens at slots that do not start at 0.
"""
import pytest
import torch

import kernels.attention as A
from kernels.attention import MAX_ROWS, decode_attention, decode_attention_reference, fits

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(B, T, H, K, D, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(DEV, dtype)  # (B, T, H, D)
    k = torch.randn(B, K, S, D, generator=g).to(DEV, dtype)  # (B, K, S, D)
    v = torch.randn(B, K, S, D, generator=g).to(DEV, dtype)
    return q, k, v


def _padding_mask(B, S):
    """(B, S): row 0 full, row 1 left padded by 5 slots, row 2 by 12 (more than some queries see)."""
    m = torch.ones(B, S, dtype=torch.long, device=DEV)
    m[1, :5] = 0
    m[2 % B, :12] = 0
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,K,D", [(4, 2, 12), (6, 2, 20), (4, 4, 16), (8, 1, 16)])
@pytest.mark.parametrize("T,S", [(1, 37), (3, 70)])
@pytest.mark.parametrize("window", [None, 5])
def test_matches_sdpa_with_the_mask(dtype, H, K, D, T, S, window):
    B = 3
    q, k, v = _inputs(B, T, H, K, D, S, dtype)
    slots = torch.arange(10, 10 + T, device=DEV)  # rows 2's first query (slot 10) sees no real key
    mask = _padding_mask(B, S)
    got = decode_attention(q, k, v, slots, mask, window, backend="triton")
    want = decode_attention_reference(q, k, v, slots, mask, window)
    assert got.shape == (B, T, H, D) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("mask_kind", ["none", "bool", "shared"])
def test_mask_forms(mask_kind):
    B, T, H, K, D, S = 2, 2, 4, 2, 16, 40
    q, k, v = _inputs(B, T, H, K, D, S, torch.float32, seed=1)
    slots = torch.tensor([30, 31], device=DEV)
    mask = {"none": None, "bool": _padding_mask(B, S).bool(),
            "shared": _padding_mask(B, S)[1:2]}[mask_kind]  # (1, S): broadcast over rows
    got = decode_attention(q, k, v, slots, mask, backend="triton")
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, slots, mask), rtol=2e-5, atol=2e-5)


def test_pad_queries_see_every_key():
    """Queries whose slot and everything before it are padding: the reference lets them see all
    keys (instead of NaN); the kernel's second pass does the same, and the other rows are untouched."""
    B, T, H, K, D, S = 2, 3, 4, 2, 16, 80
    q, k, v = _inputs(B, T, H, K, D, S, torch.float32, seed=2)
    mask = torch.ones(B, S, dtype=torch.long, device=DEV)
    mask[1, :70] = 0  # row 1: slots 0..69 are padding, so its queries at 66, 67 see nothing
    slots = torch.tensor([66, 67, 75], device=DEV)
    got = decode_attention(q, k, v, slots, mask, backend="triton")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, slots, mask), rtol=2e-5, atol=2e-5)


def test_fp32_cache_under_fp16_queries_and_many_rows():
    """The cache is read and cast to q's dtype; T * G = 40 rows pad to one 64-row tile."""
    B, T, H, K, D, S = 2, 5, 8, 1, 16, 50
    q, k, v = _inputs(B, T, H, K, D, S, torch.float16, seed=3)
    k, v = k.float(), v.float()
    slots = torch.arange(40, 45, device=DEV)
    mask = _padding_mask(B, S)
    got = decode_attention(q, k, v, slots, mask, backend="triton")
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, slots, mask), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("unroll", [1, 2, 4])
@pytest.mark.parametrize("target", [1, 12, 18, 10_000])
def test_cache_slices_merge_to_the_same_result(monkeypatch, target, unroll):
    """However the cache is sliced (1 slice of 4 blocks; 2 of 2; 2 of 2 with one block in the last
    one... ; 4 of 1) and however many slices the merge takes per step (a partial last step too), it
    gives the same attention, the pad-query rule included."""
    monkeypatch.setattr(A, "TARGET_PROGRAMS", target)
    monkeypatch.setattr(A, "UNROLL", unroll)
    B, T, H, K, D, S = 3, 2, 4, 2, 16, 200  # 4 key blocks of 64, the last one partial
    q, k, v = _inputs(B, T, H, K, D, S, torch.float32, seed=4)
    slots = torch.tensor([150, 151], device=DEV)
    mask = torch.ones(B, S, dtype=torch.long, device=DEV)
    mask[1, :100] = 0
    mask[2, :160] = 0  # row 2: its queries see nothing
    got = decode_attention(q, k, v, slots, mask, window=90, backend="triton")
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, slots, mask, 90), rtol=2e-5, atol=2e-5)


def test_splits():
    assert A.splits(430, 64, 24) == (7, 1)  # Mixtral decode, 3 samples: 7 blocks -> 168 programs
    assert A.splits(430, 64, 256) == (1, 7)  # enough (b, kv head) pairs: no split
    assert A.splits(200, 64, 100) == (2, 2)
    assert A.splits(37, 64, 1) == (1, 1)


def test_fits():
    assert fits(1, 32, 8) and fits(16, 32, 8) and not fits(17, 32, 8)
    assert fits(MAX_ROWS, 4, 4) and not fits(MAX_ROWS + 1, 4, 4)
