"""NF4 kernels vs bitsandbytes and cuBLAS bf16 on Mixtral-8x7B shapes, measured in one run (GPU).

    python benchmarks/nf4.py --out runs/bench_nf4.json            # about 2-3 minutes on an H100
    python benchmarks/nf4.py --no-sweep                           # skip the block-config sweep

1. Correctness in bf16 on the GPU: Triton dequant bit-equal to the reference (and to bnb's
   dequantize_4bit of bnb's own quantization), GEMM / dX / decode relative error vs the reference,
   our CUDA quantization bit-equal to our CPU one, and how often bnb's CUDA quantizer agrees.
2. Timing, median of triton.testing.do_bench (L2 flushed before every call):
   dequant TB/s (ours vs bnb); fused GEMM at M = 512, 2048, 8192 vs cuBLAS bf16 (weight already
   dense: the bf16 ceiling) and vs bnb matmul_4bit, plus "dequant + cuBLAS" as a reference point;
   dX = dY W at M = 8192 vs cuBLAS; decode M = 1..16 in TB/s of NF4 bytes vs bnb and a bf16 GEMV.
3. A small sweep of block configs per kernel (printed; the best ones go into the JSON).
bitsandbytes is optional: without it only our kernels and cuBLAS are reported.
"""
from __future__ import annotations

import time
import traceback

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import bench_ms, env_info, parser, print_table, write_json

from kernels import nf4 as K

SHAPES = {  # (N, K) = (out, in)
    "w1/w3 4096->14336": (14336, 4096),
    "w2 14336->4096": (4096, 14336),
    "k/v 4096->1024": (1024, 4096),
    "q/o 4096->4096": (4096, 4096),
}
GEMM_M = (512, 2048, 8192)
DECODE_M = (1, 2, 4, 8, 16)
DEV = "cuda"
TARGETS = dict(dequant_TBps=2.4, gemm8192_over_cublas=1.05, decode1_TBps=2.0)

GEMM_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, W_AS_A=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, W_AS_A=False, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, W_AS_A=True, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, W_AS_A=True, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, W_AS_A=True, num_warps=4, num_stages=4),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, W_AS_A=True, num_warps=4, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, W_AS_A=True, num_warps=8, num_stages=2),
]
DX_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, W_AS_A=False, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, W_AS_A=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, W_AS_A=False, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, W_AS_A=True, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, W_AS_A=False, num_warps=4, num_stages=3),
]
GEMV_SWEEP = [
    dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s, SPLIT_K=sk)
    for bn, bk, w, s, sk in [(128, 128, 8, 3, None), (64, 64, 4, 4, None), (64, 128, 4, 4, None),
                             (128, 64, 4, 4, None), (128, 128, 8, 4, None), (128, 256, 8, 3, None),
                             (128, 128, 8, 3, 1), (128, 128, 8, 3, 4), (64, 128, 4, 4, 8)]
]
DEQUANT_SWEEP = [dict(blocks=b, num_warps=w) for b, w in [(8, 4), (16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]]

RESULTS: dict = {"env": env_info(), "targets": TARGETS, "correctness": [], "rows": [], "sweep": {},
                 "errors": {}}


def section(name):
    """Run one part; a failure is recorded and the run goes on."""
    def deco(fn):
        t0 = time.time()
        try:
            fn()
            print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
        except Exception:
            RESULTS["errors"][name] = traceback.format_exc()[-1500:]
            print(f"[{name}] FAILED\n{RESULTS['errors'][name]}", flush=True)
        torch.cuda.empty_cache()
        return fn
    return deco


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def nf4_bytes(q: K.NF4Tensor) -> int:
    return q.packed.numel() + q.absmax.numel() + 4 * q.absmax2.numel()


def from_bnb(packed, state) -> K.NF4Tensor:
    return K.NF4Tensor(packed.view(-1), state.absmax, state.state2.absmax, state.state2.code,
                       state.offset, state.code, state.shape, state.dtype)


def try_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        RESULTS["env"]["bitsandbytes"] = bnb.__version__
        return bnb, F
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes is not available ({e}); reporting ours and cuBLAS only")
        RESULTS["env"]["bitsandbytes"] = None
        return None, None


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-sweep", action="store_true", help="skip the block-config sweep")
    args = p.parse_args()
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4.py needs a CUDA GPU")
    print(RESULTS["env"], flush=True)
    bnb, F = try_bnb()
    dev = DEV
    torch.manual_seed(0)
    weights = {}
    for name, (N, Kd) in SHAPES.items():
        w = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16) * 0.02
        entry = dict(w=w, q=K.quantize_nf4(w))
        if bnb is not None:
            entry["bnb"] = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        weights[name] = entry

    @section("correctness")
    def _():
        check = RESULTS["correctness"]
        for name, e in weights.items():
            q, w = e["q"], e["w"]
            ref = K.dequantize_nf4_reference(q, torch.bfloat16)
            row = dict(shape=name, dequant_bit_equal=torch.equal(K.dequantize_nf4_triton(q, torch.bfloat16), ref))
            x = torch.randn(512, q.shape[1], device=dev, dtype=torch.bfloat16)
            row["gemm512_rel_err"] = rel_err(K.nf4_gemm(x, q), x @ ref.T)
            dy = torch.randn(512, q.shape[0], device=dev, dtype=torch.bfloat16)
            row["dx512_rel_err"] = rel_err(K.nf4_gemm_dx(dy, q), dy @ ref)
            for m in (1, 16):
                row[f"decode{m}_rel_err"] = rel_err(K.nf4_gemv(x[:m], q), x[:m] @ ref.T)
            if bnb is not None:
                packed, st = e["bnb"]
                theirs = from_bnb(packed, st)
                row["dequant_equals_bnb"] = torch.equal(K.dequantize_nf4_triton(theirs, torch.bfloat16),
                                                        F.dequantize_4bit(packed, st))
                row["bnb_cuda_same_packed_frac"] = (packed.view(-1) == q.packed).float().mean().item()
                row["bnb_cuda_same_absmax_frac"] = (st.absmax == q.absmax).float().mean().item()
            check.append(row)
        w = weights["k/v 4096->1024"]["w"]
        gpu, cpu = K.quantize_nf4(w), K.quantize_nf4(w.cpu())
        check.append(dict(shape="k/v 4096->1024", quantize_cuda_equals_cpu=all(
            torch.equal(a.cpu(), b) for a, b in zip(gpu.tensors(), cpu.tensors()))))
        print_table(check)
        flags = [v for r in check for k, v in r.items() if "equal" in k]
        errs = [v for r in check for k, v in r.items() if k.endswith("rel_err")]
        RESULTS["correct"] = all(flags) and max(errs) < 1e-2
        print(f"correct: {RESULTS['correct']} (bit-equal checks all true, bf16 relative errors < 1e-2)")

    rows = RESULTS["rows"]

    @section("dequant")
    def _():
        for name, e in weights.items():
            q = e["q"]
            moved = nf4_bytes(q) + 2 * q.numel()  # NF4 in, bf16 out
            ours = bench_ms(lambda: K.dequantize_nf4_triton(q, torch.bfloat16))
            row = dict(bench="dequant", shape=name, M="", ours_us=1e3 * ours, ours_rate=moved / ours / 1e9,
                       unit="TB/s")
            if bnb is not None:
                packed, st = e["bnb"]
                theirs = bench_ms(lambda: F.dequantize_4bit(packed, st))
                row.update(bnb_us=1e3 * theirs, ours_vs_bnb=ours / theirs)
            rows.append(row)

    @section("gemm")
    def _():
        for name, e in weights.items():
            q, w = e["q"], e["w"]
            N, Kd = q.shape
            for m in GEMM_M:
                x = torch.randn(m, Kd, device=dev, dtype=torch.bfloat16)
                ours = bench_ms(lambda: K.nf4_gemm(x, q))
                cublas = bench_ms(lambda: x @ w.T)
                row = dict(bench="gemm", shape=name, M=m, ours_us=1e3 * ours, cublas_us=1e3 * cublas,
                           ours_vs_cublas=ours / cublas, ours_rate=2 * m * N * Kd / ours / 1e9, unit="TFLOP/s",
                           dequant_cublas_us=1e3 * bench_ms(lambda: x @ K.dequantize_nf4_triton(q, torch.bfloat16).T))
                if bnb is not None:
                    packed, st = e["bnb"]
                    theirs = bench_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=st))
                    row.update(bnb_us=1e3 * theirs, ours_vs_bnb=ours / theirs)
                rows.append(row)
            dy = torch.randn(GEMM_M[-1], N, device=dev, dtype=torch.bfloat16)
            ours = bench_ms(lambda: K.nf4_gemm_dx(dy, q))
            cublas = bench_ms(lambda: dy @ w)
            rows.append(dict(bench="dX=dY W", shape=name, M=GEMM_M[-1], ours_us=1e3 * ours, cublas_us=1e3 * cublas,
                             ours_vs_cublas=ours / cublas, ours_rate=2 * GEMM_M[-1] * N * Kd / ours / 1e9,
                             unit="TFLOP/s"))

    @section("decode")
    def _():
        for name, e in weights.items():
            q, w = e["q"], e["w"]
            Kd = q.shape[1]
            for m in DECODE_M:
                x = torch.randn(m, Kd, device=dev, dtype=torch.bfloat16)
                ours = bench_ms(lambda: K.nf4_gemv(x, q))
                bf16 = bench_ms(lambda: x @ w.T)
                row = dict(bench="decode", shape=name, M=m, ours_us=1e3 * ours, ours_rate=nf4_bytes(q) / ours / 1e9,
                           unit="TB/s NF4", cublas_us=1e3 * bf16, ours_vs_cublas=ours / bf16)
                if bnb is not None:
                    packed, st = e["bnb"]
                    theirs = bench_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=st))
                    row.update(bnb_us=1e3 * theirs, ours_vs_bnb=ours / theirs)
                rows.append(row)

    def timed(fn):
        """Median us of fn, or the error text when a config fails to compile or run."""
        try:
            return 1e3 * bench_ms(fn, rep=40)
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {str(e)[:200]}"

    if not args.no_sweep:
        @section("sweep")
        def _():
            sweep = RESULTS["sweep"]
            q = weights["w1/w3 4096->14336"]["q"]
            N, Kd = q.shape
            sweep["dequant"] = [dict(c, us=timed(lambda: K.dequantize_nf4_triton(q, torch.bfloat16, **c)))
                                for c in DEQUANT_SWEEP]
            for m in (512, 8192):
                x = torch.randn(m, Kd, device=dev, dtype=torch.bfloat16)
                sweep[f"gemm_M{m}"] = [dict(c, us=timed(lambda: K.nf4_gemm(x, q, c))) for c in GEMM_SWEEP]
            dy = torch.randn(8192, N, device=dev, dtype=torch.bfloat16)
            sweep["dx_M8192"] = [dict(c, us=timed(lambda: K.nf4_gemm_dx(dy, q, c))) for c in DX_SWEEP]
            for name in ("w1/w3 4096->14336", "w2 14336->4096", "k/v 4096->1024"):
                qd = weights[name]["q"]
                x1 = torch.randn(1, qd.shape[1], device=dev, dtype=torch.bfloat16)
                sweep[f"decode1 {name}"] = [dict(c, us=timed(lambda: K.nf4_gemv(x1, qd, c))) for c in GEMV_SWEEP]
            for key, results in sweep.items():
                ok = [r for r in results if isinstance(r["us"], float)]
                if ok:
                    print(f"sweep {key}: best {min(ok, key=lambda r: r['us'])}", flush=True)

    print()
    print_table(rows, ["bench", "shape", "M", "ours_us", "ours_rate", "unit", "cublas_us", "ours_vs_cublas",
                       "bnb_us", "ours_vs_bnb", "dequant_cublas_us"])
    verdicts = {}
    for r in rows:
        if r["shape"] != "w1/w3 4096->14336":
            continue
        if r["bench"] == "dequant":
            verdicts["dequant_TBps"] = r["ours_rate"]
        elif r["bench"] == "gemm" and r["M"] == 8192:
            verdicts["gemm8192_over_cublas"] = r["ours_vs_cublas"]
        elif r["bench"] == "decode" and r["M"] == 1:
            verdicts["decode1_TBps"] = r["ours_rate"]
    RESULTS["verdicts"] = verdicts
    for key, target in TARGETS.items():
        if key in verdicts:
            ok = verdicts[key] <= target if "over" in key else verdicts[key] >= target
            print(f"target {key}: {verdicts[key]:.3f} vs {target} -> {'met' if ok else 'NOT met'}")
    write_json(args.out, RESULTS)


if __name__ == "__main__":
    main()
