"""GGUF reading: dequantization against gguf's reference, the Q/K un-permutation, the tokenizer,
and whole conversions of tiny synthetic Llamas written the way llama.cpp writes them."""
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import engine
from engine import gguf as eg
from engine.convert import main as convert_main
from engine.errors import EngineError

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# A tiny Llama written as a GGUF the way llama.cpp's convert_hf_to_gguf.py writes it.

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GGUF_LAYER_NAMES = {  # HF module -> llama.cpp tensor name, written out independently of engine.gguf
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_vocab():
    """Specials, the 256 byte symbols, then one token per merge: (tokens, token types)."""
    tokens = SPECIALS + [eg.byte_alphabet()[b] for b in range(256)]
    tokens += [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, restated."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(seed=0, tie=False) -> LlamaForCausalLM:
    tokens, _ = tiny_vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms too, so a swapped norm would show
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path, model: LlamaForCausalLM, quant: dict | None = None, pre="smollm"):
    """Write `model` as llama.cpp does: GGUF names, Q/K rows permuted, F32 unless `quant` maps a
    GGUF tensor-name suffix (e.g. 'attn_q.weight') to a quantization type."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, layer, *module, suffix = name.split(".")
            gname = f"blk.{layer}.{GGUF_LAYER_NAMES['.'.join(module)]}.{suffix}"
            if "q_proj" in name:
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif "k_proj" in name:
                a = llama_cpp_permute(a, c.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        qtype = next((q for suffix, q in (quant or {}).items() if gname.endswith(suffix)), None)
        if qtype is None:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved by transformers, its F32 GGUF, and our conversion of that GGUF."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    model = tiny_llama()
    model.save_pretrained(root / "hf")
    path = write_tiny_gguf(root / "tiny.gguf", model)
    convert_main(["gguf", str(path), str(root / "converted"), "--dtype", "float32"])
    return model, path, root / "converted"


IDS = torch.tensor([[5, 80, 120, 7, 260, 3, 99, 200, 31, 264, 1, 2]])

# ---------------------------------------------------------------------------------------------
# Dequantization


def _random_blocks(rng, n_blocks, block_bytes, scale_offsets):
    """Random quantized blocks with finite random fp16 scales at `scale_offsets`."""
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        scales = rng.normal(0, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype,block_bytes,scales", [
    (Q.Q4_1, 20, (0, 2)), (Q.Q8_0, 34, (0,)), (Q.Q4_0, 18, (0,))])
def test_block_dequant_equals_gguf_reference(qtype, block_bytes, scales):
    rng = np.random.default_rng(0)
    rows, cols = 7, 96  # 3 blocks per row
    data = _random_blocks(rng, rows * cols // 32, block_bytes, scales).reshape(rows, -1)
    ours = eg.dequantize(data, qtype.name, (rows, cols))
    ref = gguf.quants.dequantize(data, qtype)
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.F32])
def test_float_types_equal_gguf_reference(qtype):
    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    np.testing.assert_array_equal(eg.dequantize(raw, qtype.name, (5, 64)),
                                  gguf.quants.dequantize(raw, qtype).reshape(5, 64))


def test_quantized_tensors_convert_like_transformers(tmp_path):
    """Q8_0/Q4_1/Q4_0/F16 tensors in a file: our state dict equals transformers' GGUF loader's."""
    model = tiny_llama(seed=1)
    quant = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q8_0,
             "ffn_down.weight": Q.Q4_1, "ffn_up.weight": Q.Q4_0, "attn_v.weight": Q.F16}
    path = write_tiny_gguf(tmp_path / "q.gguf", model, quant)
    reader = eg.open_gguf(path)
    config = eg.hf_config(eg.read_metadata(reader), {t.name for t in reader.tensors})
    ours = eg.state_dict(reader, config, torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).state_dict()
    assert set(ours) == set(ref)
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)
    # and the quantization really happened (Q4_1 differs from the fp32 original)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           model.state_dict()["model.layers.0.self_attn.q_proj.weight"])


# ---------------------------------------------------------------------------------------------
# Q/K permutation


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(2).normal(size=(3 * 64, 40)).astype(np.float32)  # 3 heads of 64
    bias = np.arange(3 * 64, dtype=np.float32)
    for a in (w, bias):
        permuted = llama_cpp_permute(a, 3)
        assert not np.array_equal(permuted, a)
        np.testing.assert_array_equal(eg.permute_qk(torch.from_numpy(a), 3).numpy(), permuted)
        np.testing.assert_array_equal(eg.unpermute_qk(torch.from_numpy(permuted), 3).numpy(), a)


def test_tiny_gguf_gives_identical_logits(tiny):
    """transformers on the original weights == transformers on our conversion of the GGUF."""
    model, path, converted = tiny
    ours = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_tiny_gguf_written_as_llama_cpp_does(tiny):
    """transformers' own GGUF loader reads our test file back to the same model, so the test
    writer (and the permutation the converter inverts) is llama.cpp's layout."""
    model, path, _ = tiny
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_engine_loads_tiny_conversion(tiny):
    model, _, converted = tiny
    ours, tok = engine.load(converted, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), model(IDS).logits, rtol=1e-4, atol=1e-4)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_converted_files(tiny):
    model, _, converted = tiny
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 10000.0
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok_config["add_bos_token"] is False
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tied_embeddings_and_bf16_default(tmp_path):
    model = tiny_llama(seed=3, tie=True)
    path = write_tiny_gguf(tmp_path / "tied.gguf", model)
    convert_main(["gguf", str(path), str(tmp_path / "out")])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():  # bf16 weights: close, not equal
        torch.testing.assert_close(ours(IDS).logits, model(IDS).logits, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tiny_tokenizer(tiny):
    _, _, converted = tiny
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(converted)
    text = "<|im_start|>user\nthe  cat in  2024<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    tokens, _ = tiny_vocab()
    pieces = [tokens[i] for i in ids]
    assert pieces[0] == "<|im_start|>" and pieces[-1] == "<|im_end|>"  # specials stay whole
    # Merges apply. "smollm" splits digits off first, so the two spaces before 2024 stay one
    # piece ("ĠĠ"), while the space before "cat" goes with it (GPT-2's regex).
    assert pieces[1:-1] == ["u", "s", "e", "r", "Ċ", "t", "he", "Ġ", "Ġ", "c", "a", "t", "Ġ", "in",
                            "ĠĠ", "2", "0", "2", "4"]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nthe  cat in  2024"
    assert tok.encode(text) == ids  # no BOS added: add_bos_token is false


def test_tokenizer_adds_bos_when_the_file_says_so():
    tokens, types = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": MERGES,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": True}
    tk, config = eg.build_tokenizer(meta)
    assert tk.encode("the").ids[0] == 1 and config["add_bos_token"] is True
    assert tk.encode("the", add_special_tokens=False).ids[0] != 1


def test_byte_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers

    table = eg.byte_alphabet()
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


# ---------------------------------------------------------------------------------------------
# Errors


def test_unsupported_inputs_raise_engine_errors(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        eg.open_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(EngineError, match="not a readable GGUF"):
        eg.open_gguf(tmp_path / "junk.gguf")
    with pytest.raises(EngineError, match="architecture 'qwen2'"):
        eg.hf_config({"general.architecture": "qwen2"}, set())
    with pytest.raises(EngineError, match="mixture-of-experts"):
        eg.hf_config({"general.architecture": "llama", "llama.expert_count": 8}, set())
    with pytest.raises(EngineError, match="tokenizer.ggml.model = 'llama'"):
        eg.build_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(EngineError, match="tokenizer.ggml.pre = 'mystery'"):
        eg.build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
                            "tokenizer.ggml.tokens": ["a"]})
    assert eg.hf_name("rope_freqs.weight") is None and eg.hf_name("blk.0.attn_q.bias").endswith("q_proj.bias")


def test_unsupported_tensor_type_names_tensor_and_fix():
    class FakeTensor:
        name, tensor_type, shape, data = "blk.0.ffn_up.weight", Q.Q4_K, np.array([256, 4]), None

    with pytest.raises(EngineError, match=r"blk\.0\.ffn_up\.weight.*Q4_K.*llama-quantize"):
        eg.tensor_to_torch(FakeTensor)


def test_cli_refuses_non_empty_out_dir_without_traceback(tiny, tmp_path):
    _, path, _ = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(EngineError, match="not empty"):
        convert_main(["gguf", str(path), str(tmp_path / "out")])
    done = subprocess.run([sys.executable, "-m", "engine.convert", "gguf", str(tmp_path / "no.gguf"),
                           str(tmp_path / "o2")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no.gguf not found" in done.stderr
