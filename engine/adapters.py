"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.` + module name + `.lora_A.weight` / `.lora_B.weight`, so an
adapter trained here loads into transformers + peft and a PEFT-trained one loads here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import EngineError
from models.lora import inject_lora, lora_layers, lora_state_dict

PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise EngineError("the model has no LoRA layers to save; call inject_lora first.")
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout_p,
        "use_rslora": first.scale != first.alpha / first.r,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None):
    """Write the adapter atomically (temp files, then rename), so an interruption never leaves half."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in lora_state_dict(model).items()}
    tmp_w, tmp_c = out / "adapter_model.safetensors.tmp", out / "adapter_config.json.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(adapter_config(model, base_model), indent=2))
    tmp_w.replace(out / "adapter_model.safetensors")
    tmp_c.replace(out / "adapter_config.json")


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise EngineError(f"{p} not found: an adapter directory holds adapter_config.json and "
                              "adapter_model.safetensors (PEFT's format).")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise EngineError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA).")
    if cfg.get("use_dora"):
        raise EngineError(f"{cfg_path}: DoRA adapters are not supported.")
    return cfg, load_file(str(w_path))


def load_adapter(model: nn.Module, adapter_dir: str | Path, merge: bool = False) -> dict:
    """Inject LoRA layers as the adapter's config says and load its weights; optionally merge."""
    cfg, tensors = read_adapter(adapter_dir)
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # PEFT also allows a regex; take the leaf names it lists
        raise EngineError(f"{adapter_dir}: target_modules as a regex ({targets!r}) is not supported; "
                          "list the module names.")
    if not lora_layers(model):
        inject_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                    targets=targets, rslora=cfg.get("use_rslora", False))
    ours = lora_state_dict(model)
    state = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if name not in ours:
            raise EngineError(
                f"adapter tensor {key!r} from {adapter_dir} matches no LoRA layer of this model: "
                "the adapter was trained for another model; load it with the base model named in "
                f"its adapter_config.json ({cfg.get('base_model_name_or_path')!r})."
            )
        if tuple(value.shape) != tuple(ours[name].shape):
            raise EngineError(
                f"adapter tensor {key!r} has shape {list(value.shape)}, the model expects "
                f"{list(ours[name].shape)}: the adapter was trained for a model of another size."
            )
        state[name] = value
    missing = sorted(set(ours) - set(state))
    if missing:
        raise EngineError(f"adapter in {adapter_dir} lacks tensors for {missing[:3]}...: it does not "
                          "match this model's LoRA layers.")
    model.load_state_dict(state, strict=False)
    if merge:
        from models.lora import merge_lora

        merge_lora(model)
    return cfg
