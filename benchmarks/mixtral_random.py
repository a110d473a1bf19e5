"""A Mixtral-8x7B-shaped model with random weights, NF4-quantized layer by layer on the GPU.

Each linear weight is drawn in bf16 on the GPU, quantized, and freed before the next, so the
bf16 model never exists whole: peak memory stays near the NF4 model plus one weight.
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.nf4 import NF4Linear, replace_linears_with_nf4
from models.transformer import Transformer


@torch.no_grad()
def random_nf4_mixtral(num_layers: int | None = None, device="cuda", dtype=torch.bfloat16,
                       preset: str = "mixtral-8x7b", seed: int = 0) -> Transformer:
    cfg = ModelConfig.from_preset(preset)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = Transformer(cfg)
    replace_linears_with_nf4(model, skip=("gate", "lm_head"), compute_dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            w = torch.randn(module.out_features, module.in_features, device=device, dtype=dtype, generator=gen)
            module.quantize_(w.mul_(0.02))
            del w
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, device=device, dtype=dtype)
                if "norm" in name:
                    t.fill_(1.0)
                else:
                    t.normal_(0, 0.02, generator=gen)
                module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    model.tie_weights()
    return model.eval()
