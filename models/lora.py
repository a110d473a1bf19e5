"""LoRA adapters on any linear layer (bf16/fp32 `nn.Linear` or `NF4Linear` base), PEFT-compatible.

y = base(x) + scale * B(A(dropout(x))), A (r, in) Kaiming-uniform, B (out, r) zeros, scale =
alpha / r (alpha / sqrt(r) with rslora). Parameter names `lora_A.weight` / `lora_B.weight` sit
where PEFT puts them, so an adapter state dict maps to PEFT keys by prefixing
`base_model.model.`.

Merging: `merge()` adds scale * B A into a floating-point base weight and `unmerge()` takes it
out again. An NF4 base cannot absorb the update exactly: `merge()` on one dequantizes, adds the
update and re-quantizes (a lossy step, like PEFT's merge into bitsandbytes 4-bit layers), and
`unmerge()` is refused for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import EngineError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("w1", "w2", "w3")
NEVER_TARGET = ("gate", "lm_head")  # the MoE router and the output head stay frozen


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise EngineError(f"lora_r must be a positive integer, got {r}.")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout_p = dropout
        # Adapters are fp32 master weights whatever the base dtype; forward casts them to x's.
        device = _weight_like(base).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_parameters()
        self.merged = False

    def reset_parameters(self):
        # PEFT's init: A Kaiming-uniform with a=sqrt(5) (nn.Linear's default), B zeros.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self):
        """The base's weight (so code that inspects `.weight` still finds the frozen base)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        fused = _fused_forward(self, x)
        if fused is not None:
            return fused
        y = self.base(x)
        xd = F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(xd, a), b) * self.scale

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if hasattr(self.base, "quantize_"):  # NF4: dequantize, add, re-quantize (lossy)
            w = self.base.dequantize().float() + self.delta_weight().float()
            self.base.quantize_(w.to(self.base.compute_dtype))
        else:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if hasattr(self.base, "quantize_"):
            raise EngineError("cannot unmerge a LoRA merged into an NF4 base (re-quantization is lossy); "
                              "reload the base model instead.")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False


def _weight_like(base: nn.Module) -> torch.Tensor:
    for name in ("weight", "absmax"):
        t = getattr(base, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return next(base.parameters())


def _fused_forward(layer: LoRALinear, x: torch.Tensor):
    """The fused Triton LoRA path on CUDA, when kernels.lora provides it; None otherwise."""
    if not x.is_cuda:
        return None
    try:
        from kernels.lora import lora_linear
    except ImportError:
        return None
    return lora_linear(x, layer)


def _matches(name: str, targets) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in targets and leaf not in NEVER_TARGET


def inject_lora(model: nn.Module, r: int = 16, alpha: float = 64, dropout: float = 0.1,
                targets=DEFAULT_TARGETS, rslora: bool = False) -> list[str]:
    """Wrap every linear layer whose leaf name is in `targets` with a LoRALinear.

    Freezes everything else. Returns the wrapped module names. `targets` may include the MoE
    experts' w1/w2/w3; the router `gate` and `lm_head` are never wrapped.
    """
    targets = tuple(targets)
    bad = [t for t in targets if t in NEVER_TARGET]
    if bad:
        raise EngineError(f"lora_targets {bad} are not allowed: the router and lm_head stay frozen.")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if _matches(n, targets) and not isinstance(m, LoRALinear) and hasattr(m, "in_features")]
    if not names:
        raise EngineError(f"lora_targets {list(targets)} match no linear layer of this model; "
                          f"valid leaf names include {sorted(_linear_leaf_names(model))}.")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, rslora))
    return names


def _linear_leaf_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "in_features")}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under the model's own module names."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.unmerge()
