"""Tiny models and data for fast tests: a random model directory with a byte-level tokenizer."""
import csv
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from models.config import ModelConfig
from models.transformer import Transformer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>"]


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte, plus three special tokens (ids 256-258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def make_tiny_model_dir(path: Path, preset: str = "tiny-dense", seed: int = 0, std: float = 0.02) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_preset(preset)
    cfg.vocab_size = 259
    cfg.bos_token_id, cfg.eos_token_id = 256, 257
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf()))
    byte_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    return path


ROWS = [
    ("The meeting is at noon.", "Make it formal.", "The meeting shall convene at twelve o'clock."),
    ("I like cats.", "Make it a pirate line.", "Arr, I be fond o' cats!"),
    ("Rain fell all day.", "Make it a haiku.", "Grey rain all day long / soft drums on the roof"),
    ("Buy milk and eggs.", "Make it polite.", "Could you please buy milk and eggs?"),
    ("The team won.", "Make it excited.", "The team WON! What a day!"),
    ("Close the door.", "Make it a question.", "Would you close the door?"),
]


def write_tiny_dataset(path: Path, n: int = 24, split: bool = True) -> Path:
    """A small CSV in the bundled schema; rows repeat the six pairs with numbered variations."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["id", "original_text", "rewrite_prompt", "rewritten_text", "analysis"]
        w.writerow(header + (["split"] if split else []))
        for i in range(n):
            orig, prompt, new = ROWS[i % len(ROWS)]
            row = [f"r{i}", f"{orig} ({i})", prompt, f"{new} ({i})", f"The text changed: {prompt.lower()}"]
            w.writerow(row + ([("train", "train", "train", "valid")[i % 4]] if split else []))
    return path
