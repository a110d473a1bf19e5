"""Adapter I/O in PEFT's format, both ways, against transformers + peft on tiny Mistral / Mixtral (fp32)."""
import json

import pytest
import torch

import engine
from engine.adapters import load_adapter, read_adapter, save_adapter
from engine.errors import EngineError
from models.lora import inject_lora, lora_layers, merge_lora

import transformers  # dev dependencies: a missing peer must fail, not skip
import peft  # a dev dependency: a missing peer must fail, not skip

TOL = 1e-4
VOCAB = 96


def _tiny_hf(kind):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
    torch.manual_seed({"mistral": 11, "mixtral": 12}[kind])
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, rope_theta=1e6))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2))
    return model.eval()


def _save_hf(model, path):
    from tokenizers import Tokenizer, models

    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def hf_dir(request, tmp_path_factory):
    path = _save_hf(_tiny_hf(request.param), tmp_path_factory.mktemp(request.param))
    return request.param, path


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


def _randomize_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)


def _diff(a, b):
    return (a - b).abs().max().item()


def test_adapter_saved_here_loads_into_peft(hf_dir, tmp_path):
    kind, path = hf_dir
    ours, _ = engine.load(path, dtype=torch.float32, device="cpu")
    inject_lora(ours, r=4, alpha=8, dropout=0.1, rslora=kind == "mixtral")
    _randomize_b(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter", base_model=str(path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and cfg["r"] == 4
    hf = peft.PeftModel.from_pretrained(_hf(path), tmp_path / "adapter").eval()
    assert hf.peft_config["default"].use_rslora == (kind == "mixtral")
    ids = _ids()
    with torch.no_grad():
        got, want = ours(ids), hf(input_ids=ids).logits
        base = hf.get_base_model()
        with hf.disable_adapter():
            plain = base(input_ids=ids).logits
    assert _diff(got, want) <= TOL
    assert _diff(want, plain) > 100 * TOL  # the adapter does change the logits


def test_peft_adapter_loads_here(hf_dir, tmp_path):
    kind, path = hf_dir
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)  # B random, not zero: the adapter matters
    if kind == "mixtral":  # per-layer ranks and alphas, as PEFT writes them
        config.rank_pattern = {"model.layers.1.self_attn.q_proj": 8}
        config.alpha_pattern = {"v_proj": 2}
    hf = peft.get_peft_model(_hf(path), config).eval()
    hf.save_pretrained(tmp_path / "peft")
    ours, _ = engine.load(path, dtype=torch.float32, device="cpu")
    load_adapter(ours, tmp_path / "peft")
    ours.eval()
    layers = lora_layers(ours)
    assert len(layers) == 8
    if kind == "mixtral":
        assert layers["model.layers.1.self_attn.q_proj"].r == 8
        assert layers["model.layers.0.self_attn.v_proj"].scale == 2 / 4
    ids = _ids()
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids)
        with hf.disable_adapter():
            plain = hf(input_ids=ids).logits
    assert _diff(got, want) <= TOL
    assert _diff(want, plain) > 100 * TOL


def test_load_then_merge_equals_the_adapter(tmp_path):
    path = _save_hf(_tiny_hf("mistral"), tmp_path / "base")
    ours, _ = engine.load(path, dtype=torch.float32, device="cpu")
    inject_lora(ours, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        adapted = ours.eval()(ids)
        merged_model, _ = engine.load(path, dtype=torch.float32, device="cpu")
        load_adapter(merged_model, tmp_path / "adapter", merge=True)
        assert all(layer.merged for layer in lora_layers(merged_model).values())
        merged = merged_model.eval()(ids)
    assert _diff(merged, adapted) <= TOL


def test_round_trip_here_and_a_resumed_model(tmp_path):
    path = _save_hf(_tiny_hf("mixtral"), tmp_path / "base")
    ours, _ = engine.load(path, dtype=torch.float32, device="cpu")
    inject_lora(ours, r=4, alpha=8, targets=["q_proj", "w1", "w3"])  # experts w1/w3 by module name
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "a")
    again, _ = engine.load(path, dtype=torch.float32, device="cpu")
    load_adapter(again, tmp_path / "a")
    assert set(lora_layers(again)) == set(lora_layers(ours))
    ids = _ids()
    with torch.no_grad():
        assert _diff(again.eval()(ids), ours.eval()(ids)) == 0
    # A model that already carries the same layers (a resumed run) loads into them.
    load_adapter(again, tmp_path / "a")
    other, _ = engine.load(path, dtype=torch.float32, device="cpu")
    inject_lora(other, r=4, alpha=8, targets=["q_proj"])
    with pytest.raises(EngineError, match="other lora_targets"):
        load_adapter(other, tmp_path / "a")


def test_nf4_base_loads_the_adapter_and_merges(tmp_path):
    path = _save_hf(_tiny_hf("mistral"), tmp_path / "base")
    dense, _ = engine.load(path, dtype=torch.float32, device="cpu")
    inject_lora(dense, r=4, alpha=8)
    _randomize_b(dense)
    save_adapter(dense, tmp_path / "a")
    q, _ = engine.load(path, dtype=torch.float32, device="cpu", quantize="nf4")
    load_adapter(q, tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        dense_logits = dense.eval()(ids)
        adapted = q.eval()(ids)
        merge_lora(q)
        merged = q(ids)
    # The merge re-quantizes the adapted weights: one more NF4 rounding, so the logits move by about
    # as much as quantizing the dense model moved them (measured here: 1.21x).
    quant_noise = (adapted - dense_logits).norm()
    assert (merged - adapted).norm() <= 1.5 * quant_noise


def _write(tmp_path, cfg, tensors):
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("extra,match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "biases"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
    ({"peft_type": "IA3"}, "only LORA"),
])
def test_unsupported_peft_features_are_refused(tmp_path, extra, match):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], **extra}
    d = _write(tmp_path, cfg, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)})
    with pytest.raises(EngineError, match=match):
        read_adapter(d)


def test_errors_name_the_problem(tmp_path):
    path = _save_hf(_tiny_hf("mistral"), tmp_path / "base")
    ours, _ = engine.load(path, dtype=torch.float32, device="cpu")
    with pytest.raises(EngineError, match="adapter_config.json"):
        load_adapter(ours, tmp_path / "nowhere")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    pre = "base_model.model.model.layers.0.self_attn.q_proj."
    bad_size = _write(tmp_path / "size", cfg, {pre + "lora_A.weight": torch.zeros(2, 32),
                                               pre + "lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(EngineError, match="another size"):
        load_adapter(ours, bad_size)
    other = _write(tmp_path / "other", cfg, {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
                                             "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(EngineError, match="another model"):
        load_adapter(ours, other)
    half = _write(tmp_path / "half", cfg, {pre + "lora_A.weight": torch.zeros(2, 64)})
    with pytest.raises(EngineError, match="not both"):
        load_adapter(ours, half)
