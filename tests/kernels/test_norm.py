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


def _slots(T, k, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sums = torch.randn(T * k, C, generator=g).to(DEV)  # fp32 (T * k, C)
    weights = torch.softmax(torch.randn(T, k, generator=g), -1).to(DEV, dtype)
    return sums, weights


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
@pytest.mark.parametrize("T,k,C", [(1, 2, 64), (3, 2, 1000), (2, 3, 4096)])
def test_slot_sums_residual_is_combined_in_the_launch_and_zeroed(dtype, T, k, C):
    """A kernels.norm.SlotSums residual gives the norm of x + its combine (fp32 weighted sum in slot
    order, rounded to the dtype), and leaves the sums at zero; a second use is refused."""
    from kernels.norm import SlotSums

    sums, weights = _slots(T, k, C, dtype)
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    w = (torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.5).to(DEV, dtype)
    combined = SlotSums(sums.clone(), weights, dtype).combine()  # the PyTorch combine, on a copy
    want_y, want_s = add_rms_norm(x, combined, w, 1e-5, backend="triton")
    slots = SlotSums(sums, weights, dtype)
    y, s = add_rms_norm(x, slots, w, 1e-5, backend="triton")
    # The same fp32 products and sums (no FMA on either side), so the same roundings: equal.
    assert torch.equal(s, want_s) and torch.equal(y, want_y)
    assert not sums.any()  # zeroed by the kernel
    with pytest.raises(RuntimeError, match="used twice"):
        slots.combine()


def test_slot_sums_fall_back_to_the_pytorch_combine():
    """Where the kernel does not run (backend="reference", or a dtype other than the sums'), the
    combine runs in PyTorch ops, with the same result and the sums zeroed all the same."""
    from kernels.norm import SlotSums

    sums, weights = _slots(2, 2, 96, torch.float16)
    x = torch.randn(2, 96, device=DEV, dtype=torch.float16)
    w = torch.ones(96, device=DEV, dtype=torch.float16)
    want = add_rms_norm(x, SlotSums(sums.clone(), weights, torch.float16), w, 1e-5, backend="triton")
    got = add_rms_norm(x, SlotSums(sums, weights, torch.float16), w, 1e-5, backend="reference")
    assert not sums.any()
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=1e-2, atol=1e-2)
