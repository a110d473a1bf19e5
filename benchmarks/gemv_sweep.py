"""Sweep the NF4 decode kernels (nf4_gemv) over tile configs on Mixtral shapes, CUDA-graph timed.

    python benchmarks/gemv_sweep.py --out gemv_sweep.json [--quick]

Prints, per (shape, rows), every config's microseconds, TB/s of NF4 bytes and error against the
fp32 product of the dequantized weight, and the best config. Weight copies exceed L2, so every
call reads HBM.
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels.nf4 as K  # noqa: E402
from benchmarks.common import bench_graph_us, env_info, parser, write_json  # noqa: E402

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]


def configs(m: int, quick: bool) -> list[dict]:
    out = [dict(KERNEL="fma", BLOCK_N=None, BLOCK_K=512, WORD_VEC=4, SPLIT_K=None, WAVES=3, num_warps=4, num_stages=1)]
    if m >= 2:
        out.append(dict(KERNEL="mma", BLOCK_N=64, BLOCK_K=256, SPLIT_K=None, WAVES=4, num_warps=4, num_stages=3))
    grid = itertools.product((8, 16, 32), (256, 512), (2, 4, 8), (True, False), (3,))
    if quick or m > 1:
        grid = itertools.product((8, 16), (256, 512), (4,), (True, False), (3,))
    for bn, bk, warps, lut, waves in grid:
        out.append(dict(KERNEL="rows", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=None, WAVES=waves, SMEM_LUT=lut,
                        num_warps=warps, num_stages=1))
    return out


def main():
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    results = {"env": env_info(), "rows": []}
    for N, Kd in SHAPES:
        w = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16)
        q = K.quantize_nf4(w)
        del w
        copies = [q] + [K.NF4Tensor(*(t.clone() for t in q.fields()), shape=q.shape, dtype=q.dtype)
                        for _ in range(max(1, 120_000_000 // q.nbytes))]
        wd = K.dequantize_nf4_reference(q, torch.float32)
        for m in (1, 2, 3, 4):
            if (N, Kd) in SHAPES[2:] and m > 1:
                continue
            x = torch.randn(m, Kd, device=dev, dtype=torch.bfloat16)
            ref = x.float() @ wd.T
            best = None
            for c in configs(m, args.quick):
                try:
                    us = bench_graph_us([lambda qc=qc, c=c: K.nf4_gemv(x, qc, c) for qc in copies])
                    y = K.nf4_gemv(x, q, c).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                except Exception as e:  # a config that does not compile is reported, not fatal
                    us, err = None, repr(e)[:120]
                row = dict(shape=f"{N}x{Kd}", M=m, us=us, tbs=q.nbytes / us / 1e6 if us else None, err=err,
                           **{k: v for k, v in c.items()})
                results["rows"].append(row)
                print(row, flush=True)
                if us and (best is None or us < best["us"]):
                    best = row
            print(f"BEST {N}x{Kd} M={m}: {best}", flush=True)
        del copies
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
