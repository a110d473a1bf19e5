"""The engine's public API: `engine.load(name_or_path) -> (model, tokenizer)`."""
from __future__ import annotations

from engine.errors import EngineError

__all__ = ["load", "EngineError", "default_device", "default_dtype"]


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device):
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load(name_or_path, *, dtype=None, device=None, quantize=None):
    """Load a model and its tokenizer.

    name_or_path: a local directory (config.json + safetensors + tokenizer.json), an embedded
    model name such as "smollm2-135m-instruct", or a Hugging Face Hub repo id.
    quantize: None, or "nf4" to quantize every linear layer but the router and lm_head while
    loading (bitsandbytes' NF4 format with double quant).
    Returns (model, tokenizer); `model(input_ids, attention_mask=None)` gives logits.
    """
    import torch

    from engine.checkpoint import build_model
    from engine.hub import resolve_model_dir
    from engine.tokenizer import Tokenizer
    from models.config import ModelConfig

    model_dir = resolve_model_dir(name_or_path)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = build_model(cfg, model_dir, dtype=dtype, device=device, quantize=quantize)
    model.name_or_path = str(name_or_path)
    return model, tokenizer
