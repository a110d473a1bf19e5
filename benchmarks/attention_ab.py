"""Decode attention (kernels/attention.py) on Mixtral's decode shapes: the default against other
cache slicings, block sizes and warps, in one run.

3 sequences x 1 new token, 32 query heads over 8 kv heads, head dim 128, bf16, caches of 448 and
1088 slots; each variant timed in a CUDA graph of 20 calls (us per call), and its largest
difference from the PyTorch reference printed.

Usage: python benchmarks/attention_ab.py [--out attention_ab.json]
"""
import argparse
import json

import torch

from common import cuda_ms  # noqa: E402  (puts the repo root on sys.path)

import kernels.attention as A

B, T, H, K, D = 3, 1, 32, 8, 128
VARIANTS = [(None, None, None)] + [(target, bs, warps) for target in (256, 128, 64)
                                   for bs, warps in ((64, 4), (64, 8), (128, 8), (32, 4))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="attention_ab.json")
    a = p.parse_args()
    real_cfg, real_target = A.config, A.TARGET_PROGRAMS
    res = {"gpu": torch.cuda.get_device_name(), "us": {}}
    for S in (448, 1088):
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, K, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        pos = torch.tensor([S - 40], device="cuda")
        mask = torch.ones(B, S, dtype=torch.long, device="cuda")
        want = A.decode_attention_reference(q, k, v, pos, mask)
        for target, bs, warps in VARIANTS:
            A.TARGET_PROGRAMS = target or real_target
            A.config = real_cfg if bs is None else (
                lambda bm, bd, bs=bs, warps=warps: dict(real_cfg(bm, bd), BLOCK_S=bs, num_warps=warps))
            err = (A.decode_attention(q, k, v, pos, mask).float() - want.float()).abs().max().item()
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                for _ in range(20):
                    A.decode_attention(q, k, v, pos, mask)
            us = cuda_ms(graph.replay, 5, repeats=5) * 1000 / 20
            name = "default" if bs is None else f"target={target} BLOCK_S={bs} warps={warps}"
            res["us"][f"S={S} {name}"] = us
            print(f"S={S:5d} {name:34s} {us:7.2f} us  max |diff| {err:.1e}", flush=True)
        A.config, A.TARGET_PROGRAMS = real_cfg, real_target
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
