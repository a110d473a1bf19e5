"""LoRA adapters on any linear layer (bf16/fp32 `nn.Linear` or `NF4Linear` base), PEFT-compatible.

y = base(x) + scale * B(A(dropout(x))), A (r, in) Kaiming-uniform, B (out, r) zeros, scale =
alpha / r (alpha / sqrt(r) with rslora). Parameter names `lora_A.weight` / `lora_B.weight` sit
where PEFT puts them, so an adapter state dict maps to PEFT keys by prefixing
`base_model.model.`. Layers are chosen by module name as PEFT's `target_modules` does: a target
matches a module whose name equals it or ends in "." + target ("q_proj", "w1",
"self_attn.o_proj"); the MoE router (`gate`) and `lm_head` are never wrapped.

Forward, by `CUDA_PATH` on CUDA tensors (or a layer's own `backend` attribute, on any device):
  "cublas"  (default) `kernels.lora.lora_linear(backend="cublas")`: the base GEMMs on cuBLAS over a
            transient dequantized W, the adapter in x's dtype (QLoRA's bf16-autocast numerics: the
            fp32 A and B cast once per call, fp32 accumulation, dA/dB in fp32) through two small
            Triton passes over x (dropout mask hashed, never stored) and cuBLAS beta=1 epilogues.
  "fused"   the fused Triton kernels (`backend="triton"`: the adapter in the NF4 GEMM's epilogue).
  "plain"   PyTorch, computed as PEFT computes it (x cast to the adapter's fp32, the sum cast
            back), so outputs match PEFT's; what CPU tensors always run, and CUDA tensors with at
            most SMALL_ROWS rows (decoding: the NF4 GEMV reads W once; the adapter is negligible).

Merging: `merge()` adds scale * B A into a floating-point base weight and `unmerge()` subtracts
it again (exact up to one rounding of the base dtype). An NF4 base cannot absorb the update
exactly: `merge()` on one dequantizes W to fp32, adds the update and re-quantizes to NF4 (a lossy
step, like PEFT's merge into bitsandbytes 4-bit layers). Each merged element then lies within half
an NF4 code gap of W + scale * B A: at most 0.152 x its block's absmax (the widest gap is between
-1 and -0.696), plus the 8-bit absmax's own rounding. `unmerge()` is refused for NF4: reload the
base (or keep the adapter unmerged, which costs one low-rank product per layer).
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
    backend: str | None = None  # the forward path: None = CUDA_PATH on CUDA tensors, "plain" elsewhere

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise EngineError(f"lora_r must be a positive integer, got {r}.")
        if not 0.0 <= dropout < 1.0:
            raise EngineError(f"lora_dropout must be in [0, 1), got {dropout}.")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout_p = dropout
        # Adapters are fp32 master weights whatever the base dtype (PEFT's autocast_adapter_dtype).
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
        path = _path(self, x)
        if path != "plain":
            from kernels.lora import lora_linear

            return lora_linear(x, self, backend=_KERNEL_BACKEND[path])
        y = self.base(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        xa = x.to(a.dtype)
        if self.dropout_p and self.training:
            xa = F.dropout(xa, self.dropout_p, True)
        return (y + F.linear(F.linear(xa, a), b) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if _is_nf4(self.base):  # dequantize, add, re-quantize (lossy; see the module docstring)
            w = self.base.dequantize(torch.float32) + self.delta_weight().float()
            self.base.quantize_(w.to(self.base.weight_dtype))
        else:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if _is_nf4(self.base):
            raise EngineError("cannot unmerge a LoRA merged into an NF4 base (re-quantization is lossy); "
                              "reload the base model instead.")
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout_p}, merged={self.merged}"


def _is_nf4(base: nn.Module) -> bool:
    return hasattr(base, "quantize_") and hasattr(base, "dequantize")


def _weight_like(base: nn.Module) -> torch.Tensor:
    for name in ("weight", "absmax"):
        t = getattr(base, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return next(base.parameters())


# The path LoRALinear takes on CUDA tensors (benchmarks/lora.py times all three against the peer,
# bitsandbytes + PEFT, and the frozen bf16 base; benchmarks/NOTES.md, LoRA section):
#   "cublas"  base GEMMs on cuBLAS over a dequantized W, adapter in bf16 with small Triton passes
#   "fused"   the fused Triton kernels (the NF4 GEMM dequantizing in registers, adapter in its
#             epilogue): 1.67 ms for q/o on the H100 vs 1.74 ms plain; its GEMMs lag cuBLAS
#   "plain"   the base through nf4_matmul, the adapter in fp32 PyTorch (PEFT's numerics); was the
#             default until the cublas path (1.74 ms q/o, ~1 ms of it fp32 adapter passes)
CUDA_PATH = "cublas"
PATHS = ("cublas", "fused", "plain")
_KERNEL_BACKEND = {"cublas": "cublas", "fused": "triton"}
SMALL_ROWS = 64  # at most this many rows on CUDA (decoding) take "plain" (= kernels.nf4.GEMV_ROWS)


def _path(layer: LoRALinear, x: torch.Tensor) -> str:
    """The forward path for this call: the layer's `backend` if set, else CUDA_PATH for CUDA tensors
    with more than SMALL_ROWS rows outside autocast, else "plain"."""
    path = layer.backend
    if path is None:
        if not x.is_cuda or x.numel() <= SMALL_ROWS * x.shape[-1] or torch.is_autocast_enabled(x.device.type):
            return "plain"
        path = CUDA_PATH
    if path not in PATHS:
        raise EngineError(f"LoRA path must be one of {PATHS}, got {path!r}")
    return path


def project_qkv(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, x: torch.Tensor):
    """(q_proj(x), k_proj(x), v_proj(x)); on the "fused" path, three LoRALinear layers share one
    launch that reads x once (`kernels.lora.lora_qkv`). For an attention module's forward."""
    layers = (q_proj, k_proj, v_proj)
    if all(isinstance(m, LoRALinear) for m in layers) and all(_path(m, x) == "fused" for m in layers):
        from kernels.lora import lora_qkv

        return lora_qkv(x, q_proj, k_proj, v_proj, backend="triton")
    return q_proj(x), k_proj(x), v_proj(x)


# ----------------------------------------------------------------------------------------------
# Choosing and wrapping layers
# ----------------------------------------------------------------------------------------------


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list of target_modules: the name equals the target or ends in '.' + it."""
    return name == target or name.endswith("." + target)


def _never(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in NEVER_TARGET


def _is_linear(m: nn.Module) -> bool:
    return hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, LoRALinear)


def inject_lora(model: nn.Module, r: int = 16, alpha: float = 64, dropout: float = 0.1,
                targets=DEFAULT_TARGETS, rslora: bool = False) -> list[str]:
    """Wrap every linear layer that a target names (PEFT's suffix rule) with a LoRALinear.

    Freezes everything else. Returns the wrapped module names. `targets` may include the MoE
    experts' w1/w2/w3; the router `gate` and `lm_head` are never wrapped.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if _never(t)]
    if bad:
        raise EngineError(f"lora_targets {bad} are not allowed: the router and lm_head stay frozen.")
    names = [n for n, m in model.named_modules()
             if _is_linear(m) and not _never(n) and any(matches_target(n, t) for t in targets)]
    if not names:
        raise EngineError(f"lora_targets {list(targets)} match no linear layer of this model; "
                          f"valid leaf names include {sorted(_linear_leaf_names(model))}.")
    return wrap_modules(model, {n: (r, alpha) for n in names}, dropout, rslora)


def wrap_modules(model: nn.Module, ranks: dict[str, tuple[int, float]], dropout: float = 0.0,
                 rslora: bool = False) -> list[str]:
    """Wrap the named linear layers, each with its own (r, alpha); freeze every other parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (r, alpha) in ranks.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, leaf)
        if _never(name) or not _is_linear(module):
            raise EngineError(f"cannot put a LoRA on {name!r}: it is not a linear layer that may be adapted "
                              "(the router and lm_head stay frozen).")
        # The new layer takes the wrapped one's train/eval mode (an eval model stays in eval).
        setattr(parent, leaf, LoRALinear(module, r, alpha, dropout, rslora).train(module.training))
    return list(ranks)


def _linear_leaf_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}


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
