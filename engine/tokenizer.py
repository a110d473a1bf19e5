"""The tokenizer: `tokenizer.json` through `tokenizers`, plus `tokenizer_config.json`.

From the config it takes the special tokens (bos/eos/pad) and the chat template, rendered with
jinja2 the way transformers renders it, so prompts match what the model was trained on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from engine.errors import EngineError


def _token_str(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None, special_tokens_map: dict | None = None):
        self._tok = tok
        self.config = config or {}
        merged = {**(special_tokens_map or {}), **self.config}
        self.bos_token = _token_str(merged.get("bos_token"))
        self.eos_token = _token_str(merged.get("eos_token"))
        self.pad_token = _token_str(merged.get("pad_token"))
        self.unk_token = _token_str(merged.get("unk_token"))
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._compiled_template = None

    # ---- construction ----
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise EngineError(
                f"{tj} not found: this engine reads tokenizers in the `tokenizers` JSON format. "
                "Save one with transformers (`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)."
            )
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise EngineError(f"{tj} could not be read by `tokenizers` ({e}).") from None
        config = cls._read_json(path / "tokenizer_config.json")
        special = cls._read_json(path / "special_tokens_map.json")
        if "chat_template" not in config and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        return cls(tok, config, special)

    @staticmethod
    def _read_json(p: Path) -> dict:
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EngineError(f"{p} is not valid JSON ({e}).") from None

    def save(self, out_dir: str | Path):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        config = dict(self.config)
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    @staticmethod
    def copy_files(src: str | Path, dst: str | Path):
        """Copy the tokenizer files of a model directory (used by converters)."""
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):
            if (Path(src) / name).is_file():
                shutil.copy(Path(src) / name, Path(dst) / name)

    # ---- ids ----
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        """Padding is masked out of attention and loss, so any id works; never None."""
        for tok in (self.pad_token, self.eos_token, self.unk_token):
            i = self.token_to_id(tok)
            if i is not None:
                return i
        return 0

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ---- text ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise EngineError(
                "this tokenizer has no chat_template (tokenizer_config.json); use the Mistral "
                "[INST] format instead (format='mistral')."
            )
        if self._compiled_template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            self._compiled_template = env.from_string(self.chat_template)
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            pad_token=self.pad_token or "", unk_token=self.unk_token or "",
        )
