"""NF4: byte parity with bitsandbytes, and every Triton kernel against its PyTorch reference.

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), on small odd
shapes, in fp32 and fp16 (the interpreter's bf16 tl.dot is broken; GPU runs cover bf16).
"""
import os

import pytest
import torch

from kernels import nf4 as K

import bitsandbytes.functional as bnb_F  # a dev dependency (setup.py extras "dev"): missing must fail, not skip

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, cols): 256 blocks exactly / 144 blocks (one partial nested block) / 1285 blocks (5 full
# nested blocks + a partial one) / odd element count with a partial 64-block / one partial block.
SHAPES = [(128, 128), (48, 192), (257, 320), (33, 65), (3, 7)]


def _weight(shape, dtype, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    w.view(-1)[: min(70, w.numel() - 1)] = 0.0  # a zero 64-block (and the start of the next)
    return w.to(dtype)


def _bnb(w):
    packed, state = bnb_F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    return packed, state


def _assert_same_bytes(q, packed, state):
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.absmax2, state.state2.absmax)
    assert torch.equal(q.offset, state.offset)
    assert torch.equal(q.code2, state.state2.code)
    assert torch.equal(q.qmap, state.code)
    assert q.shape == state.shape and q.dtype == state.dtype


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


# ---------------------------------------------------------------------------------------------
# Tables and quantization: byte parity with bitsandbytes (CPU)
# ---------------------------------------------------------------------------------------------


def test_code_tables_equal_bnb():
    assert torch.equal(K.nf4_code(), bnb_F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(K.dynamic_map(), bnb_F.create_dynamic_map(signed=True))
    assert K.nf4_code()[7] == 0.0  # masked loads in the kernels rely on code 7 being zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_byte_parity(shape, dtype):
    w = _weight(shape, dtype)
    _assert_same_bytes(K.quantize_nf4(w), *_bnb(w))


@pytest.mark.parametrize("scale", [1e-4, 3.0, 500.0])
def test_quantize_byte_parity_scales(scale):
    w = _weight((96, 160), torch.float32, seed=1, scale=scale)
    _assert_same_bytes(K.quantize_nf4(w), *_bnb(w))


def test_quantize_chunked_equals_whole(monkeypatch):
    """Chunk boundaries (every 128 elements here) change nothing, tail block included."""
    w = _weight((257, 320), torch.bfloat16, seed=2)
    whole = K.quantize_nf4(w)
    monkeypatch.setattr(K, "_CHUNK", 128)
    chunked = K.quantize_nf4(w)
    for a, b in zip(whole.tensors(), chunked.tensors()):
        assert torch.equal(a, b)
    _assert_same_bytes(chunked, *_bnb(w))


def test_quantize_ties_go_to_lower_code():
    """A value exactly halfway between two NF4 codes takes the lower code, as in bnb."""
    code = K.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    w = torch.zeros(64)
    w[0] = 1.0  # absmax 1: scaled values are exact
    w[1 : 1 + mids.numel()] = mids
    q = K.quantize_nf4(w)
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], 1).view(-1)
    assert codes[1 : 1 + mids.numel()].tolist() == list(range(15))
    _assert_same_bytes(q, *_bnb(w))


def test_quantize_rejects_integer_input():
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        K.quantize_nf4(torch.ones(4, 64, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 128), (257, 320), (48, 192)])
def test_dequantize_reference_equals_bnb(shape, dtype):
    w = _weight(shape, dtype, seed=3)
    packed, state = _bnb(w)
    q = K.quantize_nf4(w)
    for out_dtype in DTYPES:
        state.dtype = out_dtype  # bnb dequantizes to quant_state.dtype
        assert torch.equal(K.dequantize_nf4_reference(q, out_dtype), bnb_F.dequantize_4bit(packed, state))


def test_dequantize_reference_equals_bnb_odd_shape():
    w = _weight((33, 65), torch.float16, seed=4)
    assert torch.equal(K.dequantize_nf4_reference(K.quantize_nf4(w)), bnb_F.dequantize_4bit(*_bnb(w)))


# ---------------------------------------------------------------------------------------------
# Kernel 1: dequantize
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 192), (80, 320), (33, 65), (7, 50), (300, 256)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_kernel_matches_reference(shape, dtype):
    q = K.quantize_nf4(_weight(shape, torch.float32, seed=5, scale=0.05)).to(DEV)
    out = K.dequantize_nf4_triton(q, dtype, blocks=4)
    if dtype == torch.bfloat16 and INTERPRETED:
        # The interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even), so compare
        # with the fp32 reference truncated to bf16: every other step must still be exact.
        bits = K.dequantize_nf4_reference(q, torch.float32).view(torch.int32) & -65536
        expected = bits.view(torch.float32).to(torch.bfloat16)
    else:
        expected = K.dequantize_nf4_reference(q, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# Kernels 2 and 3: fused GEMM, its dX, the skinny decode GEMM
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
KERNEL_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
SMALL_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2)


def _problem(M, N, Kd, dtype, seed=6):
    g = torch.Generator().manual_seed(seed)
    q = K.quantize_nf4(torch.randn(N, Kd, generator=g) * 0.05).to(DEV)
    x = torch.randn(M, Kd, generator=g).to(DEV, dtype)
    return x, q, K.dequantize_nf4_reference(q, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("w_as_a", [True, False])
@pytest.mark.parametrize("M,N,Kd", [(16, 48, 64), (33, 80, 192), (17, 48, 320), (20, 80, 50)])
def test_gemm_matches_reference(M, N, Kd, dtype, w_as_a):
    x, q, w = _problem(M, N, Kd, dtype)
    y = K.nf4_gemm(x, q, dict(SMALL_GEMM, W_AS_A=w_as_a))
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel_err(y, x.float() @ w.float().T) < TOL[dtype]


@pytest.mark.parametrize("block_k", [16, 32, 128])
def test_gemm_block_k_below_and_above_the_quant_block(block_k):
    x, q, w = _problem(33, 48, 320, torch.float16)
    y = K.nf4_gemm(x, q, dict(SMALL_GEMM, BLOCK_K=block_k, W_AS_A=True))
    assert _rel_err(y, x.float() @ w.float().T) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("w_as_a", [True, False])
@pytest.mark.parametrize("M,N,Kd", [(3, 48, 64), (33, 80, 192), (16, 48, 320), (20, 48, 50)])
def test_gemm_dx_matches_reference(M, N, Kd, dtype, w_as_a):
    _, q, w = _problem(M, N, Kd, dtype)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(DEV, dtype)
    dx = K.nf4_gemm_dx(dy, q, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, GROUP_M=2, W_AS_A=w_as_a,
                                   num_warps=4, num_stages=2))
    assert dx.dtype == dtype and dx.shape == (M, Kd)
    assert _rel_err(dx, dy.float() @ w.float()) < TOL[dtype]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M,N,Kd", [(1, 48, 64), (3, 80, 320), (16, 48, 192), (2, 80, 50)])
def test_gemv_matches_reference(M, N, Kd, dtype, split_k):
    x, q, w = _problem(M, N, Kd, dtype)
    y = K.nf4_gemv(x, q, dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=split_k, num_warps=4, num_stages=2))
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel_err(y, x.float() @ w.float().T) < TOL[dtype]


def test_codes_at_an_odd_offset_are_copied_aligned_for_the_kernels():
    """The kernels read the codes as int32 words: a view that starts off a 4-byte boundary is copied
    (with a warning) instead of being read misaligned."""
    x, q, w = _problem(3, 80, 320, torch.float32)
    raw = torch.empty(q.packed.numel() + 1, dtype=torch.uint8, device=q.packed.device)
    odd = K.NF4Tensor(raw[1:].copy_(q.packed), *q.fields()[1:], shape=q.shape, dtype=q.dtype)
    assert odd.packed.data_ptr() % 4
    with pytest.warns(UserWarning, match="not 4-byte aligned"):
        packed = odd.tensors()[0]
    assert packed.data_ptr() % 4 == 0 and torch.equal(packed, q.packed)
    with pytest.warns(UserWarning, match="not 4-byte aligned"):
        y = K.nf4_gemv(x, odd, dict(BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=2))
    assert _rel_err(y, x.float() @ w.float().T) < TOL[torch.float32]


@pytest.mark.parametrize("block_k", [128, 256])  # several quant blocks per step; K=192 ends mid-step
def test_gemv_mma_multi_block_steps(block_k):
    x, q, w = _problem(5, 80, 192, torch.float16)
    y = K.nf4_gemv(x, q, dict(KERNEL="mma", BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=1, num_warps=4, num_stages=2))
    assert _rel_err(y, x.float() @ w.float().T) < TOL[torch.float16]


FMA = dict(KERNEL="fma", num_stages=1)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("x_ahead", [False, True])
def test_gemv_fma_every_token_count(M, dtype, x_ahead):
    """One accumulator per token; N = 40 ends mid row tile, K = 192 ends mid step; activations
    loaded in their step or one step ahead (X_AHEAD, which reads past K: masked to zeros)."""
    x, q, w = _problem(M, 40, 192, dtype)
    y = K.nf4_gemv(x, q, dict(FMA, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, num_warps=4, X_AHEAD=x_ahead))
    assert y.dtype == dtype and y.shape == (M, 40)
    assert _rel_err(y, x.float() @ w.float().T) < TOL[dtype]


@pytest.mark.parametrize("word_vec,block_k,warps", [(4, 64, 4), (2, 128, 2), (1, 256, 1)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv_fma_word_layouts_and_split_k(word_vec, block_k, warps, split_k):
    """4-, 8- and 16-byte word loads (WORD_VEC) and split-K (fp32 atomics); K = 320 = 5 groups, so
    the 128- and 256-wide steps end past K and the hand-made prefetch runs off the slice."""
    x, q, w = _problem(2, 48, 320, torch.float16)
    y = K.nf4_gemv(x, q, dict(FMA, BLOCK_N=16, BLOCK_K=block_k, WORD_VEC=word_vec, SPLIT_K=split_k,
                              num_warps=warps, X_AHEAD=split_k == 2))
    assert _rel_err(y, x.float() @ w.float().T) < TOL[torch.float16]


def test_gemv_fma_auto_block_n_and_rejects_bad_shapes():
    x, q, w = _problem(1, 80, 192, torch.float32)
    assert _rel_err(K.nf4_gemv(x, q, dict(FMA)), x @ w.T) < TOL[torch.float32]  # BLOCK_N and split chosen
    with pytest.raises(ValueError, match="fma kernel needs"):
        K.nf4_gemv(torch.zeros(5, 192, device=DEV), q, dict(FMA))  # 5 tokens
    _, q50, _ = _problem(1, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="fma kernel needs"):
        K.nf4_gemv(torch.zeros(1, 50, device=DEV), q50, dict(FMA))  # K % 64 != 0


@pytest.mark.parametrize("M,Kd", [(17, 192), (40, 128), (64, 50)])  # BLOCK_M 32 / 64, aligned and any K
def test_gemv_mma_up_to_64_rows(M, Kd):
    x, q, w = _problem(M, 48, Kd, torch.float16)
    y = K.nf4_gemv(x, q, dict(KERNEL="mma", BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=1))
    assert y.shape == (M, 48)
    assert _rel_err(y, x.float() @ w.float().T) < TOL[torch.float16]


def test_pair_table_first_line_holds_the_16_values():
    """Byte b -> (NF4[b >> 4], NF4[b & 15]) as the exact fp32 bits of an int64 entry (the first value
    in the low half); entries 0..15 therefore hold NF4[c] in their high halves, which nf4_nibble reads."""
    halves = K.nf4_pairs("cpu").view(torch.float32).view(256, 2)
    b = torch.arange(256)
    assert torch.equal(halves[:, 0], K.nf4_code()[b >> 4])
    assert torch.equal(halves[:, 1], K.nf4_code()[b & 15])
    assert torch.equal(halves[:16, 1], K.nf4_code())


def test_gemv_default_config_and_row_limit():
    x, q, w = _problem(4, 80, 192, torch.float16)
    assert _rel_err(K.nf4_gemv(x, q), x.float() @ w.float().T) < TOL[torch.float16]
    with pytest.raises(ValueError, match=f"at most {K.GEMV_MAX_ROWS} rows"):
        K.nf4_gemv(torch.zeros(K.GEMV_MAX_ROWS + 1, 192, dtype=torch.float16, device=DEV), q)


# ---------------------------------------------------------------------------------------------
# nf4_matmul: dispatch and autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [3, 33])  # the decode kernels (dX: the fused dX kernel)
def test_nf4_matmul_triton_autograd(rows):
    _, q, w = _problem(1, 48, 192, torch.float32)
    x = torch.randn(1, rows, 192, device=DEV, requires_grad=True)
    y = K.nf4_matmul(x, q, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w.T
    y_ref.backward(dy)
    assert y.shape == (1, rows, 48)
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(x.grad, x_ref.grad) < 1e-5


@pytest.mark.parametrize("rows,path", [(1, "gemv"), (64, "gemv"), (65, "dense"), (200, "dense")])
def test_nf4_matmul_policy(monkeypatch, rows, path):
    """<= GEMV_ROWS rows: the decode kernels (dX: the fused dX kernel); from DENSE_MIN_ROWS:
    dequantize + dense matmul, forward and dX; in between (no rows by default, every row above
    GEMV_ROWS with DENSE_MIN_ROWS = None): the fused GEMM."""
    calls = []
    for name in ("nf4_gemv", "nf4_gemm", "nf4_gemm_dx", "dequantize_nf4_triton"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    _, q, w = _problem(1, 16, 64, torch.float32)
    x = torch.randn(rows, 64, device=DEV, requires_grad=True)
    y = K.nf4_matmul(x, q, backend="triton")
    y.sum().backward()
    assert calls == {"gemv": ["nf4_gemv", "nf4_gemm_dx"], "dense": ["dequantize_nf4_triton"] * 2}[path]
    assert _rel_err(y, x @ w.T) < 1e-5
    calls.clear()
    monkeypatch.setattr(K, "DENSE_MIN_ROWS", None)
    K.nf4_matmul(x.detach(), q, backend="triton")
    assert calls == (["nf4_gemv"] if rows <= K.GEMV_ROWS else ["nf4_gemm"])


def test_nf4_matmul_dense_switch(monkeypatch):
    """From DENSE_MIN_ROWS rows on, forward and dX dequantize (Triton) and call a dense matmul."""
    monkeypatch.setattr(K, "DENSE_MIN_ROWS", 20)
    _, q, w = _problem(1, 48, 128, torch.float32)
    x = torch.randn(33, 128, device=DEV, requires_grad=True)
    y = K.nf4_matmul(x, q, backend="triton")
    y.backward(torch.ones_like(y))
    assert torch.allclose(y, x @ w.T, atol=1e-5)
    assert torch.allclose(x.grad, torch.ones(33, 48, device=DEV) @ w, atol=1e-5)


def test_nf4_matmul_reference_path_equals_dense():
    """On CPU the default path is dequantize-then-matmul: the same numbers as the dense weight."""
    q = K.quantize_nf4(torch.randn(48, 128) * 0.05)
    w = K.dequantize_nf4_reference(q, torch.float32)
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = K.nf4_matmul(x, q)
    y.sum().backward()
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    assert torch.allclose(x.grad, torch.ones(2, 5, 48) @ w)


def test_nf4_matmul_rejects_wrong_width():
    q = K.quantize_nf4(torch.randn(48, 128))
    with pytest.raises(ValueError, match="expects 128"):
        K.nf4_matmul(torch.randn(3, 64), q)
