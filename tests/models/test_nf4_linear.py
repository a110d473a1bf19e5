"""NF4Linear: bitsandbytes-format state dicts both ways, streaming fills, module replacement."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import EngineError
from kernels.nf4 import dequantize_nf4_reference, quantize_nf4
from models.config import ModelConfig
from models.nf4 import NF4Linear, replace_linears_with_nf4
from models.transformer import Transformer

import bitsandbytes as bnb  # a dev dependency (setup.py extras "dev"): missing must fail, not skip
import bitsandbytes.functional as bnb_F  # noqa: E402


def _linear(in_f=192, out_f=48, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _bnb_linear(lin: nn.Linear):
    """bnb's Linear4bit holding `lin`'s weight, quantized on CPU (nf4, double quant)."""
    b = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                          compress_statistics=True, compute_dtype=lin.weight.dtype)
    b.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if lin.bias is not None:
        b.bias = nn.Parameter(lin.bias.data.clone())
    return b.to("cpu")  # quantizes


def _bnb_dequant(b):
    return bnb_F.dequantize_4bit(b.weight.data, b.weight.quant_state)


def test_state_dict_equals_bnb_linear4bit():
    lin = _linear()
    ours = NF4Linear.from_linear(lin).state_dict()
    theirs = _bnb_linear(lin).state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("shape", [(192, 48), (65, 33)])
def test_loads_bnb_state_dict(shape):
    lin = _linear(*shape, dtype=torch.float16, seed=1)
    b = _bnb_linear(lin)
    m = NF4Linear(*shape, device="meta")
    m.load_state_dict(b.state_dict(), assign=True)
    assert m.weight_dtype == torch.float16 and not m.weight.is_meta
    assert torch.equal(m.dequantize(torch.float16), _bnb_dequant(b))
    assert torch.equal(m.bias, lin.bias.detach())


def test_bnb_loads_our_state_dict():
    lin = _linear(seed=2)
    m = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    sd = m.state_dict()
    b = bnb.nn.Linear4bit(192, 48, bias=True, quant_type="nf4", compress_statistics=True,
                          compute_dtype=torch.bfloat16)
    quant_stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    b.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], quant_stats, device="cpu", module=b)
    b.bias = nn.Parameter(sd["bias"])
    assert torch.equal(_bnb_dequant(b), m.dequantize())
    x = torch.randn(5, 192, dtype=torch.bfloat16)
    with torch.no_grad():
        dense = nn.functional.linear(x.float(), m.dequantize(torch.float32), m.bias.float())
        assert (b(x).float() - dense).abs().max() < 0.02  # bnb's CPU path rounds through bf16
        assert (m(x).float() - dense).abs().max() < 0.02


def test_round_trip_through_state_dict_and_safetensors(tmp_path):
    m = NF4Linear.from_linear(_linear(seed=3))
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    sd = load_file(tmp_path / "w.safetensors")
    for fresh in (NF4Linear(192, 48, device="meta"), NF4Linear(192, 48, dtype=torch.bfloat16)):
        fresh.load_state_dict(sd, assign=fresh.weight.is_meta)
        for key, t in m.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], t), key
        x = torch.randn(3, 192, dtype=torch.bfloat16)
        assert torch.equal(fresh(x), m(x))


def test_streaming_fill_from_meta():
    """The loader's path: a meta module filled by quantize_() or by load_quantized_()."""
    lin = _linear(seed=4)
    m = NF4Linear(192, 48, device="meta")
    m.quantize_(lin.weight)
    reference = NF4Linear.from_linear(lin)
    assert torch.equal(m.dequantize(), reference.dequantize())
    tensors = reference.state_dict()
    other = NF4Linear(192, 48, device="meta").load_quantized_(tensors)
    assert torch.equal(other.dequantize(), reference.dequantize())
    assert all(not t.is_meta for t in other.buffers())
    empty = NF4Linear(192, 48, device="meta").to_empty(device="cpu")  # materialize, then load
    assert all(t.device.type == "cpu" for t in empty.buffers())
    empty.load_state_dict(tensors)
    assert torch.equal(empty.dequantize(), reference.dequantize())


def test_forward_matches_dequantized_weight_and_grads_reach_only_the_input():
    lin = _linear(dtype=torch.float32, seed=5)
    m = NF4Linear.from_linear(lin)
    x = torch.randn(2, 7, 192, requires_grad=True)
    y = m(x)
    w = dequantize_nf4_reference(quantize_nf4(lin.weight), torch.float32)
    assert torch.allclose(y, nn.functional.linear(x, w, lin.bias), atol=1e-6)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, 7, 48) @ w, atol=1e-5)
    assert not any(p.requires_grad for p in m.parameters())


def test_compute_dtype_and_moves_keep_fp32_statistics():
    m = NF4Linear.from_linear(_linear(dtype=torch.float32, seed=6), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 192)
    y = m(x)
    assert y.dtype == torch.float32  # computed in bf16, returned in the input's dtype
    before = {k: v.clone() for k, v in m.state_dict().items() if k != "bias"}
    m.to(torch.float16)
    assert m.bias.dtype == torch.float16
    for key, t in m.state_dict().items():
        if key != "bias":
            assert t.dtype == before[key].dtype and torch.equal(t, before[key]), key


def test_replace_linears_on_a_materialized_model():
    torch.manual_seed(7)
    model = Transformer(ModelConfig.from_preset("tiny-moe")).float()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        dense = model(ids)
    names = replace_linears_with_nf4(model)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.block_sparse_moe.experts.3.w2" in names
    assert not any(n.endswith(".gate") or n == "lm_head" for n in names)
    assert isinstance(model.model.layers[0].block_sparse_moe.gate, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.o_proj, NF4Linear)
    with torch.no_grad():
        quantized = model(ids)
    assert ((quantized - dense).norm() / dense.norm()).item() < 0.05  # NF4 error, not a broken layer


def test_replace_linears_on_meta_model_then_load():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("tiny-dense"))
    names = replace_linears_with_nf4(model, skip=("lm_head", "mlp.down_proj"))
    assert "model.layers.0.mlp.gate_proj" in names  # "gate" would not match gate_proj
    assert not any(n.endswith("down_proj") for n in names)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, NF4Linear) and q.weight.is_meta
    q.quantize_(torch.randn(64, 64))
    assert q.weight.device.type == "cpu" and q(torch.randn(1, 64)).shape == (1, 64)


def test_errors_name_the_problem_and_the_fix():
    lin = _linear(seed=8)
    with pytest.raises(EngineError, match="expects \\(48, 192\\)"):
        NF4Linear(192, 48).quantize_(torch.randn(48, 64))
    sd = NF4Linear.from_linear(lin).state_dict()
    with pytest.raises(EngineError, match="shape is \\[48, 192\\].*needs \\[48, 64\\]"):
        NF4Linear(64, 48).load_state_dict(sd)
    b = bnb.nn.Linear4bit(192, 48, quant_type="fp4", compress_statistics=True)
    b.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, quant_type="fp4",
                                 compress_statistics=True)
    with pytest.raises(EngineError, match="only NF4 is supported"):
        NF4Linear(192, 48).load_state_dict(b.to("cpu").state_dict())
    b = bnb.nn.Linear4bit(192, 48, quant_type="nf4", compress_statistics=False)
    b.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=False)
    with pytest.raises(EngineError, match="compress_statistics=True"):
        NF4Linear(192, 48).load_state_dict(b.to("cpu").state_dict())
    with pytest.raises(EngineError, match="meta device"):
        NF4Linear(192, 48, device="meta").state_dict()
