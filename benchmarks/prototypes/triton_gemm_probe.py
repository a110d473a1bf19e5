"""Can a Triton GEMM match cuBLAS on the LoRA layer's base GEMMs (H100)? (session 13 probe)

Issue 5's second target (<= 1.15x the bf16 base's forward + dX) leaves no room for separate
passes over x, dY and T next to cuBLAS (benchmarks/NOTES.md, "LoRA, session 13"): the only route
left is to fold the adapter into the GEMMs' loops and epilogues, which needs GEMMs of our own at
cuBLAS speed. This times TMA-descriptor Triton GEMMs (one tile per program, and persistent) over
a few tile shapes against torch.mm on the four GEMMs of the case (5120 tokens; q/o 4096 -> 4096,
k/v 4096 -> 1024; forward x W^T and backward dY W), and a pure read of x (the floor of the
backward's one unavoidable extra read, dA's).

python3 benchmarks/prototypes/triton_gemm_probe.py  (writes triton_gemm_probe.json into $OUT or /tmp)
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.lora import _grouped  # (row tile, column tile) of a program id, GROUP_M row tiles per sweep


@triton.jit
def _tile_product(a_desc, b_desc, pm, pn, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  B_T: tl.constexpr):
    """One (BM, BN) tile of A @ B, fp32."""
    acc = tl.zeros((BM, BN), tl.float32)
    for ki in range(tl.cdiv(K, BK)):
        a = a_desc.load([pm * BM, ki * BK])
        if B_T:
            b = b_desc.load([pn * BN, ki * BK]).T
        else:
            b = b_desc.load([ki * BK, pn * BN])
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mm_kernel(a_desc, b_desc, c_desc, M, N, K, NUM_PROGS,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
               B_T: tl.constexpr, PERSISTENT: tl.constexpr, FLATTEN: tl.constexpr):
    """C (M, N) = A (M, K) @ B, B given as (N, K) (B_T: the forward's W) or (K, N) (the backward's W)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=FLATTEN):
            pm, pn = _grouped(tile, num_m, num_n, GROUP_M)
            acc = _tile_product(a_desc, b_desc, pm, pn, K, BM, BN, BK, B_T)
            c_desc.store([pm * BM, pn * BN], acc.to(c_desc.dtype))
    else:
        pm, pn = _grouped(tl.program_id(0), num_m, num_n, GROUP_M)
        acc = _tile_product(a_desc, b_desc, pm, pn, K, BM, BN, BK, B_T)
        c_desc.store([pm * BM, pn * BN], acc.to(c_desc.dtype))


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Reads n elements (the floor of one pass over x): each program sums ITERS blocks."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def triton_mm(a, b, b_t, c, cfg, sms):
    BM, BN, BK, stages, warps, persistent, flatten = cfg
    M, K = a.shape
    N = c.shape[1]
    a_d = TensorDescriptor.from_tensor(a, [BM, BK])
    b_d = TensorDescriptor.from_tensor(b, [BN, BK] if b_t else [BK, BN])
    c_d = TensorDescriptor.from_tensor(c, [BM, BN])
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    progs = min(sms, tiles) if persistent else tiles
    return lambda: _mm_kernel[(progs,)](a_d, b_d, c_d, M, N, K, progs, BM=BM, BN=BN, BK=BK, GROUP_M=8, B_T=b_t,
                                        PERSISTENT=persistent, FLATTEN=flatten, num_warps=warps, num_stages=stages)


def bench(fn, rep=200):
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=rep, quantiles=[0.5, 0.2, 0.8])


def main():
    torch.manual_seed(0)
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    M, K = 5120, 4096
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__, "rows": []}
    cases = []
    for name, n_out in (("q/o", 4096), ("k/v", 1024)):
        w = (torch.randn(n_out, K, device=dev, dtype=torch.bfloat16) * 0.02)
        dy = torch.randn(M, n_out, device=dev, dtype=torch.bfloat16)
        cases.append((name + " fwd x W^T", x, w, True, torch.empty(M, n_out, device=dev, dtype=torch.bfloat16)))
        cases.append((name + " bwd dY W", dy, w, False, torch.empty(M, K, device=dev, dtype=torch.bfloat16)))
    configs = [
        (128, 256, 64, 3, 8, False, False), (128, 256, 64, 4, 8, False, False),
        (128, 256, 64, 3, 8, True, True), (128, 256, 64, 4, 8, True, True), (128, 256, 64, 4, 8, True, False),
        (128, 128, 64, 4, 4, False, False), (128, 128, 64, 5, 8, True, True), (128, 128, 64, 4, 4, True, True),
        (256, 128, 64, 3, 8, True, True), (128, 256, 128, 2, 8, True, True),
    ]
    for name, a, w, b_t, c, in cases:
        ref = a @ (w.t() if b_t else w)
        cub = torch.empty_like(c)
        cub_ms = bench(lambda: torch.mm(a, w.t() if b_t else w, out=cub))
        row = {"gemm": name, "cublas_us": round(cub_ms[0] * 1e3, 1), "configs": []}
        flops = 2 * a.shape[0] * a.shape[1] * c.shape[1]
        row["cublas_tflops"] = round(flops / cub_ms[0] / 1e9, 0)
        for cfg in configs:
            try:
                fn = triton_mm(a, w, b_t, c, cfg, sms)
                fn()
                torch.cuda.synchronize()
                err = ((c.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                t = bench(fn)
                row["configs"].append({"cfg": cfg, "us": round(t[0] * 1e3, 1), "p20": round(t[1] * 1e3, 1),
                                       "vs_cublas": round(t[0] / cub_ms[0], 3), "err": err})
            except Exception as e:  # noqa: BLE001
                row["configs"].append({"cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        # cuBLAS again at the end (clock drift)
        row["cublas_us_again"] = round(bench(lambda: torch.mm(a, w.t() if b_t else w, out=cub))[0] * 1e3, 1)
        best = min((r for r in row["configs"] if "us" in r), key=lambda r: r["us"], default=None)
        print(name, "cublas", row["cublas_us"], row["cublas_us_again"], "best", best, flush=True)
        for r in row["configs"]:
            print("   ", r, flush=True)
        out["rows"].append(row)
    part = torch.empty(4096, device=dev, dtype=torch.float32)
    reads = {}
    for block, iters in ((4096, 8), (8192, 4), (2048, 16)):
        n = x.numel()
        progs = triton.cdiv(n, block * iters)
        reads[f"{block}x{iters}"] = round(bench(lambda: _read_kernel[(progs,)](x, part, n, BLOCK=block, ITERS=iters,
                                                                                 num_warps=8))[0] * 1e3, 1)
    copy_us = round(bench(lambda: x.clone())[0] * 1e3, 1)
    out["x_read_us"] = reads
    out["x_copy_us"] = copy_us
    print("read of x (41.9 MB):", reads, "copy:", copy_us, flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "triton_gemm_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
