"""Parity with transformers on tiny random Llama / Mistral / Mixtral models (fp32, CPU)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine

import transformers  # a dev dependency: a missing peer must fail, not skip

TOL = 1e-4


def _tiny(kind):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=256)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, rope_theta=1e6, sliding_window=5)
        cls = transformers.MistralForCausalLM
    else:
        cfg = transformers.MixtralConfig(**common, rope_theta=1e6, num_local_experts=4,
                                         num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    torch.manual_seed({"llama": 0, "mistral": 1, "mixtral": 2}[kind])
    model = cls(cfg).eval()
    with torch.no_grad():  # make the norms non-trivial so that their weights are checked
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _save(model, path):
    model.save_pretrained(path)
    # The engine needs only a tokenizer.json to load; build a trivial one.
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module", params=["llama", "mistral", "mixtral"])
def pair(request, tmp_path_factory):
    hf = _tiny(request.param)
    path = _save(hf, tmp_path_factory.mktemp(request.param))
    ours, _ = engine.load(path, dtype=torch.float32, device="cpu")
    return hf, ours


def _hf_logits(hf, ids, mask=None, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def test_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(hf, ids)).abs().max() <= TOL


def test_padded_batch_matches(pair):
    """Left padding in one row, right padding in another; only real tokens are compared."""
    hf, ours = pair
    ids = torch.randint(0, 96, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padded
    mask[1, 6:] = 0  # right padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=pos)
    want = _hf_logits(hf, ids, mask, pos)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= TOL
    # A left-padded row must equal the same tokens run alone, unpadded.
    with torch.no_grad():
        alone = ours(ids[0:1, 3:])
    assert (got[0, 3:] - alone[0]).abs().max() <= TOL


def test_kv_cache_decoding_matches_full_forward(pair):
    hf, ours = pair
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :2] = 0  # row 1 left padded by two slots
    pos = (mask[:, :12].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask[:, :12], position_ids=pos)
        want = _hf_logits(hf, ids, mask[:, :12], pos)
        ours.setup_kv_cache(2, 16, dtype=torch.float32)
        try:
            step_logits = [ours(ids[:, :7], attention_mask=mask, position_ids=pos[:, :7],
                                input_pos=torch.arange(7))]
            for t in range(7, 12):
                step_logits.append(ours(ids[:, t:t + 1], attention_mask=mask,
                                        position_ids=pos[:, t:t + 1], input_pos=torch.tensor([t])))
        finally:
            ours.clear_kv_cache()
    stepped = torch.cat(step_logits, dim=1)
    real = mask[:, :12].bool()
    assert (stepped[real] - full[real]).abs().max() <= TOL
    assert (stepped[real] - want[real]).abs().max() <= TOL


def test_mixtral_fused_v5_layout_and_shards(tmp_path):
    """transformers v5 fuses experts into 3-D tensors; load that layout, split over two shards."""
    hf = _tiny("mixtral")
    _save(hf, tmp_path / "legacy")
    sd = load_file(str(tmp_path / "legacy" / "model.safetensors"))  # per-expert keys
    fused = {}
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}.block_sparse_moe."
        n_exp = hf.config.num_local_experts
        w1 = torch.stack([sd.pop(f"{p}experts.{e}.w1.weight") for e in range(n_exp)])
        w3 = torch.stack([sd.pop(f"{p}experts.{e}.w3.weight") for e in range(n_exp)])
        w2 = torch.stack([sd.pop(f"{p}experts.{e}.w2.weight") for e in range(n_exp)])
        q = f"model.layers.{i}.mlp."
        fused[f"{q}experts.gate_up_proj"] = torch.cat([w1, w3], dim=1).contiguous()  # (E, 2I, C)
        fused[f"{q}experts.down_proj"] = w2.contiguous()  # (E, C, I)
        fused[f"{q}gate.weight"] = sd.pop(f"{p}gate.weight")
    out = tmp_path / "fused"
    out.mkdir()
    shard1 = dict(list(sd.items()))
    save_file(shard1, str(out / "model-00001-of-00002.safetensors"))
    save_file(fused, str(out / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in fused}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json"):
        (out / name).write_text((tmp_path / "legacy" / name).read_text())
    ours, _ = engine.load(out, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(hf, ids)).abs().max() <= TOL
