"""NF4: byte parity with bitsandbytes, and every Triton kernel against its PyTorch reference.

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), on small odd
shapes, in fp32 and fp16 (the interpreter's bf16 tl.dot is broken; GPU runs cover bf16).
"""
import os

import pytest
import torch

from kernels import nf4 as K

bnb_F = pytest.importorskip("bitsandbytes.functional")  # a dev dependency (setup.py extras "dev")

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


@pytest.mark.parametrize("block_k", [32, 128])
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


@pytest.mark.parametrize("block_k", [128, 256])  # several quant blocks per step; K=192 ends mid-step
def test_gemv_pair_table_path_multi_block_steps(block_k):
    x, q, w = _problem(5, 80, 192, torch.float16)
    y = K.nf4_gemv(x, q, dict(BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=1, num_warps=4, num_stages=2))
    assert _rel_err(y, x.float() @ w.float().T) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_tables_hold_both_nibbles(dtype):
    """Byte b -> (NF4[b >> 4], NF4[b & 15]), the first value in the low half of the entry:
    int64 with exact fp32 values (every kernel's table), int32 with 16-bit values (decode)."""
    pairs = K.nf4_pairs("cpu") if dtype == torch.float32 else K._pair_table("cpu", dtype)
    halves = pairs.view(torch.int32 if dtype == torch.float32 else torch.int16).view(256, 2).view(dtype)
    b = torch.arange(256)
    assert torch.equal(halves[:, 0], K.nf4_code()[b >> 4].to(dtype))
    assert torch.equal(halves[:, 1], K.nf4_code()[b & 15].to(dtype))


def test_gemv_default_config_and_row_limit():
    x, q, w = _problem(4, 80, 192, torch.float16)
    assert _rel_err(K.nf4_gemv(x, q), x.float() @ w.float().T) < TOL[torch.float16]
    with pytest.raises(ValueError, match="at most 16 rows"):
        K.nf4_gemv(torch.zeros(17, 192, dtype=torch.float16, device=DEV), q)


# ---------------------------------------------------------------------------------------------
# nf4_matmul: dispatch and autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [3, 33])  # the skinny kernel, then the fused GEMM
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
