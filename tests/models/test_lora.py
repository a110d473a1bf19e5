"""LoRALinear and inject_lora: targets, PEFT's init, merge/unmerge (dense exact, NF4 within a bound)."""
import math

import pytest
import torch

from engine.errors import EngineError
from kernels.nf4 import NF4_VALUES, dequantize_nf4_reference, quantize_nf4
from models.config import ModelConfig
from models.lora import (EXPERT_TARGETS, LoRALinear, inject_lora, lora_layers, lora_state_dict, merge_lora,
                         project_qkv, unmerge_lora)
from models.nf4 import NF4Linear, replace_linears_with_nf4
from models.transformer import Transformer


def _model(preset="tiny-dense", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset(preset)
    cfg.vocab_size = 64
    m = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def _randomize_b(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def test_default_targets_wrap_attention_only_and_freeze_the_rest():
    m = _model("tiny-moe")
    names = inject_lora(m, r=4, alpha=8)
    assert names and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in names)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)


def test_expert_targets_as_an_option_router_never():
    m = _model("tiny-moe")
    names = inject_lora(m, r=4, alpha=8, targets=("q_proj",) + EXPERT_TARGETS)
    assert any(".experts." in n and n.endswith(".w1") for n in names)
    assert not any(n.endswith(".gate") for n in names)
    with pytest.raises(EngineError, match="router"):
        inject_lora(_model("tiny-moe"), targets=["q_proj", "gate"])
    with pytest.raises(EngineError, match="match no linear layer"):
        inject_lora(_model(), targets=["nope_proj"])


def test_suffix_targets_like_peft():
    m = _model()
    names = inject_lora(m, r=2, alpha=2, targets=["self_attn.o_proj"])
    assert names == [f"model.layers.{i}.self_attn.o_proj" for i in range(m.config.num_hidden_layers)]


def test_peft_init_and_scales():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(300, 40), r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(300)  # kaiming_uniform_(a=sqrt(5)) on fan_in 300
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    assert layer.lora_A.weight.dtype == torch.float32 and layer.scale == 2.0
    assert LoRALinear(torch.nn.Linear(8, 8), r=16, alpha=16, rslora=True).scale == 4.0
    with pytest.raises(EngineError, match="lora_r"):
        LoRALinear(torch.nn.Linear(8, 8), r=0, alpha=1)


def test_zero_b_leaves_the_model_unchanged_and_dropout_only_in_training():
    m = _model()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = m(ids)
        inject_lora(m, r=4, alpha=8, dropout=0.5)
        assert torch.equal(m(ids), before)
        _randomize_b(m)
        m.eval()
        assert torch.equal(m(ids), m(ids))
        m.train()
        assert not torch.equal(m(ids), m(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_adapter_output_and_unmerge_restores_the_base(dtype):
    m = _model(dtype=dtype)
    base_weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    inject_lora(m, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    _randomize_b(m)
    ids = torch.randint(0, 64, (2, 9))
    deltas = {n + ".weight": layer.delta_weight().detach().float() for n, layer in lora_layers(m).items()}
    with torch.no_grad():
        adapted = m(ids).float()
        merge_lora(m)
        assert all(layer.merged for layer in lora_layers(m).values())
        merged = m(ids).float()
        unmerge_lora(m)
        restored = {n.replace(".base.", "."): p for n, p in m.named_parameters() if "lora_" not in n}
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the merged weight is rounded once more
    assert ((merged - adapted).abs().max() / adapted.abs().max()).item() <= tol
    assert set(deltas) < set(restored)
    u = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -8  # unit roundoff of the base dtype
    for name, w in base_weights.items():
        if name not in deltas:
            assert torch.equal(restored[name], w), name
        else:  # two roundings: of W + dW (merge) and of the result - dW (unmerge)
            bound = u * (2 * w.float().abs() + deltas[name].abs()) + 1e-30
            assert ((restored[name].float() - w.float()).abs() <= bound).all(), name


def test_nf4_merge_requantizes_within_the_stated_bound():
    """Merging into NF4 = quantize(dequantize(W) + scale B A): byte-equal to that, each element
    within 0.152 x its block's absmax (half the widest NF4 code gap) plus 1% for the 8-bit absmax."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(192, 96, bias=False))
    layer = LoRALinear(base, r=8, alpha=16)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    target = dequantize_nf4_reference(base.nf4, torch.float32) + layer.delta_weight()
    want = quantize_nf4(target)
    x = torch.randn(5, 192)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        merged = layer(x)
    assert torch.equal(base.weight.view(-1), want.packed) and torch.equal(base.absmax, want.absmax)
    merged_w = dequantize_nf4_reference(base.nf4, torch.float32)
    gap = max(b - a for a, b in zip(NF4_VALUES, NF4_VALUES[1:])) / 2  # 0.152
    block_absmax = target.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (merged_w - target).reshape(-1, 64).abs()
    assert (err <= gap * block_absmax * 1.01 + 1e-7).all()
    # The outputs move by about the quantization noise of one re-quantization, no more.
    fresh_err = (dequantize_nf4_reference(quantize_nf4(target), torch.float32) - target).norm()
    assert torch.allclose(merged_w, dequantize_nf4_reference(want, torch.float32))
    assert (merged - adapted).norm() <= 1.5 * (x @ (merged_w - target).T).norm() + 1e-6
    assert (merged_w - target).norm() <= fresh_err + 1e-6
    with pytest.raises(EngineError, match="unmerge"):
        layer.unmerge()


def test_nf4_model_with_lora_runs_and_trains_only_adapters():
    m = _model("tiny-moe")
    replace_linears_with_nf4(m, skip=("gate", "lm_head"))
    names = inject_lora(m, r=4, alpha=8, targets=("q_proj", "w1"))
    _randomize_b(m)
    m.train()
    ids = torch.randint(0, 64, (2, 6))
    m(ids).logsumexp(-1).mean().backward()
    layers = lora_layers(m)
    assert set(layers) == set(names) and all(isinstance(layer.base, NF4Linear) for layer in layers.values())
    assert all(layer.lora_A.weight.grad is not None for layer in layers.values())
    assert set(lora_state_dict(m)) == {f"{n}.lora_{w}.weight" for n in names for w in "AB"}


def test_project_qkv_on_cpu_is_three_calls():
    m = _model()
    inject_lora(m, r=4, alpha=8)
    _randomize_b(m)
    attn = m.model.layers[0].self_attn
    x = torch.randn(2, 5, m.config.hidden_size)
    with torch.no_grad():
        got = project_qkv(attn.q_proj, attn.k_proj, attn.v_proj, x)
        want = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_every_forward_path_gives_the_plain_path_numbers_in_fp32(kind):
    """LoRALinear's CUDA paths ("cublas", "fused"), forced through the layer's `backend` (on a machine
    without a GPU onto the CPU: Triton through the interpreter), against the plain PyTorch path: y,
    dX, dA, dB in fp32. With dropout the paths draw the same mask from the same seed (the plain
    path's mask is torch's own, so there the reference backend, which uses the kernels' mask, stands
    in for it)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs CPU tensors only when interpreted
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True).to(dev)
    base = NF4Linear.from_linear(linear) if kind == "nf4" else linear
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.0).train()
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 9, 96, device=dev, requires_grad=True)
    leaves = [x, layer.lora_A.weight, layer.lora_B.weight]
    gy = torch.randn(2, 9, 80, device=dev)

    def run(path, p=0.0):
        layer.backend, layer.dropout_p = path, p
        torch.manual_seed(1)
        y = layer(x)
        return y, torch.autograd.grad(y, leaves, gy)

    want, want_grads = run("plain")
    for path in ("cublas", "fused"):
        got, grads = run(path)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    from kernels.lora import lora_linear

    layer.dropout_p = 0.3
    torch.manual_seed(1)
    ref = lora_linear(x, layer, backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves, gy)
    for path in ("cublas", "fused"):
        got, grads = run(path, 0.3)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, ref_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    layer.backend = "nope"
    with pytest.raises(EngineError, match="path"):
        layer(x)


def test_cpu_tensors_take_the_plain_path_whatever_cuda_path(monkeypatch):
    import models.lora as ML

    layer = LoRALinear(torch.nn.Linear(8, 8), r=2, alpha=2)
    for path in ML.PATHS:
        monkeypatch.setattr(ML, "CUDA_PATH", path)
        assert ML._path(layer, torch.randn(100, 8)) == "plain"


def test_model_step_on_the_gemm_path_equals_the_plain_path():
    """A whole tiny MoE model (NF4 bases, LoRA on attention and experts) through backend="cublas"
    on every LoRA layer: same loss and adapter gradients as the plain path (fp32, no dropout)."""
    m = _model("tiny-moe")
    replace_linears_with_nf4(m, skip=("gate", "lm_head"))
    inject_lora(m, r=4, alpha=8, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "w2"))
    _randomize_b(m)
    m.train()
    ids = torch.randint(0, 64, (2, 6))
    layers = lora_layers(m)
    params = [p for p in m.parameters() if p.requires_grad]
    results = {}
    for path in ("plain", "cublas"):
        for layer in layers.values():
            layer.backend = path
        loss = m(ids).logsumexp(-1).mean()
        results[path] = (loss.detach(), torch.autograd.grad(loss, params))
    torch.testing.assert_close(results["cublas"][0], results["plain"][0], rtol=1e-5, atol=1e-6)
    for g, w in zip(results["cublas"][1], results["plain"][1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
