"""GPU memory of a full Mixtral-8x7B held in NF4 (double quant), built layer by layer (GPU).

    python benchmarks/nf4_memory.py --out runs/nf4_memory.json     # about a minute on an H100

Every linear layer but the router and lm_head is an NF4Linear filled by quantize_() from one
random bf16 weight at a time, created on the GPU and freed right after; embeddings, norms,
routers and lm_head stay bf16. Reports torch.cuda.max_memory_allocated (target: <= 25 GB), what
stays allocated, the bytes the formula predicts, and the quantization time. Independent of
models/transformer.py: only the weights are allocated.
"""
from __future__ import annotations

import time

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import env_info, parser, print_table, write_json

from models.nf4 import NF4Linear

# Mixtral-8x7B as in DESIGN.md, used when models/config.py is not importable.
FALLBACK = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8)
TARGET_GB = 25.0


def mixtral_config() -> dict:
    try:
        from models.config import ModelConfig

        cfg = ModelConfig.from_preset("mixtral-8x7b")
        return {k: getattr(cfg, k) for k in FALLBACK}
    except Exception as e:  # noqa: BLE001
        print(f"models.config unavailable ({e}); using DESIGN.md's numbers")
        return dict(FALLBACK)


def nf4_linear(out_f: int, in_f: int, device) -> NF4Linear:
    layer = NF4Linear(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, device="meta")
    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02
    layer.quantize_(w)
    del w  # only the packed weight stays
    return layer


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_memory.py needs a CUDA GPU")
    dev = torch.device("cuda")
    c = mixtral_config()
    H, I, E, D = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    bf16 = lambda *shape: torch.randn(*shape, device=dev, dtype=torch.bfloat16)  # noqa: E731
    model = {"embed_tokens": bf16(c["vocab_size"], H), "norm": bf16(H), "lm_head": bf16(c["vocab_size"], H),
             "layers": []}
    n_quantized = n_dense = 0
    for _ in range(c["num_hidden_layers"]):
        layer = {
            "q_proj": nf4_linear(q_out, H, dev), "k_proj": nf4_linear(kv_out, H, dev),
            "v_proj": nf4_linear(kv_out, H, dev), "o_proj": nf4_linear(H, q_out, dev),
            "gate": bf16(E, H), "input_layernorm": bf16(H), "post_attention_layernorm": bf16(H),
            "experts": [dict(w1=nf4_linear(I, H, dev), w2=nf4_linear(H, I, dev), w3=nf4_linear(I, H, dev))
                        for _ in range(E)],
        }
        model["layers"].append(layer)
    torch.cuda.synchronize()
    seconds = time.time() - t0

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)
        else:
            yield node

    nf4_bytes = dense_bytes = 0
    for item in walk(model):
        if isinstance(item, NF4Linear):
            nf4_bytes += sum(b.numel() * b.element_size() for b in item.buffers())
            n_quantized += item.in_features * item.out_features
        else:
            dense_bytes += item.numel() * item.element_size()
            n_dense += item.numel()
    peak, resident = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    row = dict(params_B=(n_quantized + n_dense) / 1e9, nf4_params_B=n_quantized / 1e9,
               nf4_GB=nf4_bytes / 1e9, bf16_GB=dense_bytes / 1e9, bits_per_nf4_param=8 * nf4_bytes / n_quantized,
               resident_GB=resident / 1e9, peak_GB=peak / 1e9, peak_GiB=peak / 2**30, build_s=seconds)
    print_table([row])
    print(f"target peak <= {TARGET_GB} GB: {'met' if peak / 1e9 <= TARGET_GB else 'NOT met'}")
    write_json(args.out, dict(env=env_info(), config=c, result=row, target_GB=TARGET_GB))


if __name__ == "__main__":
    main()
