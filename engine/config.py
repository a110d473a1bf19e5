"""Training configuration: one dataclass, recipes as Python files, `--key=value` overrides.

A recipe file defines `config = TrainConfig(...)`. Overrides on the command line are parsed with
`ast.literal_eval` (falling back to the raw string) and type-checked against the field's
default, as nanoGPT's configurator does; an unknown key is an error that lists the valid keys.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError


@dataclass
class TrainConfig:
    # what to train
    model: str = "smollm2-135m-instruct"  # a local dir, an embedded model name, or a Hub repo id
    quantize: str | None = None  # None or "nf4" (router and lm_head stay bf16)
    data: list = field(default_factory=lambda: ["bundled"])  # dataset names under data_dir, or "bundled"
    data_dir: str = "data"
    data_fraction: float = 1.0  # use this fraction of each dataset (v1 used half)
    columns: dict = field(default_factory=dict)  # column mapping, e.g. {"rewrite_prompt": "gpt4_prompt"}
    valid_fraction: float = 0.1  # held out for validation when the data has no split column
    output_type: str = "prompt"  # "prompt" or "cot"
    prompt_format: str = "auto"  # "mistral" ([INST]), "chat_template", or "auto"
    loss: str = "completions"  # "completions" or "full"
    max_seq_length: int = 640
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False
    # optimization
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 30
    batch_size: int = 8
    grad_accum: int = 2
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    gradient_checkpointing: bool = False
    # evaluation and outputs
    eval_every: int = 50  # optimizer steps; 0 disables periodic evaluation
    eval_metric_rows: int = 16  # rows of the validation split scored with the task metric
    eval_max_new_tokens: int = 48
    output_dir: str = "runs/default"
    save_every: int = 0  # optimizer steps between checkpoints (0: only at evaluations and the end)
    resume: bool = False
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16"
    num_threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self):
        checks = [
            (self.loss in ("completions", "full"), f"loss must be 'completions' or 'full', got {self.loss!r}"),
            (self.output_type in ("prompt", "cot"), f"output_type must be 'prompt' or 'cot', got {self.output_type!r}"),
            (self.prompt_format in ("auto", "mistral", "chat_template"),
             f"prompt_format must be 'auto', 'mistral' or 'chat_template', got {self.prompt_format!r}"),
            (self.quantize in (None, "nf4"), f"quantize must be None or 'nf4', got {self.quantize!r}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (0 < self.data_fraction <= 1, f"data_fraction must be in (0, 1], got {self.data_fraction}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.max_seq_length >= 16, f"max_seq_length must be >= 16, got {self.max_seq_length}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EngineError(msg + ".")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls(**json.loads(text))


def study_config(**changes) -> TrainConfig:
    """The settings v1-v6 of the original study share, with one version's changes applied.

    Mixtral-8x7B-Instruct-v0.1 in NF4 with double quant (router and lm_head bf16); LoRA r=16,
    alpha=64, dropout 0.1 on q/k/v/o; lr 2e-5, batch 8 with gradient accumulation 2, 30 warmup
    steps, linear schedule, one epoch; the Mistral [INST] format; 10% held out for validation.
    """
    base = TrainConfig(
        model="mistralai/Mixtral-8x7B-Instruct-v0.1", quantize="nf4", prompt_format="mistral",
        lora_r=16, lora_alpha=64.0, lora_dropout=0.1, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"],
        lr=2e-5, batch_size=8, grad_accum=2, warmup_steps=30, epochs=1.0, valid_fraction=0.1,
        gradient_checkpointing=True, eval_every=50,
    )
    return dataclasses.replace(base, **changes).validate()


def load_recipe(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        recipes = sorted(p.name for p in Path("recipes").glob("*.py")) if Path("recipes").is_dir() else []
        raise EngineError(f"recipe {str(path)!r} not found" +
                          (f"; recipes here: {', '.join(recipes)}." if recipes else "."))
    namespace = runpy.run_path(str(path))
    cfg = namespace.get("config")
    if not isinstance(cfg, TrainConfig):
        raise EngineError(f"recipe {path} must define `config = TrainConfig(...)`.")
    return cfg


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --model=mistral-7b


def apply_overrides(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    """Apply `--key=value` overrides, type-checked against the current value's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    updates = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise EngineError(f"bad argument {arg!r}: overrides look like --key=value (e.g. --lr=1e-4).")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            raise EngineError(f"unknown config key {key!r}. Valid keys: {', '.join(sorted(fields))}.")
        value = _parse_value(text)
        current = getattr(cfg, key)
        value = _coerce(key, value, current, text)
        updates[key] = value
    return dataclasses.replace(cfg, **updates).validate()


def _coerce(key, value, current, text):
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(current, list) and isinstance(value, (str, tuple)):
        return [value] if isinstance(value, str) else list(value)
    elif isinstance(value, type(current)) and not (isinstance(value, bool) and not isinstance(current, bool)):
        return value
    raise EngineError(
        f"--{key}={text}: expected a {type(current).__name__} (like {current!r}), "
        f"got a {type(value).__name__}."
    )
