"""Sparse upcycling: a dense Llama/Mistral checkpoint -> a Mixtral-architecture MoE checkpoint.

Why: it gives a real (small) model with the Mixtral architecture, so the MoE path, its kernels
and the training recipe can be exercised end to end on a machine that cannot hold Mixtral-8x7B,
starting from a model that already works.

Every expert's w1 / w3 / w2 is a copy of the dense gate_proj / up_proj / down_proj. Whatever the
router picks, Mixtral renormalizes the top-k routing weights to sum to 1, and k identical expert
outputs weighted that way sum back to the dense MLP output, so the upcycled model computes the
dense function at the start:
- router_init="zero": softmax of zero logits is uniform, torch.topk of k equal values still returns
  k distinct experts (the lowest indices), and each renormalized weight is p / (k p) = 1/k. For k a
  power of two every step is exact in fp32, so the output equals the dense one bit for bit up to
  the order of floating-point sums. But every token then goes to experts 0..k-1, and those get
  identical gradients: training cannot break the symmetry through the router.
- router_init="random" (default): small Gaussian router weights (std hidden_size**-0.5, router
  logits ~ N(0, 1)) route tokens to varied experts, so every expert and the dispatch path are
  used; the output still equals the dense one up to the rounding of sum(weights) = 1 (~1e-7).

Output layout: HF per-expert key names (`model.layers.N.block_sparse_moe.experts.E.w1.weight`,
`...block_sparse_moe.gate.weight`), one model.safetensors or shards of at most `max_shard_bytes`
with a model.safetensors.index.json; config.json with model_type "mixtral"; tokenizer files copied.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.errors import EngineError

ROUTER_INITS = ("random", "zero")
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_NAME = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# Files of a model directory that are not carried over (weights, config, other formats).
_SKIP = re.compile(r"^(config\.json|.*\.safetensors|.*\.safetensors\.index\.json|.*\.bin|.*\.pt|"
                   r".*\.pth|.*\.gguf|.*\.bin\.index\.json)$")


def moe_config(dense: dict, experts: int, top_k: int, source: str = "config.json") -> dict:
    """The Mixtral config.json dict for `dense` upcycled to `experts` experts, top-`top_k`."""
    from models.config import ModelConfig

    if dense.get("model_type") not in ("llama", "mistral"):
        raise EngineError(
            f"{source}: model_type {dense.get('model_type')!r} cannot be upcycled; pass a dense "
            "'llama' or 'mistral' model directory."
        )
    if experts < 1 or not 1 <= top_k <= experts:
        raise EngineError(f"--experts {experts} --top_k {top_k}: need 1 <= top_k <= experts.")
    cfg = ModelConfig.from_hf(dense, source=source)
    cfg = dataclasses.replace(cfg, model_type="mixtral", num_local_experts=experts,
                              num_experts_per_tok=top_k)
    cfg.extra = {k: v for k, v in cfg.extra.items()
                 if k not in ("mlp_bias", "pretraining_tp", "architectures", "transformers_version")}
    return cfg.to_hf()


def upcycle(in_dir: str | Path, out_dir: str | Path, experts: int = 8, top_k: int = 2,
            router_init: str = "random", seed: int = 0, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the upcycled MoE of the dense model in `in_dir` to `out_dir` (see module docstring)."""
    from engine.checkpoint import iter_checkpoint, weight_files

    in_dir, out = Path(in_dir), Path(out_dir)
    config_path = in_dir / "config.json"
    if not config_path.is_file():
        raise EngineError(f"{config_path} not found: pass a dense model directory (transformers layout).")
    if router_init not in ROUTER_INITS:
        raise EngineError(f"router_init {router_init!r} is unknown; use one of {ROUTER_INITS}.")
    dense = json.loads(config_path.read_text())
    config = moe_config(dense, experts, top_k, source=str(config_path))
    generator = torch.Generator().manual_seed(seed)

    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, max_shard_bytes)
    seen_layers = set()
    for key, tensor in iter_checkpoint(weight_files(in_dir)):
        match = _DENSE_MLP.match(key)
        if match is None:
            if ".mlp." in key:
                raise EngineError(f"{in_dir}: tensor {key!r} has no place in the MoE (an MLP bias?).")
            writer.add(key, tensor)
            continue
        layer, proj = match.groups()
        prefix = f"model.layers.{layer}.block_sparse_moe"
        if layer not in seen_layers:  # one router per layer: (E, hidden)
            seen_layers.add(layer)
            writer.add(f"{prefix}.gate.weight", _router(config, tensor.dtype, router_init, generator))
        for e in range(experts):
            writer.add(f"{prefix}.experts.{e}.{_EXPERT_NAME[proj]}.weight", tensor.clone())
    if len(seen_layers) != config["num_hidden_layers"]:
        raise EngineError(
            f"{in_dir}: found the dense MLP of {len(seen_layers)} layers, config.json says "
            f"{config['num_hidden_layers']}; the checkpoint is incomplete or not a Llama/Mistral one."
        )
    writer.close()

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(in_dir.iterdir()):
        if f.is_file() and not _SKIP.match(f.name):
            shutil.copy(f, out / f.name)
    return out


def _router(config: dict, dtype: torch.dtype, init: str, generator: torch.Generator) -> torch.Tensor:
    shape = (config["num_local_experts"], config["hidden_size"])
    if init == "zero":
        return torch.zeros(shape, dtype=dtype)
    std = config["hidden_size"] ** -0.5
    return (torch.randn(shape, generator=generator) * std).to(dtype)


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most `max_bytes` (one tensor may be
    larger), so upcycling a 7B model never holds the whole MoE in memory."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self):
        path = self.out / f".shard-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.out / "model.safetensors")
            return
        n, weight_map = len(self.files), {}
        for i, (path, keys) in enumerate(self.files, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
