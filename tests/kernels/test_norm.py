"""Fused residual add + RMSNorm (kernels/norm.py) against its PyTorch reference and the model's RMSNorm.

Without a GPU the kernel runs through the Triton interpreter (tests/conftest.py) in fp32 and fp16;
GPU runs add bf16. Odd hidden sizes (48, 80: not powers of two), one row and several.
"""
import pytest
import torch

from kernels.norm import add_rms_norm, add_rms_norm_reference
from models.transformer import RMSNorm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
# The sum is exact (the same rounded add). The norm may differ from PyTorch's only through the
# reduction order of the mean and the rsqrt's rounding: a few fp32 ulps, then at most one ulp of
# the output dtype where that moves a rounding boundary.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _inputs(M, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, C, generator=g) * 3).to(DEV, dtype)
    r = torch.randn(M, C, generator=g).to(DEV, dtype)
    w = (torch.rand(C, generator=g) + 0.5).to(DEV, dtype)
    return x, r, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [48, 80, 4096])
@pytest.mark.parametrize("M", [1, 3, 7])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rms_norm_matches_reference(dtype, C, M, residual):
    x, r, w = _inputs(M, C, dtype)
    r = r if residual else None
    y, s = add_rms_norm(x, r, w, 1e-5, backend="triton")
    y_ref, s_ref = add_rms_norm_reference(x, r, w, 1e-5)
    assert y.dtype == y_ref.dtype == dtype and s.dtype == dtype
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_the_model_rmsnorm(dtype):
    """The reference is models.transformer.RMSNorm applied to x + residual (Llama/HF numerics)."""
    x, r, w = _inputs(5, 80, dtype, seed=1)
    norm = RMSNorm(80, 1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(w.float())
    norm = norm.to(dtype)
    with torch.no_grad():
        y, s = norm.add_forward(x, r)
        torch.testing.assert_close(y, norm(x + r), rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(s, x + r)


def test_fp32_weight_promotes_like_the_reference():
    """A norm weight kept in fp32 beside fp16 activations: fp32 output, as `weight * x.to(dtype)`."""
    x, r, _ = _inputs(3, 48, torch.float16)
    w = torch.rand(48, generator=torch.Generator().manual_seed(3)).to(DEV) + 0.5
    y, _ = add_rms_norm(x, r, w, 1e-6, backend="triton")
    y_ref, _ = add_rms_norm_reference(x, r, w, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=2e-6)


def test_strided_rows_and_cpu_default():
    x, r, w = _inputs(6, 80, torch.float32)
    xs = x[::2]  # rows 2 apart: a row stride of 160
    y, s = add_rms_norm(xs, r[:3], w, 1e-5, backend="triton")
    y_ref, s_ref = add_rms_norm_reference(xs, r[:3], w, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=2e-6)
    assert torch.equal(s, s_ref)
    if DEV == "cpu":  # backend None on CPU is the reference itself
        y2, _ = add_rms_norm(xs, r[:3], w, 1e-5)
        assert torch.equal(y2, y_ref)


def test_needs_grad_falls_back_to_autograd():
    x, r, w = _inputs(3, 48, torch.float32)
    w.requires_grad_(True)
    y, _ = add_rms_norm(x, r, w, 1e-5, backend="triton")
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
