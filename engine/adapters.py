"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.` + module name + `.lora_A.weight` / `.lora_B.weight` (fp32),
so an adapter trained here loads into transformers + peft (`PeftModel.from_pretrained`) and a
PEFT-trained one loads here (`load_adapter`). Checked against peft 0.21.2.

Loading is driven by the tensors, not by re-matching target_modules: each module named in the file
gets a LoRA of the rank its lora_A has, with PEFT's alpha (`alpha_pattern` first, then
`lora_alpha`), so `rank_pattern`, `alpha_pattern` and `layers_to_transform` adapters load as
PEFT would load them. Features this engine does not run (DoRA, LoRA biases, modules_to_save,
embedding LoRAs, `target_parameters` for fused experts) are refused with the reason.

Adapters on the MoE experts (w1/w2/w3) use the per-expert module names of Mixtral checkpoints
(`block_sparse_moe.experts.E.w1`); transformers v5 fuses the experts into 3-D parameters, which
PEFT reaches only through `target_parameters`, so such adapters load into transformers 4.x + peft.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.errors import EngineError
from models.lora import lora_layers, lora_state_dict, matches_target, merge_lora, wrap_modules

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """PEFT's LoraConfig fields for the model's LoRA layers (peft 0.21.2 reads every one)."""
    layers = lora_layers(model)
    if not layers:
        raise EngineError("the model has no LoRA layers to save; call inject_lora first.")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    flags = {(m.dropout_p, m.rslora) for m in layers.values()}
    if len(flags) > 1:
        raise EngineError(f"the LoRA layers mix dropout/rslora settings {sorted(flags)}; PEFT's format "
                          "holds one setting per adapter.")
    dropout, rslora = flags.pop()
    # Leaf names when they select exactly the wrapped layers (the usual case), else full names.
    leaves = sorted({_leaf(n) for n in layers})
    linear = [n for n, m in model.named_modules()
              if hasattr(m, "in_features") and not any(n.startswith(w + ".") for w in layers)]
    selected = {n for n in linear if any(matches_target(n, t) for t in leaves)}
    targets = leaves if selected == set(layers) else sorted(layers)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": targets,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None):
    """Write the adapter atomically (temp files, then rename), so an interruption never leaves half."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, base_model)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in lora_state_dict(model).items()}
    tmp_w, tmp_c = out / "adapter_model.safetensors.tmp", out / "adapter_config.json.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(cfg, indent=2))
    tmp_w.replace(out / "adapter_model.safetensors")
    tmp_c.replace(out / "adapter_config.json")


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT LoRA directory; refuses what this engine cannot run."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else "no such directory"
        hint = " (a .bin adapter: re-save it with safe_serialization=True)" if (d / "adapter_model.bin").is_file() else ""
        raise EngineError(f"{d}: an adapter directory holds adapter_config.json and adapter_model.safetensors "
                          f"(PEFT's format); found {found}{hint}.")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise EngineError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA).")
    unsupported = [
        (cfg.get("use_dora"), "use_dora: DoRA adapters are not supported"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r}: adapters that train biases are not supported"),
        (cfg.get("lora_bias"), "lora_bias: LoRA biases are not supported"),
        (cfg.get("modules_to_save"), f"modules_to_save={cfg.get('modules_to_save')}: fully trained modules "
                                     "are not supported, only LoRA layers"),
        (cfg.get("target_parameters"), f"target_parameters={cfg.get('target_parameters')}: LoRA on raw "
                                       "parameters (transformers v5 fused experts) is not supported; target "
                                       "modules instead"),
        (cfg.get("layer_replication"), "layer_replication is not supported"),
    ]
    for bad, why in unsupported:
        if bad:
            raise EngineError(f"{cfg_path}: {why}.")
    return cfg, load_file(str(w_path))


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", name)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def adapter_modules(cfg: dict, tensors: dict[str, torch.Tensor], where) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": lora_A, "B": lora_B} from PEFT keys (adapter-name infix tolerated)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA_KEY.match(name)
        if m is None:
            raise EngineError(f"{where}: tensor {key!r} is not a LoRA A/B weight (embedding LoRAs, biases "
                              "and other PEFT extras are not supported).")
        modules.setdefault(m["module"], {})[m["which"]] = value
    for name, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise EngineError(f"{where}: module {name!r} has lora_{''.join(pair)} but not both A and B.")
        if pair["A"].dim() != 2 or pair["B"].dim() != 2 or pair["A"].shape[0] != pair["B"].shape[1]:
            raise EngineError(f"{where}: {name!r} has lora_A {list(pair['A'].shape)} and lora_B "
                              f"{list(pair['B'].shape)}; they must be (r, in) and (out, r).")
    return modules


def load_adapter(model: nn.Module, adapter_dir: str | Path, merge: bool = False) -> dict:
    """Put the adapter's LoRA layers on `model` and load its weights; optionally merge them.

    A model that already has LoRA layers (a resumed run) must have exactly the adapter's.
    Returns the adapter's config.
    """
    cfg, tensors = read_adapter(adapter_dir)
    modules = adapter_modules(cfg, tensors, adapter_dir)
    existing = lora_layers(model)
    if not existing:
        known = dict(model.named_modules())
        missing = [n for n in modules if n not in known]
        if missing:
            raise EngineError(
                f"adapter in {adapter_dir} names modules this model lacks, e.g. {missing[:3]}: the adapter was "
                "trained for another model; load it with the base model named in its adapter_config.json "
                f"({cfg.get('base_model_name_or_path')!r})."
            )
        for name, pair in modules.items():
            base = known[name]
            want = (base.out_features, base.in_features) if hasattr(base, "in_features") else None
            got = (pair["B"].shape[0], pair["A"].shape[1])
            if want is not None and got != want:
                raise EngineError(f"adapter tensor for {name!r} maps {got[1]} -> {got[0]} features, the model's "
                                  f"layer {want[1]} -> {want[0]}: the adapter was trained for a model of another size.")
        ranks = {n: (int(p["A"].shape[0]), _pattern_value(cfg.get("alpha_pattern") or {}, n, cfg["lora_alpha"]))
                 for n, p in modules.items()}
        wrap_modules(model, ranks, dropout=cfg.get("lora_dropout", 0.0), rslora=cfg.get("use_rslora", False))
    elif set(existing) != set(modules):
        extra, lacking = sorted(set(modules) - set(existing)), sorted(set(existing) - set(modules))
        raise EngineError(f"adapter in {adapter_dir} does not match this model's LoRA layers (adapter only: "
                          f"{extra[:3]}, model only: {lacking[:3]}): it was trained with other lora_targets.")
    layers = lora_layers(model)
    with torch.no_grad():
        for name, pair in modules.items():
            layer = layers[name]
            for which, param in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight)):
                if tuple(pair[which].shape) != tuple(param.shape):
                    raise EngineError(f"adapter tensor {name}.lora_{which} has shape {list(pair[which].shape)}, the "
                                      f"model expects {list(param.shape)}: another rank or model size.")
                param.copy_(pair[which].to(param.dtype))
    if merge:
        merge_lora(model)
    return cfg
