"""REFUTED (session 13): the LoRA backward's dX GEMM with the adapter's share and dA in its epilogue.

Issue 5's "<= 1.15x the bf16 base" leaves no room for passes over x, dY and T beside cuBLAS
(benchmarks/NOTES.md, "LoRA, session 13"). The one route left was to fold them into the GEMMs. The
backward's GEMM path runs, after the dY pass (g = dY B, dB):
  one pass over x:  T = s * keep * (g A) written (M, K), dA += s * g^T (keep * x)
  cuBLAS:           dX = T + dY W (beta = 1: T read again)
This kernel is one persistent Triton GEMM over (BLOCK_M x BLOCK_N) tiles of dX = dY W (TMA
descriptors; W's (N, K) row-major layout as the MMA's B operand) whose epilogue, per column slice
of SUB columns, adds s * keep * (g A) before the store (T never written), loads the same tile of x,
masks it with the same hash and adds s * g^T (keep * x) into dA (fp32 atomics).

Measured on an H100 (calls 2-4 with driver scripts whose cases `main()` below repeats:
`python3 benchmarks/prototypes/lora_dx_gemm.py`; numbers in benchmarks/RESULTS.md, "Session 13"): a plain Triton GEMM of this layout matches cuBLAS (239.7 vs
236-243 us for q/o, 65.9-67.0 vs 66-67 for k/v), but the epilogue is not overlapped with the main
loop (Triton 3.6 does not warp-specialize on Hopper: `warp_specialize=True` compiles to the same
timing), so its latency-bound steps add up per tile: with dA and dropout 282-292 us for q/o against
285-289 for the route, 122-129 against 126-128 for k/v. The best split (T in the epilogue with
FLATTEN=False, dA by the library's pass) reads 257.0 + 29.3 us (q/o, = the route) and 83.3 + 29.6
(k/v, -14 us). In the whole engine step (call 2) the fused default read 0.595 / 0.244 ms of GPU time
against 0.570 / 0.220 for the route. Not adopted; kept as the record of what was tried. Knobs:
FLATTEN (flattened persistent loop), PTR_IO (plain loads/stores in the epilogue instead of TMA: spills),
WS (warp_specialize), PROGS_PER_SM.

Correctness (same calls): dX within 0.7% (bf16; the route rounds T to bf16 first), dA within 4e-7 of
the route's. On a CPU it runs through the Triton interpreter (fp16/fp32), as checked while it was written.
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
from kernels import lora as L  # noqa: E402
from kernels.launch import cdiv  # noqa: E402
from kernels.lora import _block_r, _grouped, _keep_tile, _precision, _row_keys_of, key_pair, keep_threshold  # noqa: E402
from kernels.nf4 import _num_sms  # noqa: E402

# H200 probe, q/o dY W: 249.0 us against cuBLAS 249.7 (128 x 128 tiles: 260.9; 256 x 128: 260.2).
DX_GEMM_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SUB=64, GROUP_M=8, PTR_IO=False, FLATTEN=True,
                      WS=False, PROGS_PER_SM=1, num_warps=8, num_stages=3)
# fp32 operands (fp32 MMAs run on the CUDA cores; the 16-bit tiles would not fit in shared memory).
DX_GEMM_FP32_CONFIG = dict(DX_GEMM_CONFIG, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, SUB=64, num_warps=4, num_stages=2)


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """(BLOCK_M, WIDTH) -> its left and right (BLOCK_M, WIDTH // 2) halves."""
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _slice_epilogue(acc, g, a, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0, M, K, R, g_scale, keep_thr,
                    BLOCK_M: tl.constexpr, SUB: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
                    NEED_DA: tl.constexpr, PTR_IO: tl.constexpr, PRECISION: tl.constexpr):
    """Columns k0 .. k0 + SUB - 1 of a dX tile: dX = acc + s * keep * (g A), stored; dA += s * g^T (keep * x).
    g (BM, BR) and a (BR, SUB) arrive in x's dtype, loaded before the tile's main loop."""
    dtype = g.dtype
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, SUB)
    offs_r = tl.arange(0, BLOCK_R)
    mk_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    t = tl.dot(g, a, input_precision=PRECISION) * g_scale  # (BM, SUB) fp32
    if DROPOUT:
        keep = _keep_tile(row_keys, k0, keep_thr, BLOCK_M, SUB)
        t = tl.where(keep, t, 0.0)
    if PTR_IO:  # plain stores: no shared-memory staging, nothing to wait for
        tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], (acc + t).to(dtype), mask=mk_mask)
    else:
        dx_desc.store([m0, k0], (acc + t).to(dtype))
    if NEED_DA:
        if PTR_IO:
            x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mk_mask, other=0.0)
        else:
            x = x_desc.load([m0, k0])  # (BM, SUB); zeros outside x
        if DROPOUT:
            x = tl.where(keep, x, tl.zeros_like(x))
        da = tl.dot(tl.trans(x), g, input_precision=PRECISION) * g_scale  # (SUB, BR)
        tl.atomic_add(da_ptr + offs_r.to(tl.int64)[None, :] * K + offs_k[:, None], da,
                      mask=(offs_k < K)[:, None] & (offs_r < R)[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["key1", "key2"])
def _dx_gemm_kernel(
    dy_desc, w_desc, dx_desc, x_desc, x_ptr, dx_ptr, g_ptr, a_ptr, da_ptr, M, N, K, R, num_progs, g_scale, key1, key2,
    keep_thr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, DROPOUT: tl.constexpr, NEED_DA: tl.constexpr,
    PTR_IO: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr, PRECISION: tl.constexpr,
):
    # dX (M, K) = dY (M, N) W (N, K) + s keep*(g A); dA (R, K) += s g^T (keep*x). A program takes
    # tiles tile, tile + num_progs, ... of dX (BLOCK_M rows x BLOCK_N columns); the reduction runs
    # over N in BLOCK_K steps; the epilogue works in BLOCK_N / SUB column slices (1, 2 or 4).
    dtype = dy_desc.dtype
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(K, BLOCK_N)
    steps = tl.cdiv(N, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), num_m * num_n, num_progs, flatten=FLATTEN, warp_specialize=WS):
        pm, pn = _grouped(tile, num_m, num_n, GROUP_M)
        m0 = pm * BLOCK_M
        k0 = pn * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_k = k0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(steps):
            acc = tl.dot(dy_desc.load([m0, step * BLOCK_K]), w_desc.load([step * BLOCK_K, k0]), acc,
                         input_precision=PRECISION)
        # g and A's columns after the main loop (loaded before it, they spilled and dA came out wrong)
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=(offs_m < M)[:, None] & (offs_r < R)[None, :], other=0.0).to(dtype)  # (BM, BR)
        a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=(offs_r < R)[:, None] & (offs_k < K)[None, :], other=0.0).to(dtype)  # (BR, BN)
        row_keys = _row_keys_of(key1, key2, offs_m)
        if BLOCK_N == SUB:
            _slice_epilogue(acc, g, a, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0, M, K, R, g_scale,
                            keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)
        elif BLOCK_N == 2 * SUB:
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            a0, a1 = _halves(a, BLOCK_R, BLOCK_N)
            _slice_epilogue(left, g, a0, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0, M, K, R,
                            g_scale, keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)
            _slice_epilogue(right, g, a1, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0 + SUB, M, K, R,
                            g_scale, keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)
        else:  # BLOCK_N == 4 * SUB
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            q0, q1 = _halves(left, BLOCK_M, 2 * SUB)
            q2, q3 = _halves(right, BLOCK_M, 2 * SUB)
            a_left, a_right = _halves(a, BLOCK_R, BLOCK_N)
            a0, a1 = _halves(a_left, BLOCK_R, 2 * SUB)
            a2, a3 = _halves(a_right, BLOCK_R, 2 * SUB)
            _slice_epilogue(q0, g, a0, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0, M, K, R,
                            g_scale, keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)
            _slice_epilogue(q1, g, a1, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0 + SUB, M, K, R,
                            g_scale, keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)
            _slice_epilogue(q2, g, a2, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0 + 2 * SUB, M, K, R,
                            g_scale, keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)
            _slice_epilogue(q3, g, a3, row_keys, da_ptr, x_desc, dx_desc, x_ptr, dx_ptr, m0, k0 + 3 * SUB, M, K, R,
                            g_scale, keep_thr, BLOCK_M, SUB, BLOCK_R, DROPOUT, NEED_DA, PTR_IO, PRECISION)


def _descriptor(t: torch.Tensor, block: list) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def dx_gemm(dy, w, x2, g, a, keys, p, g_scale, dx, da=None, need_da=True, config=None):
    """dx (M, K) = dy (M, N) @ w (N, K) + g_scale * keep * (g A), written into dx (contiguous, x2's
    dtype), and dA (r, K) fp32 = g_scale * g^T (keep * x2) added into `da` (a zeroed accumulator;
    a new one when None) when need_da. g (M, r) any dtype (cast to x's); a (r, K) fp32 or x's dtype;
    keys: the projection's dropout key pair (unused when p == 0). Returns dA or None."""
    M, N = dy.shape
    K = w.shape[1]
    r = a.shape[0]
    if (N * dy.element_size()) % 16 or (K * dy.element_size()) % 16:
        raise ValueError(f"dx_gemm reads dY ({M}, {N}) and W ({N}, {K}) through TMA, whose rows must be multiples "
                         f"of 16 bytes")
    c = dict(DX_GEMM_FP32_CONFIG if dy.element_size() == 4 else DX_GEMM_CONFIG, **(config or {}))
    bm, bn, bk, sub = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["SUB"]
    if bn not in (sub, 2 * sub, 4 * sub):
        raise ValueError(f"BLOCK_N must be 1, 2 or 4 times SUB, got {bn} and {sub}")
    if need_da and da is None:
        da = torch.zeros((r, K), dtype=torch.float32, device=dy.device)
    k1, k2 = key_pair(keys) if p > 0 else (0, 0)
    tiles = cdiv(M, bm) * cdiv(K, bn)
    progs = max(1, min(tiles, c["PROGS_PER_SM"] * _num_sms(dy.device)))
    _dx_gemm_kernel[(progs,)](
        _descriptor(dy, [bm, bk]), _descriptor(w, [bk, bn]), _descriptor(dx, [bm, sub]), _descriptor(x2, [bm, sub]),
        x2, dx, g, a, da if need_da else g, M, N, K, r, progs, float(g_scale), k1, k2, keep_threshold(p),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SUB=sub, BLOCK_R=_block_r(r), GROUP_M=c["GROUP_M"], DROPOUT=p > 0,
        NEED_DA=need_da, PTR_IO=c["PTR_IO"], FLATTEN=c["FLATTEN"], WS=c["WS"], PRECISION=_precision(dy.dtype),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return da if need_da else None


def main():
    """The fused kernel's variants against the route (T + dA pass, then cuBLAS dX = T + dY W) on
    benchmarks/lora.py's case (5120 tokens, r = 16, dropout 0.1, bf16), q/o and k/v."""
    from triton.testing import do_bench

    torch.manual_seed(0)
    M, K, r, p, sc, keys = 5120, 4096, 16, 0.1, 4.0 / 0.9, (1234567, 7654321)
    variants = {"default": {}, "no_flatten": dict(FLATTEN=False), "ws": dict(FLATTEN=False, WS=True),
                "ptr_io": dict(PTR_IO=True), "bn128_sub128": dict(BLOCK_N=128, SUB=128, num_stages=4)}
    out = {"device": torch.cuda.get_device_name(), "rows": []}

    def us(fn):
        return round(do_bench(fn, warmup=50, rep=300) * 1e3, 1)

    def rel(u, v):
        return ((u.float() - v.float()).abs().max() / v.float().abs().max()).item()

    for N in (4096, 1024):
        x2, dy = (torch.randn(M, n, device="cuda", dtype=torch.bfloat16) for n in (K, N))
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        a, g = torch.randn(r, K, device="cuda") * 0.05, torch.randn(M, r, device="cuda")
        t, dx, da0 = torch.empty_like(x2), torch.empty_like(x2), torch.zeros(r, K, device="cuda")

        def route():
            da = L._launch_adapter_dx(x2, g, a, keys, p, sc, t, False, True)
            t.addmm_(dy, w)
            return da

        da_ref = route()
        row = dict(N=N, cublas_dYW_us=us(lambda: torch.mm(dy, w, out=dx)), route_us=us(route),
                   dA_pass_us=us(lambda: L._launch_adapter_dx(x2, g, a, keys, p, sc, None, False, True)))
        for name, cfg in variants.items():
            da = dx_gemm(dy, w, x2, g, a, keys, p, sc, dx, config=cfg)
            row[name] = dict(err_dx=rel(dx, t), err_da=rel(da, da_ref),
                             us=us(lambda: dx_gemm(dy, w, x2, g, a, keys, p, sc, dx, da=da0, config=cfg)),
                             no_da_us=us(lambda: dx_gemm(dy, w, x2, g, a, keys, p, sc, dx, need_da=False, config=cfg)))
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "lora_dx_gemm.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
