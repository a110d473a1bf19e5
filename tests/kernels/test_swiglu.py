"""The fused SwiGLU activation against PyTorch's eager silu(g) * u, forward and backward."""
import pytest
import torch

from kernels.swiglu import BLOCK, swiglu, swiglu_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp16/fp32 through the interpreter; bf16 on the GPU too
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _grads(fn, g, u, dh):
    g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = fn(g, u)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 33), (3, BLOCK + 5), (1,), (2, 0)])
def test_swiglu_matches_eager_forward_and_backward(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    g, u, dh = (torch.randn(shape, generator=gen).mul(3).to(DEV, dtype) for _ in range(3))
    got = _grads(lambda a, b: swiglu(a, b, backend="triton"), g, u, dh)
    want = _grads(swiglu_reference, g, u, dh)
    for name, a, b in zip(("h", "dg", "du"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if a.numel() == 0:
            continue
        # the same roundings as the eager ops; sigmoid's fp32 value may differ by an ulp before
        # rounding, which moves a 16-bit result by at most one unit in the last place
        ulp = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
        tol = ulp * b.float().abs().clamp(min=1.0)
        assert ((a.float() - b.float()).abs() <= tol).all(), f"{name}: {(a.float() - b.float()).abs().max()}"
        if dtype != torch.float32:  # nearly always bit-equal
            assert (a == b).float().mean() > 0.99, name


def test_swiglu_cpu_default_is_the_reference_and_inputs_are_checked():
    g, u = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(swiglu(g, u), swiglu_reference(g, u))
    with pytest.raises(ValueError, match="must match"):
        swiglu(g, u[:, :4])
    with pytest.raises(ValueError, match="must match"):
        swiglu(g, u.double())
    with pytest.raises(ValueError, match="backend must be"):
        swiglu(g, u, backend="cuda")
