"""Variants of the GEMM path's two x-wide Triton passes (q/o, 5120 x 4096, r = 16, p = 0.1), timed beside
the library's launches (session 11; results/lora_pass_protos_call6_session11.json).

    python3 benchmarks/prototypes/lora_pass_variants.py      # from the repository root, on a GPU machine

PAIR: one lowbias32 hash per two elements (16 bits each) instead of one per element.
FMA:  T = g A on the CUDA cores (16 FMAs per element, one blocked layout) instead of tl.dot (MMA layout,
      the keep mask converted between layouts). Refuted: 2-5x slower.
PAIR became kernels/lora.py's `_keep_tile`."""
import sys, os, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, triton, triton.language as tl
from common import bench_ms
from kernels import lora as L
from kernels.lora import _keep_tile, _lowbias32, _row_keys_of
OUT = os.environ.get("OUT", ".")


@triton.jit
def _keep_element(row_keys, offs_k, thr24):
    """The mask before session 11: one lowbias32 round per element, its top 24 bits against round(p 2^24)."""
    h = _lowbias32(row_keys[:, None] + offs_k.to(tl.uint32)[None, :])
    return (h >> 8).to(tl.int32) >= thr24


@triton.jit
def _dx_proto(x_ptr, g_ptr, a_ptr, t_ptr, da_ptr, M, K, R, rows_per_prog, g_scale, key1, key2, thr, thr16,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PAIR: tl.constexpr, FMA: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    k_start = tl.program_id(0) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(dtype)
    da = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    m_lo = tl.program_id(1) * rows_per_prog
    for m_start in range(m_lo, tl.minimum(m_lo + rows_per_prog, M), BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        mk_mask = m_mask[:, None] & k_mask[None, :]
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)
        rk = _row_keys_of(key1, key2, offs_m)
        if PAIR:
            keep = _keep_tile(rk, k_start, thr16, BLOCK_M, BLOCK_K)
        else:
            keep = _keep_element(rk, offs_k, thr)
        if FMA:
            t = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for r in tl.static_range(BLOCK_R):
                g_r = tl.load(g_ptr + offs_m.to(tl.int64) * R + r, mask=m_mask, other=0.0).to(dtype).to(tl.float32)
                a_r = tl.load(a_ptr + r * K + offs_k, mask=k_mask, other=0.0).to(dtype).to(tl.float32)
                t += g_r[:, None] * a_r[None, :]
            t = t * g_scale
        else:
            t = tl.dot(g, a) * g_scale
        t = tl.where(keep, t, 0.0)
        tl.store(t_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], t.to(t_ptr.dtype.element_ty), mask=mk_mask)
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], mask=mk_mask, other=0.0)
        x = tl.where(keep, x, tl.zeros_like(x))
        da = tl.dot(tl.trans(x), g, acc=da)
    tl.atomic_add(da_ptr + offs_r[None, :] * K + offs_k[:, None], da * g_scale, mask=k_mask[:, None] & r_mask[None, :], sem="relaxed")


@triton.jit
def _down_proto(x_ptr, a_ptr, xa_ptr, M, K, R, scale, key1, key2, thr, thr16,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PAIR: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    rk = _row_keys_of(key1, key2, offs_m)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if PAIR:
            keep = _keep_tile(rk, k_start, thr16, BLOCK_M, BLOCK_K)
        else:
            keep = _keep_element(rk, offs_k, thr)
        x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(a.to(x.dtype)), acc=acc)
    tl.store(xa_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], (acc * scale).to(xa_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


M, K, r = 5120, 4096, 16
x2 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
a32 = torch.randn(r, K, device="cuda") / 64
g = torch.randn(M, r, device="cuda")
t = torch.empty_like(x2); t_ref = torch.empty_like(x2)
da = torch.zeros(r, K, device="cuda"); da_ref = torch.zeros(r, K, device="cuda")
xa = torch.empty(M, r, device="cuda", dtype=torch.bfloat16)
k1, k2, p = 12345, 678, 0.1
thr, thr16 = int(round(p * 2 ** 24)), L.keep_threshold(p)
us = lambda fn: round(bench_ms(fn, warmup=10, rep=60) * 1e3, 2)  # noqa: E731
rows = []
# correctness of the FMA T against the MMA T (same mask: PAIR on, the library's)
L._launch_adapter_dx(x2, g, a32, (k1, k2), p, 4.0, t=t_ref, need_da=True, da=da_ref)
for BM, BK, W, nw in [(32, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 8), (64, 128, 2, 8), (16, 128, 4, 4)]:
    rows_pp = L._rows_per_prog(M, K // BK, BM, x2.device, W)
    grid = (K // BK, triton.cdiv(M, rows_pp))
    for pair in (False, True):
        for fma in (False, True):
            def run():
                _dx_proto[grid](x2, g, a32, t, da, M, K, r, rows_pp, 4.0, k1, k2, thr, thr16, BLOCK_M=BM, BLOCK_K=BK,
                                BLOCK_R=16, PAIR=pair, FMA=fma, num_warps=nw, num_stages=3)
            try:
                v = us(run)
                extra = {}
                if pair:
                    da.zero_(); run()
                    extra = dict(t_err=((t.float() - t_ref.float()).abs().max() / t_ref.float().abs().max()).item(),
                                 da_err=((da - da_ref).abs().max() / da_ref.abs().max()).item())
            except Exception as e:  # noqa: BLE001
                v, extra = repr(e)[:200], {}
            rows.append(dict(kernel="T+dA", BM=BM, BK=BK, waves=W, warps=nw, pair=pair, fma=fma, us=v, **extra)); print(rows[-1], flush=True)
rows.append(dict(kernel="T+dA library", us=us(lambda: L._launch_adapter_dx(x2, g, a32, (k1, k2), p, 4.0, t=t, need_da=True, da=da))))
print(rows[-1], flush=True)
for BM, BK, nw in [(16, 256, 4), (16, 128, 4), (32, 128, 4), (32, 256, 8)]:
    for pair in (False, True):
        try:
            v = us(lambda: _down_proto[(triton.cdiv(M, BM),)](x2, a32, xa, M, K, r, 4.0, k1, k2, thr, thr16, BLOCK_M=BM, BLOCK_K=BK,
                                                           BLOCK_R=16, PAIR=pair, num_warps=nw, num_stages=3))
        except Exception as e:  # noqa: BLE001
            v = repr(e)[:200]
        rows.append(dict(kernel="down", BM=BM, BK=BK, warps=nw, pair=pair, us=v)); print(rows[-1], flush=True)
rows.append(dict(kernel="down library", us=us(lambda: L._launch_adapter_down(x2, a32, (k1, k2), p, 4.0))))
print(rows[-1], flush=True)
json.dump(rows, open(f"{OUT}/lora_pass_protos_session11.json", "w"), indent=1)
