"""Loading Hugging Face safetensors checkpoints into `models.Transformer`, tensor by tensor.

The model is built on the meta device; each checkpoint tensor is read (memory-mapped), cast,
moved to the target device and assigned, or quantized there when its module is an NF4Linear.
Host memory therefore peaks near one tensor, never at the whole model.

Both Mixtral expert layouts load: per-expert `block_sparse_moe.experts.E.w1/w2/w3`, and
transformers v5's fused `mlp.experts.gate_up_proj` (E, 2I, C) / `down_proj` (E, C, I) with the
router at `mlp.gate`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import EngineError
from models.config import ModelConfig
from models.transformer import Transformer

# Keys in some checkpoints that carry no weights of ours.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.masked_bias)$")
# bitsandbytes' serialized quant-state suffixes of a 4-bit weight.
BNB_SUFFIXES = ("weight.absmax", "weight.quant_map", "weight.nested_absmax",
                "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards an index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise EngineError(f"{index} is malformed ({e}); re-download the checkpoint.") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise EngineError(f"{index} names shards that are missing: {missing}; finish the download.")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if found:
        return [model_dir / f for f in found]
    hint = ""
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        hint = (" Only PyTorch .bin weights are there: convert them once with transformers "
                "(`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`).")
    raise EngineError(f"no model.safetensors (or model.safetensors.index.json) in {model_dir}.{hint}")


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                yield key, sf.get_tensor(key)


def normalize_keys(key: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Map one checkpoint tensor to (our key, tensor) pairs: the fused v5 experts split per expert."""
    if cfg.is_moe and ".mlp." in key:
        key = key.replace(".mlp.", ".block_sparse_moe.")
        if key.endswith(".experts.gate_up_proj"):  # (E, 2I, C): w1 rows then w3 rows
            prefix = key[: -len("gate_up_proj")]
            w1, w3 = tensor.chunk(2, dim=1)
            return [p for e in range(tensor.shape[0])
                    for p in ((f"{prefix}{e}.w1.weight", w1[e]), (f"{prefix}{e}.w3.weight", w3[e]))]
        if key.endswith(".experts.down_proj"):  # (E, C, I)
            prefix = key[: -len("down_proj")]
            return [(f"{prefix}{e}.w2.weight", tensor[e]) for e in range(tensor.shape[0])]
    return [(key, tensor)]


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    try:
        return model.get_submodule(module_name), attr
    except AttributeError:
        return None, attr


def load_weights(model: Transformer, model_dir: Path, dtype: torch.dtype, device: torch.device):
    """Stream every tensor of the checkpoint in `model_dir` into the meta-built `model`."""
    cfg = model.config
    nf4_class = _nf4_class(model)
    files = weight_files(model_dir)
    bnb_pending: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for raw_key, tensor in iter_checkpoint(files):
        if _IGNORED.search(raw_key):
            continue
        for key, t in normalize_keys(raw_key, tensor, cfg):
            bnb = next((s for s in BNB_SUFFIXES if key.endswith("." + s)), None)
            if bnb is not None:  # a bitsandbytes quant-state tensor: gather it per module
                bnb_pending.setdefault(key[: -len(bnb) - 1], {})[bnb] = t
                continue
            module, attr = _owner(model, key)
            if nf4_class is not None and isinstance(module, nf4_class) and attr == "weight":
                if t.dtype == torch.uint8:  # already packed NF4: completed by its quant state
                    bnb_pending.setdefault(key[: -len(".weight")], {})["weight"] = t
                else:
                    _check_shape(raw_key, key, tuple(t.shape), (module.out_features, module.in_features))
                    module.quantize_(t.to(device=device, dtype=dtype))
            elif module is not None and (attr in module._parameters or attr in module._buffers):
                _assign(module, attr, t, raw_key, key, dtype, device)
            else:
                unexpected.append(raw_key)
    for mod_name, tensors in bnb_pending.items():
        module, _ = _owner(model, mod_name + ".weight")
        if nf4_class is None or not isinstance(module, nf4_class):
            raise EngineError(
                f"{mod_name}: the checkpoint holds a bitsandbytes 4-bit weight, but this module is "
                "not quantized; load with quantize='nf4'."
            )
        module.load_quantized_({k: v.to(device) for k, v in tensors.items()})
    if unexpected:
        print(f"[engine.load] ignored {len(unexpected)} checkpoint tensors with no place in the "
              f"model, e.g. {unexpected[:3]}")
    model.tie_weights()
    _check_complete(model, model_dir)


def _nf4_class(model: nn.Module):
    """NF4Linear if the model holds any (imported lazily: dense loading does not need it)."""
    for m in model.modules():
        if type(m).__name__ == "NF4Linear":
            return type(m)
    return None


def _check_shape(raw_key: str, key: str, got: tuple, want: tuple):
    if got != want:
        raise EngineError(
            f"tensor {raw_key!r} has shape {list(got)}, but the model built from config.json "
            f"expects {list(want)} for {key!r}: config.json and the weights disagree; use the "
            "config.json that came with these weights."
        )


def _assign(module: nn.Module, attr: str, t: torch.Tensor, raw_key: str, key: str, dtype, device):
    current = getattr(module, attr)
    _check_shape(raw_key, key, tuple(t.shape), tuple(current.shape))
    if t.is_floating_point():
        t = t.to(dtype)
    t = t.to(device)
    if isinstance(current, nn.Parameter):
        module._parameters[attr] = nn.Parameter(t, requires_grad=current.requires_grad)
    else:
        module._buffers[attr] = t


def _check_complete(model: nn.Module, model_dir: Path):
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise EngineError(
            f"the checkpoint in {model_dir} is missing tensors {missing[:5]}{more}; "
            "the download may be incomplete, or config.json does not match the weights."
        )


def build_model(cfg: ModelConfig, model_dir: Path, *, dtype: torch.dtype, device: torch.device,
                quantize: str | None = None, quantize_skip=("gate", "lm_head")) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    if quantize is not None:
        if quantize != "nf4":
            raise EngineError(f"quantize={quantize!r} is not supported; use quantize='nf4' or None.")
        from models.nf4 import replace_linears_with_nf4

        replace_linears_with_nf4(model, skip=quantize_skip, compute_dtype=dtype)
    load_weights(model, model_dir, dtype, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
