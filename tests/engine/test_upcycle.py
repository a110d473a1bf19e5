"""Upcycling a dense Llama/Mistral into a Mixtral-architecture MoE keeps the dense output."""
import json

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          MixtralForCausalLM)

import engine
from engine.convert import main as convert_main
from engine.errors import EngineError
from engine.upcycle import upcycle
from models.moe import route
from tests.tiny import byte_tokenizer

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 120, 7, 8, 77], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def dense_dir(path, kind="llama", tie=False, seed=0):
    """A tiny random dense model saved by transformers (fp32), with tokenizer files beside it."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    else:
        model = MistralForCausalLM(MistralConfig(rope_theta=1e6, sliding_window=4096, **common))
    model.save_pretrained(path)
    byte_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return model.eval()


@pytest.mark.parametrize("router_init,experts,top_k", [("zero", 8, 2), ("random", 8, 2), ("random", 3, 1)])
def test_upcycled_logits_equal_dense_in_transformers(tmp_path, router_init, experts, top_k):
    dense = dense_dir(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=experts, top_k=top_k, router_init=router_init)
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert moe.config.num_local_experts == experts and moe.config.num_experts_per_tok == top_k
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-5)


def test_upcycled_logits_equal_dense_in_our_engine(tmp_path):
    dense_dir(tmp_path / "dense", tie=True)
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=4, top_k=2)
    dense, _ = engine.load(tmp_path / "dense", device="cpu", dtype=torch.float32)
    moe, tok = engine.load(tmp_path / "moe", device="cpu", dtype=torch.float32)
    assert moe.config.is_moe and moe.config.num_local_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS), dense(IDS), rtol=0, atol=1e-5)
    assert tok.eos_token == "</s>"  # tokenizer files copied


def test_zero_router_routing_is_exact():
    """Ties pick exactly k distinct experts, and the renormalized weights are exactly 1/k."""
    for experts, k in ((8, 2), (4, 4), (8, 1), (3, 2)):
        weights, ids = route(torch.zeros(5, experts), k, torch.float32)
        assert all(len(set(row.tolist())) == k for row in ids)
        assert torch.equal(weights, torch.full((5, k), 1.0 / k))
        y = torch.randn(5, 16)
        assert torch.equal(sum(weights[:, j:j + 1] * y for j in range(k)), y)


def test_random_router_spreads_tokens_over_experts(tmp_path):
    dense_dir(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=8, top_k=2, seed=1)
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    hidden = torch.randn(64, 64)
    _, _, chosen = moe.model.layers[0].mlp.gate(hidden)
    assert len(torch.unique(chosen)) >= 6


def test_config_and_files(tmp_path):
    dense_dir(tmp_path / "dense", kind="mistral", tie=True)
    (tmp_path / "dense" / "chat_template.jinja").write_text("{{ messages }}")
    convert_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--experts", "4", "--top_k", "2"])
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    assert cfg["sliding_window"] == 4096 and cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 1e6
    names = sorted(p.name for p in (tmp_path / "moe").iterdir())
    assert names == ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "moe" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        gate = f.get_tensor("model.layers.1.block_sparse_moe.gate.weight")
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w1.weight")
    assert gate.shape == (4, 64) and w1.shape == (96, 64)
    assert not any(".mlp." in k for k in keys)
    assert {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for e in range(4)
            for w in ("w1", "w2", "w3")} <= keys


def test_sharded_output_loads(tmp_path):
    dense = dense_dir(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=4, top_k=2, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list((tmp_path / "moe").glob("*.tmp"))
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-5)


def test_errors(tmp_path):
    with pytest.raises(EngineError, match="config.json not found"):
        upcycle(tmp_path / "nothing", tmp_path / "out")
    dense_dir(tmp_path / "dense")
    with pytest.raises(EngineError, match="need 1 <= top_k <= experts"):
        upcycle(tmp_path / "dense", tmp_path / "out", experts=2, top_k=3)
    with pytest.raises(EngineError, match="router_init"):
        upcycle(tmp_path / "dense", tmp_path / "out", router_init="ones")
    upcycle(tmp_path / "dense", tmp_path / "moe", experts=2, top_k=1)
    with pytest.raises(EngineError, match="model_type 'mixtral' cannot be upcycled"):
        upcycle(tmp_path / "moe", tmp_path / "again")
    with pytest.raises(EngineError, match="not empty"):
        convert_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe")])
