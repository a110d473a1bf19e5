"""The grouped-GEMM MoE path (kernels/moe_grouped.py) against the expert loop and the references."""
import pytest
import torch

from kernels import moe_grouped as G
from kernels.moe import NF4Experts
from kernels.nf4 import quantize_nf4
from models.moe import SparseMoE
from models.nf4 import replace_linears_with_nf4

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E = 4


def _experts(C, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = lambda n, k: quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(DEV))  # noqa: E731
    return NF4Experts.build([q(I, C) for _ in range(E)], [q(I, C) for _ in range(E)], [q(C, I) for _ in range(E)])


# (C, I): blocks of the launch whole (EVEN) or not; I not a multiple of 64 (the last quant block of a
# weight straddles rows, as in bitsandbytes' flat layout)
@pytest.mark.parametrize("C,I", [(64, 128), (96, 80), (128, 4160)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_dequantize_experts_is_bit_equal_to_each_dequant(C, I, dtype):
    w = _experts(C, I)
    for which, shape in (("w1", (I, C)), ("w3", (I, C)), ("w2", (C, I))):
        got = G.dequantize_experts(w, which, dtype, backend="triton")
        want = G.dequantize_experts_reference(w, which, dtype)
        assert got.shape == (E, *shape) and got.dtype == dtype
        assert torch.equal(got, want), which
        # each expert's slice is that expert's own weight (the table picks the right tensors)
        assert torch.equal(want[2], getattr(w, which)[2].dequantize(dtype))


def test_dequantize_experts_rejects_unknown_projection():
    w = _experts(64, 64)
    with pytest.raises(ValueError, match="projection must be one of"):
        G.dequantize_experts(w, "w4", torch.float32)
    with pytest.raises(ValueError, match="backend must be"):
        G.dequantize_experts(w, "w1", torch.float32, backend="cuda")


def _sorted_rows(counts, C, seed=0):
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(int(offs[-1]), C, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return x, offs


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [1, 1, 1, 1]])
def test_grouped_matmul_forward_and_backward_match_per_expert_matmuls(counts):
    C, I = 64, 96
    w = _experts(C, I)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    x, offs = _sorted_rows(counts, C)
    x, offs = x.to(DEV, dtype).requires_grad_(), offs.to(DEV)
    y = G.grouped_nf4_matmul(x, w, "w1", offs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    y.backward(dy)
    # reference: each expert's rows through its own dequantized weight, fp32
    dense = G.dequantize_experts_reference(w, "w1", torch.float32)  # (E, I, C)
    bounds = [0] + offs.tolist()
    want_y = torch.cat([x.detach().float()[a:b] @ dense[e].t() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    want_dx = torch.cat([dy.float()[a:b] @ dense[e] for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert y.shape == (sum(counts), I) and y.dtype == dtype
    assert (y.float() - want_y).abs().max() <= tol * want_y.abs().max()
    assert (x.grad.float() - want_dx).abs().max() <= tol * want_dx.abs().max()


def test_grouped_matmul_checks_its_inputs():
    w = _experts(64, 96)
    x, offs = _sorted_rows([1, 2, 3, 4], 64)
    with pytest.raises(ValueError, match=r"must be \(rows, 96\) for w2"):
        G.grouped_nf4_matmul(x.to(DEV), w, "w2", offs.to(DEV))
    with pytest.raises(ValueError, match="int32 cumulative counts"):
        G.grouped_nf4_matmul(x.to(DEV), w, "w1", offs.to(DEV, torch.int64))
    with pytest.raises(ValueError, match="int32 cumulative counts"):
        G.grouped_nf4_matmul(x.to(DEV), w, "w1", offs[:3].to(DEV))


def _moe(seed=0, C=64, I=96, dtype=torch.float32):
    torch.manual_seed(seed)
    m = SparseMoE(C, I, E, 2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    replace_linears_with_nf4(m)
    return m.to(DEV, dtype).train()


def _loop_and_grouped(m, x0, dy, params):
    """{backend: [y, dx, grads of params]} for the loop ("reference") and the grouped path."""
    outs = {}
    for backend in ("reference", "grouped"):
        m.backend = backend
        x = x0.clone().requires_grad_()
        y = m(x)
        y.backward(dy)
        outs[backend] = [y.detach(), x.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    return outs


def test_sparse_moe_grouped_path_matches_the_loop_with_gradients():
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    m = _moe(dtype=dtype)
    x0 = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)).to(DEV, dtype)
    dy = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    outs = _loop_and_grouped(m, x0, dy, [m.gate.weight])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in zip(outs["grouped"], outs["reference"]):
        assert got is not None and want is not None
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    assert m._nf4_cache is not None  # the grouped path built the experts' tables


def test_sparse_moe_takes_the_grouped_path_only_where_it_serves(monkeypatch):
    m = _moe()
    x = torch.randn(20, 64)
    assert not G.has_grouped_mm(torch.device("cpu"), torch.bfloat16)  # CPU: the loop by default
    assert m._grouped_experts(x) is None
    m.backend = "grouped"
    assert m._grouped_experts(x.to(DEV)) is not None
    assert not m.uses_decode_kernels(1, DEV)  # "grouped" never takes the decode kernels
    m.backend = "reference"
    assert m._grouped_experts(x.to(DEV)) is None
    dense = SparseMoE(64, 96, E, 2).to(DEV)  # experts not in NF4: the loop
    dense.backend = "grouped"
    assert dense._grouped_experts(x.to(DEV)) is None
    # where torch's grouped GEMM serves (stubbed here), the default path needs 16-byte rows
    import models.moe as MM

    monkeypatch.setattr(MM, "has_grouped_mm", lambda device, dtype: True)
    assert _moe(C=64, I=96)._grouped_experts(x) is not None
    assert _moe(C=64, I=100)._grouped_experts(x) is None  # I = 100: 200-byte bf16 rows


if torch.cuda.is_available():  # a GPU-only property: CUDA ops that sync raise in "error" mode

    def test_grouped_path_does_not_sync_the_host():
        w = _experts(64, 96)
        x = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ids = torch.stack([torch.randperm(E, device="cuda")[:2] for _ in range(40)])
        weights = torch.softmax(torch.randn(40, 2, device="cuda"), dim=-1).to(torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = G.moe_experts_grouped(x, weights, ids, w)
            y.backward(torch.ones_like(y))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()


LORA_DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32  # torch's grouped GEMM: bf16 on CUDA
LORA_TOL = 3e-2 if DEV == "cuda" else 1e-5  # bf16: the loop's few-row LoRA runs PEFT's fp32 adapter


def _lora_moe(targets, dropout=0.0, seed=0):
    from models.lora import inject_lora

    m = _moe(seed=seed, dtype=LORA_DTYPE)
    inject_lora(m, r=4, alpha=8, dropout=dropout, targets=targets)
    with torch.no_grad():  # B starts at zero (PEFT's init); make the adapters count
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("targets", [("w1", "w3", "w2"), ("w1",)])
def test_grouped_path_with_lora_on_the_experts_matches_the_loop(targets):
    m = _lora_moe(targets)
    x0 = torch.randn(11, 64, generator=torch.Generator().manual_seed(3)).to(DEV, LORA_DTYPE)
    dy = torch.randn(11, 64, generator=torch.Generator().manual_seed(4)).to(DEV, LORA_DTYPE)
    lora = [p for n, p in m.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * E * len(targets)
    outs = _loop_and_grouped(m, x0, dy, lora)
    assert m._grouped_experts(x0)[1].keys() == set(targets)  # the grouped path took the adapters
    for got, want in zip(outs["grouped"], outs["reference"]):
        assert (got.float() - want.float()).abs().max() <= LORA_TOL * want.float().abs().max().clamp(min=1e-3)


def test_grouped_path_lora_dropout_and_ungroupable_adapters():
    m = _lora_moe(("w1", "w3"), dropout=0.3)
    m.backend = "grouped"
    x = torch.randn(9, 64, device=DEV, dtype=LORA_DTYPE, requires_grad=True)
    m(x).float().sum().backward()
    grads = [p.grad for n, p in m.named_parameters() if "lora_A" in n]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert m._grouped_experts(x)[1]["w1"].dropout == 0.3
    m.eval()  # no dropout in eval: the loop's output
    with torch.no_grad():
        got = m(x)
        m.backend = "reference"
        want = m(x)
    assert (got.float() - want.float()).abs().max() <= LORA_TOL * want.float().abs().max()
    # an adapter on one expert's w1 only cannot be grouped: the loop serves it
    from models.lora import inject_lora

    single = _moe(dtype=LORA_DTYPE)
    inject_lora(single, r=4, alpha=8, targets=("experts.0.w1",))
    single.backend = "grouped"
    assert single._grouped_experts(x) is None


def test_adapted_experts_take_the_grouped_path_by_default(monkeypatch):
    import models.moe as MM

    monkeypatch.setattr(MM, "has_grouped_mm", lambda device, dtype: True)
    m = _lora_moe(("w1",))
    x = torch.randn(5, 64, device=DEV, dtype=LORA_DTYPE)
    assert set(m._grouped_experts(x)[1]) == {"w1"}  # the adapters ride along (measured on an H100)
    m.backend = "reference"
    assert m._grouped_experts(x) is None
