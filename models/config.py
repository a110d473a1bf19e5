"""Model configuration for the Llama / Mistral / Mixtral family.

Field names are transformers' own, so a `config.json` maps onto `ModelConfig` key for key and
`to_hf()` writes one that transformers reads back.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_local_experts: int = 0  # 0: a dense SwiGLU MLP; > 0: a Mixtral sparse-MoE block
    num_experts_per_tok: int = 2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept as-is

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise EngineError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}); fix config.json."
            )

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    # ---- transformers config.json ----
    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise EngineError(
                f"{source}: model_type {model_type!r} is not supported; this engine runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert the model or pick a supported one."
            )
        rope_scaling = d.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise EngineError(
                f"{source}: rope_scaling {rope_scaling!r} is not supported (only plain RoPE); "
                "remove it from config.json if the model was not trained with it."
            )
        if d.get("mlp_bias"):
            raise EngineError(f"{source}: mlp_bias=true is not supported.")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d[k] for k in names if k in d and k != "model_type"}
        # rope_theta sits under rope_parameters in transformers v5 configs.
        rope_params = d.get("rope_parameters") or {}
        if "rope_theta" not in kwargs and "rope_theta" in rope_params:
            kwargs["rope_theta"] = rope_params["rope_theta"]
        if model_type != "mixtral":
            kwargs.pop("num_local_experts", None)
        elif not kwargs.get("num_local_experts"):
            kwargs["num_local_experts"] = 8
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise EngineError(f"{source}: missing required keys {missing}.")
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        if model_type == "llama":
            kwargs["sliding_window"] = None
        extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
        return cls(model_type=model_type, extra=extra, **kwargs)

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "mixtral": "MixtralForCausalLM"}[self.model_type]
        d["architectures"] = [arch]
        d["hidden_act"] = "silu"
        if self.model_type != "mixtral":
            d.pop("num_local_experts")
            d.pop("num_experts_per_tok")
        if self.model_type == "llama":
            d.pop("sliding_window")
        return {**self.extra, **d}

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise EngineError(
                f"{path} not found: a model directory needs a config.json (transformers layout)."
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON ({e}); re-download or rewrite it.") from None
        return cls.from_hf(d, source=str(path))

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise EngineError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}.")
        return cls(**PRESETS[name])


PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                         max_position_embeddings=32768, num_local_experts=8,
                         num_experts_per_tok=2),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                       max_position_embeddings=32768),
    "tiny-moe": dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=512,
                     num_local_experts=4, num_experts_per_tok=2),
    "tiny-dense": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512),
}
