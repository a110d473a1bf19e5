"""LoRA paths (Triton through TRITON_INTERPRET=1 on CPU) against the reference and plain autograd.

Every case checks the output and dX, dA, dB three ways: a path (the fused Triton kernels,
backend="triton", or the GEMM path, backend="cublas", in each of its variants), `lora_reference`,
and a plain PyTorch LoRA in fp64 built here (same dropout mask), on odd shapes, fp16 and fp32 (and
bf16 on CUDA: the interpreter's bf16 tl.dot is broken), a dense and an NF4 base. 16-bit tolerances
are relative to the largest value (16-bit inputs, fp32 accumulation). Everything runs on DEV: CUDA
when there is one (compiled kernels; cuBLAS), else the CPU through the interpreter (torch.mm stands
in for cuBLAS); generators stay on the CPU.
"""
import pytest
import torch

from kernels.lora import (Base, GemmOptions, dropout_keep_reference, keep_threshold, lora_forward, lora_linear,
                          lora_qkv, lora_reference, new_dropout_keys)
from kernels.nf4 import dequantize_nf4_reference, quantize_nf4
from models.lora import LoRALinear
from models.nf4 import NF4Linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-12)).item()


def _make(nf4, dtype, M, K, Ns, r, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = []
    for n in Ns:
        w = (torch.randn(n, K, generator=g) * 0.05).to(DEV)
        b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
        bases.append(Base(quantize_nf4(w) if nf4 else w.to(dtype), b))
    As = [(torch.randn(r, K, generator=g) * 0.1).to(DEV).requires_grad_() for _ in Ns]
    Bs = [(torch.randn(n, r, generator=g) * 0.1).to(DEV).requires_grad_() for n in Ns]
    x = torch.randn(M, K, generator=g).to(DEV, dtype).requires_grad_()
    return x, bases, As, Bs


def _plain(x, base, a, b, scale, p, keys):
    """A plain PyTorch LoRA in fp64: x W^T + bias + scale * (dropout(x) A^T) B^T."""
    w = dequantize_nf4_reference(base.weight, torch.float64) if base.is_nf4 else base.weight.double()
    x64 = x.double()
    y = x64 @ w.T + (0 if base.bias is None else base.bias.double())
    xd = x64
    if p > 0:
        xd = torch.where(dropout_keep_reference(keys, *x.shape, p), x64 / (1 - p), 0.0)
    return y + scale * (xd @ a.double().T) @ b.double().T


def _grads(outputs, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    gys = [torch.randn(y.shape, generator=g).to(y.device, y.dtype) for y in outputs]
    return torch.autograd.grad(outputs, leaves, gys), gys


CASES = [  # (nf4, dtype, M, K, Ns, r, p, bias)
    (False, torch.float32, 37, 96, (80,), 8, 0.0, True),
    (False, torch.float16, 33, 128, (48,), 16, 0.1, False),
    (True, torch.float32, 37, 128, (80,), 8, 0.0, False),
    (True, torch.float32, 19, 96, (48,), 5, 0.25, False),  # K not a multiple of 64, odd rank
    (True, torch.float16, 65, 128, (80,), 16, 0.1, True),
    (True, torch.float16, 40, 192, (48, 16, 16), 8, 0.1, False),  # q, k, v in one launch
    (False, torch.float32, 21, 64, (64, 32, 32), 4, 0.0, True),
    (True, torch.float16, 33, 128, (64,), 16, 0.1, False),  # tiles divide W: unmasked weight loads
    (True, torch.float32, 50, 64, (128, 64, 64), 8, 0.0, False),
]
if DEV == "cuda":  # bf16 (GPU only): every fp16 case again in bf16
    CASES += [(nf4, torch.bfloat16, *rest) for nf4, dtype, *rest in CASES if dtype == torch.float16]


@pytest.mark.parametrize("nf4,dtype,M,K,Ns,r,p,bias", CASES)
def test_kernels_match_reference_and_plain_autograd(nf4, dtype, M, K, Ns, r, p, bias):
    x, bases, As, Bs = _make(nf4, dtype, M, K, Ns, r, bias)
    scales = [2.0, 0.5, 1.5][: len(Ns)]
    keys = new_dropout_keys(len(Ns), DEV)
    leaves = [x, *As, *Bs]
    got = lora_forward(x, bases, As, Bs, scales, p, keys, backend="triton")
    ref = lora_reference(x, bases, As, Bs, scales, p, keys)
    plain = [_plain(x, *args, p, k) for *args, k in zip(bases, As, Bs, scales, keys)]
    for y, yr, yp in zip(got, ref, plain):
        assert y.dtype == dtype and y.shape == yp.shape
        assert _rel(y, yp) <= TOL[dtype]
        assert _rel(yr, yp) <= TOL[dtype]
    grads, gys = _grads(got, leaves)
    grads_ref, _ = _grads(ref, leaves)
    grads_plain = torch.autograd.grad([y for y in plain], leaves, [gy.double() for gy in gys])
    for name, gk, gr, gp in zip(["dX"] + ["dA"] * len(Ns) + ["dB"] * len(Ns), grads, grads_ref, grads_plain):
        assert gk.dtype == (dtype if name == "dX" else torch.float32), name
        assert _rel(gk, gp) <= TOL[dtype], name
        assert _rel(gr, gp) <= TOL[dtype], name


# The GEMM path's variants (GemmOptions): the adapter passes in Triton (the default on CUDA) or in
# PyTorch (the default on CPU), and each alternative the benchmark times.
GEMM_VARIANTS = {
    "triton": GemmOptions(adapter="triton"),
    "torch": GemmOptions(adapter="torch"),
    "base_first": GemmOptions(adapter="triton", adapter_first=False),
    "dequant_twice": GemmOptions(adapter="triton", save_weight=False),
    "save_weight": GemmOptions(adapter="triton", save_weight=True),
    "dy_cublas": GemmOptions(adapter="triton", dy="cublas"),
    "dy_triton": GemmOptions(adapter="triton", dy="triton"),
    "y_cublas": GemmOptions(adapter="triton", y_in_down=False),  # Y = xa B^T by cuBLAS, not the Triton launch
    "torch_mask": GemmOptions(adapter="torch_mask"),
}
GEMM_CASES = [(v, *case) for case in CASES for v in ("triton", "torch")] + \
    [(v, *CASES[i]) for v in ("base_first", "dequant_twice", "save_weight", "dy_cublas", "dy_triton", "y_cublas")
     for i in (1, 3, 4)]


@pytest.mark.parametrize("variant,nf4,dtype,M,K,Ns,r,p,bias", GEMM_CASES)
def test_gemm_path_matches_reference_and_plain_autograd(variant, nf4, dtype, M, K, Ns, r, p, bias):
    """backend="cublas": y, dX, dA, dB against fp64 autograd through a plain LoRA (same mask)."""
    x, bases, As, Bs = _make(nf4, dtype, M, K, Ns, r, bias)
    scales = [2.0, 0.5, 1.5][: len(Ns)]
    keys = new_dropout_keys(len(Ns), DEV)
    leaves = [x, *As, *Bs]
    got = lora_forward(x, bases, As, Bs, scales, p, keys, backend="cublas", options=GEMM_VARIANTS[variant])
    plain = [_plain(x, *args, p, k) for *args, k in zip(bases, As, Bs, scales, keys)]
    for y, yp in zip(got, plain):
        assert y.dtype == dtype and y.shape == yp.shape
        assert _rel(y, yp) <= TOL[dtype]
    grads, gys = _grads(got, leaves)
    grads_plain = torch.autograd.grad(plain, leaves, [gy.double() for gy in gys])
    for name, gk, gp in zip(["dX"] + ["dA"] * len(Ns) + ["dB"] * len(Ns), grads, grads_plain):
        assert gk.dtype == (dtype if name == "dX" else torch.float32), name
        assert _rel(gk, gp) <= TOL[dtype], name


@pytest.mark.parametrize("nf4,dtype,M,K,Ns,r,p,bias", [c for c in CASES if len(c[4]) == 1])
@pytest.mark.parametrize("adapter_first", [True, False])
def test_gemm_path_with_torch_dropout_mask(nf4, dtype, M, K, Ns, r, p, bias, adapter_first):
    """adapter="torch_mask" (torch's dropout, the mask stored): the mask is drawn again from the same
    seed here and a plain fp64 LoRA with it gives y, dX, dA, dB."""
    x, bases, As, Bs = _make(nf4, dtype, M, K, Ns, r, bias)
    opts = GemmOptions(adapter="torch_mask", adapter_first=adapter_first)
    torch.manual_seed(7)
    y = lora_forward(x, bases, As, Bs, [2.0], p, new_dropout_keys(1, DEV), backend="cublas", options=opts)[0]
    torch.manual_seed(7)
    new_dropout_keys(1, DEV)
    keep = torch.empty(x.shape, dtype=torch.bool, device=DEV).bernoulli_(1.0 - p) if p > 0 else None
    base, a, b = bases[0], As[0], Bs[0]
    w = dequantize_nf4_reference(base.weight, torch.float64) if base.is_nf4 else base.weight.double()
    x64 = x.double()
    xd = x64 if keep is None else x64 * keep / (1 - p)
    want = x64 @ w.T + (0 if base.bias is None else base.bias.double()) + 2.0 * (xd @ a.double().T) @ b.double().T
    assert y.dtype == dtype and _rel(y, want) <= TOL[dtype]
    grads, gys = _grads([y], [x, a, b])
    want_grads = torch.autograd.grad(want, [x, a, b], gys[0].double())
    for name, gk, gp in zip(("dX", "dA", "dB"), grads, want_grads):
        assert gk.dtype == (dtype if name == "dX" else torch.float32), name
        assert _rel(gk, gp) <= TOL[dtype], name


@pytest.mark.parametrize("variant", ["triton", "torch", "dy_cublas", "dy_triton", "torch_mask"])
def test_gemm_path_without_x_grad_or_without_adapter_grads(variant):
    """The first layer's input needs no gradient (dA, dB only); a frozen adapter gives dX only."""
    x, bases, As, Bs = _make(True, torch.float32, 20, 64, (48,), 4)
    opts = GEMM_VARIANTS[variant]
    p = 0.0 if variant == "torch_mask" else 0.1  # (torch_mask draws its own mask)
    keys = new_dropout_keys(1, DEV)
    want = lora_reference(x, bases, As, Bs, [1.0], p, keys)[0]
    gy = torch.randn(want.shape).to(DEV)
    wx, wa, wb = torch.autograd.grad(want, [x, As[0], Bs[0]], gy)
    y = lora_forward(x.detach(), bases, As, Bs, [1.0], p, keys, backend="cublas", options=opts)[0]
    da, db = torch.autograd.grad(y, [As[0], Bs[0]], gy)
    assert _rel(da, wa) <= 2e-5 and _rel(db, wb) <= 2e-5
    frozen = [t.detach() for t in (*As, *Bs)]
    y = lora_forward(x, bases, frozen[:1], frozen[1:], [1.0], p, keys, backend="cublas", options=opts)[0]
    (dx,) = torch.autograd.grad(y, [x], gy)
    assert _rel(dx, wx) <= 2e-5


@pytest.mark.parametrize("dtype,M,K,N", [(torch.float16, 37, 96, 48), (torch.float32, 64, 128, 80),
                                         (torch.float16, 5, 64, 16)])
def test_forward_launch_writes_every_output_of_its_jobs(monkeypatch, dtype, M, K, N):
    """The forward's one Triton launch (`_launch_adapter_down` with b, workspace and nf4): xa, B
    in x's dtype, the zeroed accumulators and the dequantized W, each written over a NaN-filled
    buffer, so an element that no program wrote shows up."""
    import kernels.lora as L

    monkeypatch.setattr(L, "_scratch", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    a = (torch.randn(16, K, generator=g) * 0.1).to(DEV)
    b = torch.randn(N, 16, generator=g).to(DEV)
    q = quantize_nf4(torch.randn(N, K, generator=g).to(DEV))
    keys = new_dropout_keys(1, "cpu")
    xa, b_out, da, w = L._launch_adapter_down(x, a, keys, 0.1, 2.0, b=b, workspace=3000, nf4=q)
    assert torch.equal(xa, L._launch_adapter_down(x, a, keys, 0.1, 2.0)[0])  # the jobs leave xa alone
    assert _rel(xa, L._adapter_down_torch(x, a, keys, 0.1, 2.0)) <= TOL[dtype]
    assert b_out.dtype == dtype and torch.equal(b_out, b.to(dtype))
    assert da.dtype == torch.float32 and torch.equal(da, torch.zeros_like(da))
    assert w.dtype == dtype and torch.equal(w, dequantize_nf4_reference(q, dtype))
    # y = xa B^T (+ bias) from the row tiles (the GEMM path's forward), over a NaN-filled y
    for bias in (None, torch.randn(N, generator=g).to(DEV, dtype)):
        y = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        xa2 = L._launch_adapter_down(x, a, keys, 0.1, 2.0, b=b, workspace=3000, nf4=q, y=y, bias=bias)[0]
        assert torch.equal(xa2, xa)
        want = xa.double() @ b.to(dtype).double().t() + (0 if bias is None else bias.double())
        assert y.dtype == dtype and _rel(y, want) <= TOL[dtype]
    with pytest.raises(ValueError, match="one K split"):
        L._launch_adapter_down(x, a, keys, 0.1, 2.0, dict(SPLIT_K=2, BLOCK_K=32), b=b, y=y)


def test_gemm_path_takes_nd_input_and_gives_outputs_that_allow_inplace_ops():
    """x (B, T, K) goes through the GEMM path's Function whole (flattened inside it); y and dX come
    back in x's leading shape and are not views, so a residual `y += ...` downstream works."""
    x, bases, As, Bs = _make(True, torch.float32, 12, 64, (48,), 4)
    x3 = x.detach().reshape(3, 4, 64).requires_grad_()
    want = lora_reference(x3, bases, As, Bs, [1.0], 0.0)[0]
    y = lora_forward(x3, bases, As, Bs, [1.0], 0.0, None, backend="cublas", options=GemmOptions(adapter="triton"))[0]
    assert y.shape == (3, 4, 48) and y._base is None
    assert _rel(y, want) <= TOL[torch.float32]
    z = y.clone()
    y += 1.0  # in place, on the Function's output
    (dx,) = torch.autograd.grad(y, [x3], torch.ones_like(y))
    (want_dx,) = torch.autograd.grad(want, [x3], torch.ones_like(want))
    assert dx.shape == x3.shape and dx._base is None and _rel(dx, want_dx) <= TOL[torch.float32]
    assert torch.equal(y, z + 1.0)


def test_gemm_path_backward_twice_through_one_graph():
    """retain_graph: the dA accumulator the forward zeroed serves the first backward; the second
    zeroes it again, so both give the same gradients."""
    x, bases, As, Bs = _make(True, torch.float32, 20, 64, (48,), 4)
    y = lora_forward(x, bases, As, Bs, [1.0], 0.1, new_dropout_keys(1, "cpu"), backend="cublas",
                     options=GemmOptions(adapter="triton", dy="triton"))[0]
    gy = torch.randn(y.shape).to(DEV)
    first = torch.autograd.grad(y, [x, As[0], Bs[0]], gy, retain_graph=True)
    second = torch.autograd.grad(y, [x, As[0], Bs[0]], gy)
    for f, s in zip(first, second):
        torch.testing.assert_close(s, f, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("K,starts", [(32, (0,)), (37, (0, 21)), (300, (0, 251, 284))])
def test_dropout_mask_is_the_reference_mask_bit_for_bit(backend, K, starts):
    """W = 0, B = I (16 x 16) and A selecting 16 columns c0.. of x: the output is dropout(x)[:, c0:c0+16]
    exactly, and with dY = 1 the dX is keep / (1 - p) on those columns, so both passes' masks show.
    K = 37 cuts a column pair; K = 300 spans two 256-column tiles. The fused kernels hash element by
    element (`_keep`), the GEMM path's passes by column pairs (`_keep_tile`)."""
    M, p, r = 45, 0.3, 16
    keys = new_dropout_keys(1, DEV)
    keep = dropout_keep_reference(keys[0], M, K, p)
    base = Base(torch.zeros(r, K, device=DEV))
    for c0 in starts:
        x = (torch.randn(M, K) + 3.0).to(DEV).requires_grad_()  # no zeros in x: a zero output is a drop
        a = torch.zeros(r, K, device=DEV)
        a[torch.arange(r), c0 + torch.arange(r)] = 1.0
        y = lora_forward(x, [base], [a], [torch.eye(r, device=DEV)], [1.0], p, keys, backend=backend,
                         options=GemmOptions(adapter="triton"))[0]
        cols = slice(c0, c0 + r)
        assert torch.equal(y != 0, keep[:, cols]), c0
        torch.testing.assert_close(y[keep[:, cols]], x[:, cols][keep[:, cols]] / (1 - p), rtol=1e-6, atol=0)
        (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
        want = torch.zeros(M, K, device=DEV)
        want[:, cols] = keep[:, cols] / (1 - p)
        torch.testing.assert_close(dx, want, rtol=1e-6, atol=0)


def test_dropout_mask_statistics():
    p = 0.1
    keys = new_dropout_keys(2, DEV)
    a = dropout_keep_reference(keys[0], 512, 1024, p)
    b = dropout_keep_reference(keys[1], 512, 1024, p)
    assert abs(a.float().mean().item() - (1 - p)) < 3e-3
    assert abs(a.float().mean(1).std().item() - (p * (1 - p) / 1024) ** 0.5) < 3e-3  # rows independent
    both = (~a & ~b).float().mean().item()  # two keys: independent masks
    assert abs(both - p * p) < 2e-3
    # columns 2j and 2j + 1 take the two halves of one hash, 2j + 1 and 2j + 2 come from two hashes:
    # both pairs must drop together at the rate of independent elements
    for first in (0, 1):
        together = (~a[:, first:-1:2] & ~a[:, first + 1::2]).float().mean().item()
        assert abs(together - p * p) < 2e-3, (first, together)
    assert keep_threshold(0.0) == 0 and dropout_keep_reference(keys[0], 4, 4, 0.0).all()


def test_zero_dropout_ignores_keys_and_eval_layer_has_no_dropout():
    x, bases, As, Bs = _make(False, torch.float32, 17, 64, (32,), 4)
    y1 = lora_forward(x, bases, As, Bs, [1.0], 0.0, new_dropout_keys(1, DEV), backend="triton")[0]
    y2 = lora_forward(x, bases, As, Bs, [1.0], 0.0, new_dropout_keys(1, DEV), backend="triton")[0]
    assert torch.equal(y1, y2)


def _layer(base, r=8, p=0.1, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(base, r=r, alpha=16, dropout=p)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_lora_linear_on_layers_matches_their_pytorch_forward(kind):
    """lora_linear(x, layer) (the CUDA hook's entry) equals LoRALinear's PyTorch forward in eval,
    takes (B, T, K) inputs, and in training gives the reference's output and gradients."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True).to(DEV)
    base = NF4Linear.from_linear(linear) if kind == "nf4" else linear
    layer = _layer(base).eval()  # the adapter lands on the base's device
    x = torch.randn(2, 9, 96).to(DEV).requires_grad_()
    got = lora_linear(x, layer, backend="triton")
    want = layer(x)  # the PyTorch forward (on CUDA too: 18 rows <= models.lora.SMALL_ROWS)
    assert got.shape == (2, 9, 80)
    assert _rel(got, want) <= 2e-5
    assert _rel(lora_linear(x, layer, backend="cublas"), want) <= 2e-5
    layer.train()
    keys = new_dropout_keys(1, DEV)
    ref = lora_linear(x, layer, backend="reference", keys=keys)
    leaves = [x, layer.lora_A.weight, layer.lora_B.weight]
    ref_grads = _grads([ref], leaves)[0]
    for backend in ("triton", "cublas"):
        got = lora_linear(x, layer, backend=backend, keys=keys)
        assert _rel(got, ref) <= 2e-5, backend
        for gk, gr in zip(_grads([got], leaves)[0], ref_grads):
            assert _rel(gk, gr) <= 2e-5, backend


def test_lora_qkv_equals_three_lora_linear_calls():
    torch.manual_seed(0)
    layers = [_layer(NF4Linear.from_linear(torch.nn.Linear(64, n, bias=False).to(DEV)), seed=i)
              for i, n in enumerate((64, 32, 32))]
    x = torch.randn(3, 7, 64, dtype=torch.float32).to(DEV).requires_grad_()
    keys = new_dropout_keys(3, DEV)
    fused = lora_qkv(x, *layers, backend="triton", keys=keys)
    alone = [lora_linear(x, layer, backend="triton", keys=keys[i:i + 1]) for i, layer in enumerate(layers)]
    leaves = [x] + [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    for a, b in zip(fused, alone):
        assert a.shape == b.shape and _rel(a, b) <= 1e-6
    for ga, gb in zip(_grads(list(fused), leaves)[0], _grads(alone, leaves)[0]):
        assert _rel(ga, gb) <= 1e-5


def test_only_adapter_grads_when_x_needs_none():
    """The first layer's input (embeddings) needs no gradient: dX is skipped, dA/dB still come."""
    x, bases, As, Bs = _make(True, torch.float32, 20, 64, (48,), 4)
    x = x.detach()
    y = lora_forward(x, bases, As, Bs, [1.0], 0.1, backend="triton")[0]
    y.sum().backward()
    assert As[0].grad is not None and Bs[0].grad is not None and torch.isfinite(As[0].grad).all()


# A child process without the interpreter compiles every launch for sm_90 (Triton bundles ptxas),
# so a kernel that would not build on an H100, or would need more than its 227 KB of shared memory
# per block, fails here on a CPU machine.
_COMPILE_FOR_H100 = r'''
import sys, torch
from triton.runtime.jit import JITFunction

TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
         torch.int32: "*i32", torch.int64: "*i64"}
H100_SMEM = 232448

def compile_instead(self, *args, grid, warmup, **kwargs):
    bound = dict(zip([p.name for p in self.params], args), **kwargs)
    opts = {k: bound.pop(k) for k in ("num_warps", "num_stages") if k in bound}
    sig, consts = {}, {}
    for p in self.params:
        v = bound[p.name]
        if p.is_constexpr:
            consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = TYPES[v.dtype]
        else:
            sig[p.name] = "fp32" if isinstance(v, float) else "i32"
    c, usage = sm90_compile(self, sig, consts, **opts)
    assert c.metadata.shared <= H100_SMEM, (self.fn.__name__, c.metadata.shared)
    regs, local = usage["REG"], usage["LOCAL"]
    if self.fn.__name__.startswith("_adapter"):  # the GEMM path's kernels must not spill
        assert local == 0, (self.fn.__name__, usage)
    print("compiled", self.fn.__name__, c.metadata.shared, regs, local, flush=True)

JITFunction.run = compile_instead
from kernels import lora as L
from kernels.nf4 import quantize_nf4

M, K, Ns = {"mixtral_qkv": (5120, 4096, (4096, 1024, 1024)), "unaligned_k": (200, 96, (80,))}[sys.argv[1]]
S, r = len(Ns), 16
bases = [L.Base(quantize_nf4(torch.zeros(n, K))) for n in Ns]
x, keys = torch.empty(M, K, dtype=torch.bfloat16), L.new_dropout_keys(S, "cpu")
a, b = torch.zeros(S * r, K), torch.zeros(sum(Ns), r)
xa, g = torch.zeros(M, S * r), torch.zeros(M, S * r)
ys = [torch.empty(M, n, dtype=torch.bfloat16) for n in Ns]
if S == 3:  # the two small passes once; the GEMMs for both shapes (their shared memory varies)
    L._launch_down(x, a, keys, [1.0] * S, 0.1, r)
    L._launch_dy(ys, b, xa, [1.0] * S, r)
    # The GEMM path's kernels, bf16, every variant the engine or the benchmark launches.
    x16, a1, keys1 = x, a[:r], keys[:1]
    L._launch_adapter_down(x16, a1, keys1, 0.1, 4.0, b=b[:Ns[0]], workspace=16 * (M + K + Ns[0]), nf4=bases[0].weight,
                           y=ys[0])
    L._launch_adapter_down(x16, a1, keys1, 0.0, 4.0, dict(SPLIT_K=4))
    g16, t16 = torch.empty(M, r, dtype=torch.bfloat16), torch.empty(M, K, dtype=torch.bfloat16)
    L._launch_adapter_dx(x16, g16, a1, keys1, 0.1, 4.0, t16, False, True)
    L._launch_adapter_dx(x16, g[:, :r], a1, keys1, 0.0, 4.0, t16, True, False)
    L._launch_adapter_dx(x16, g16, a1, keys1, 0.1, 4.0, None, False, True)
    L._launch_dy(ys[:1], b[:Ns[0]], g16, [1.0], r, native=True)
L._launch_fwd(x, xa, b, None, bases, r)
L._launch_dx(ys, bases, g, a, keys, 0.1, r, x)
'''


def test_kernels_compile_for_h100():
    import subprocess
    import sys

    from tests.sm90 import SM90_HELPER, child_env

    env = child_env()
    # Two shapes in two processes at once: Mixtral's q/k/v in one launch, and K % 64 != 0.
    procs = [subprocess.Popen([sys.executable, "-c", SM90_HELPER + _COMPILE_FOR_H100, case], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for case in ("mixtral_qkv", "unaligned_k")]
    compiled = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        compiled += [line.split()[1] for line in stdout.splitlines() if line.startswith("compiled")]
    assert compiled.count("_lora_fwd_kernel") == 2 and compiled.count("_lora_dx_kernel") == 2
    assert "_lora_down_kernel" in compiled and "_lora_dy_kernel" in compiled
    assert compiled.count("_adapter_down_kernel") == 2 and compiled.count("_adapter_dx_kernel") == 3
