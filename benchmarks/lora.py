"""LoRA (r=16) over an NF4 base: the engine's paths vs bitsandbytes + PEFT and vs the frozen bf16 base (GPU).

    python benchmarks/lora.py --out runs/bench_lora.json      # all but fused_sweep: ~2-3 min on an H100,
                                                              # most of it compiling (cold Triton cache)
    python benchmarks/lora.py --no-sweep --parts timing,breakdown,correctness --out runs/bench_lora.json
    python benchmarks/lora.py --dropout 0 --parts timing --candidates cublas,plain

The JSON is rewritten after each part, so a run cut short keeps the parts it finished.

Case: Mixtral's attention projections, 5120 tokens (batch 8 x 640), bf16, LoRA r=16, alpha=64,
dropout 0.1 in training mode (the v5 recipe), forward plus backward (dX, dA, dB):
  q/o 4096->4096, k/v 4096->1024, and q+k+v over one x (4096 -> 4096 + 1024 + 1024).

Parts (--parts, comma-separated; default correctness,timing,breakdown,kernels,sweep; --no-sweep drops
sweep; fused_sweep, the fused GEMMs' tiles, only when named):
  correctness  bf16 on the GPU against `lora_reference` (same dropout mask): relative error of y, dX,
               dA, dB for the fused kernels ("triton") and the GEMM path ("cublas"), NF4 and dense bases.
  timing       median of triton.testing.do_bench (L2 flushed), forward + backward, all in one run
               (the engine, the peer and the two bases in --rounds interleaved rounds, median of them):
                 peer          bitsandbytes Linear4bit (nf4, bf16 compute, double quant) + PEFT LoRA,
                               the same NF4 bytes (both quantized on the CPU, byte-equal)
                 bf16 base     the frozen bf16 weight alone: cuBLAS forward + dX (the ceiling)
                 nf4 base      nf4_matmul forward + dX, no adapter (dequant + cuBLAS twice)
                 engine        LoRALinear over NF4Linear as configured (models.lora.CUDA_PATH)
                 ours          the fused Triton kernels (lora_forward backend="triton")
                 candidates    (--candidates) every LoRA path the engine can take, see CANDIDATES
               Ratios: peer / x (target >= 2) and x / bf16 base (target <= 1.15) for each.
  breakdown    torch.profiler over 6 back-to-back steps of the bf16 base, the NF4 base, the peer, the
               engine and every candidate (q/o and k/v): GPU busy time per step (the sum of its
               kernels: the number to rank the candidates by when do_bench is host-bound), the
               idle time between kernels (launch gaps: a host-bound step), the host time of one
               call, and GPU time per kernel (printed for the bases, the engine, plain and the peer;
               all in the JSON). Answers where the NF4 base's time over bf16 goes.
  kernels      each launch of the fused kernels and each piece of the GEMM path on its own (do_bench).
  sweep        tiles of the GEMM path's two Triton passes and of the one-pass dY kernel.
  fused_sweep  tiles of the fused kernels' two GEMMs and their dY pass (slow: many compiles).
Floors: FLOPs / 750 TFLOP/s and the least HBM traffic / 3.0 TB/s (the DESIGN.md anchors).
bitsandbytes and peft are optional: without them the peer columns are left out.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
import torch.nn.functional as F
from common import bench_ms, env_info, parser, print_table, write_json
from common import section as common_section
from torch import nn

import models.lora as ML
from kernels import lora as L
from kernels.nf4 import nf4_matmul, quantize_nf4

DEV = "cuda"
M = 8 * 640
K_IN = 4096
SHAPES = {"q/o 4096->4096": (4096,), "k/v 4096->1024": (1024,), "q+k+v 4096->6144": (4096, 1024, 1024)}
R, ALPHA = 16, 64
SCALE = ALPHA / R
TARGETS = dict(peer_over_ours=2.0, ours_over_bf16_base=1.15)
ROUNDS = 5  # interleaved rounds of the engine, the peer and the bases (--rounds)
PEAK_FLOPS, PEAK_BYTES = 750e12, 3.0e12

# Every path LoRALinear can take on CUDA, timed side by side. ("engine path", options): a
# models.lora path name run through LoRALinear layers, or "gemm" = kernels.lora.lora_forward(
# backend="cublas") with these GemmOptions (one call per projection, as the engine makes them).
CANDIDATES = {
    "plain": ("plain", None),  # the previous default: nf4_matmul + fp32 PyTorch adapter (PEFT numerics)
    "fused": ("fused", None),  # the fused Triton kernels through LoRALinear
    "cublas": ("gemm", L.GemmOptions()),  # the GEMM path's default (kernels.lora.GemmOptions())
    "cublas_dequant_twice": ("gemm", L.GemmOptions(save_weight=False)),  # W dequantized again for dX
    "cublas_dy_cublas": ("gemm", L.GemmOptions(dy="cublas")),  # g and dB as two cuBLAS matmuls (deterministic)
    "cublas_base_first": ("gemm", L.GemmOptions(adapter_first=False)),  # Y += xa B^T, dX += T afterwards
    "cublas_torch_mask": ("gemm", L.GemmOptions(adapter="torch_mask")),  # no Triton in the adapter
    "cublas_y_cublas": ("gemm", L.GemmOptions(y_in_down=False)),  # Y = xa B^T by cuBLAS after the Triton launch
}
BREAKDOWN_STEPS = ("bf16 base", "nf4 base", "engine", "plain", "peer")
BREAKDOWN_SHAPES = ("q/o 4096->4096", "k/v 4096->1024")

FWD_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2),
]  # BLOCK_N is W's rows per tile (the MMA's A operand), BLOCK_M the tokens
DY_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=3) for bm, bn, w in
            [(32, 128, 4), (32, 256, 8), (64, 128, 4), (64, 256, 8)]]
DOWN_SWEEP = [dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=s, num_warps=w, num_stages=st) for bm, bk, s, w, st in
              [(16, 256, 1, 4, 3), (32, 128, 1, 4, 3), (32, 128, 4, 4, 3), (16, 128, 1, 4, 4), (16, 256, 1, 4, 4),
               (16, 512, 1, 8, 3), (16, 256, 2, 4, 3)]]
ADX_SWEEP = [dict(BLOCK_M=bm, BLOCK_K=bk, WAVES=wv, num_warps=w, num_stages=st) for bm, bk, wv, w, st in
             [(32, 128, 4, 4, 3), (64, 64, 2, 4, 3), (32, 128, 6, 4, 3), (32, 128, 4, 4, 2), (16, 256, 6, 4, 3),
              (32, 256, 4, 8, 3), (64, 128, 6, 8, 3)]]
DY_NATIVE_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=3) for bm, bn, w in
                   [(32, 128, 4), (64, 256, 8), (128, 128, 8)]]

RESULTS: dict = {"env": env_info(), "case": dict(M=M, K=K_IN, r=R, alpha=ALPHA), "targets": TARGETS,
                 "correctness": [], "rows": [], "candidates": [], "breakdown": [], "kernels": [], "sweep": [],
                 "errors": {}}
OUT_PATH = None


def section(name):
    """Run one part now (common.section: a failure is recorded and the run goes on); rewrite the JSON."""
    return common_section(RESULTS, name, after=lambda: write_json(OUT_PATH, RESULTS, quiet=True))


def _peers():
    try:
        import bitsandbytes as bnb
        import peft

        RESULTS["env"].update(bitsandbytes=bnb.__version__, peft=peft.__version__)
        return bnb, peft
    except Exception as e:  # noqa: BLE001
        print(f"bitsandbytes/peft not available ({e}); reporting ours vs the bf16 base only")
        RESULTS["env"]["peer"] = f"missing: {e}"
        return None, None


class _Holder(nn.Module):
    """A tiny module holding the projections, for peft.get_peft_model; returns all their outputs."""

    def __init__(self, **mods):
        super().__init__()
        for name, m in mods.items():
            setattr(self, name, m)

    def forward(self, x):
        return tuple(m(x) for m in self.children())


@contextlib.contextmanager
def _layer_path(layers, path):
    """Run LoRALinear layers on one models.lora path (their `backend` attribute) for a while."""
    saved = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = path
    try:
        yield
    finally:
        for layer, b in zip(layers, saved):
            layer.backend = b


class Case:
    """One shape: the bf16 weights, our NF4 copies and adapters, the peer, inputs and gradients."""

    def __init__(self, Ns, dropout, bnb, peft):
        g = torch.Generator().manual_seed(0)
        self.Ns, self.p = Ns, dropout
        w_cpu = [torch.randn(n, K_IN, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16) for n in Ns]
        q_cpu = [quantize_nf4(w) for w in w_cpu]  # CPU: byte-equal to bitsandbytes' CPU quantizer
        self.bases = [L.Base(q.to(DEV)) for q in q_cpu]
        self.w16 = [b.weight.dequantize(torch.bfloat16) for b in self.bases]  # the same values, dense
        self.As = [(torch.randn(R, K_IN, generator=g) / K_IN ** 0.5).to(DEV).requires_grad_() for _ in Ns]
        self.Bs = [(torch.randn(n, R, generator=g) * 0.02).to(DEV).requires_grad_() for n in Ns]
        self.x = torch.randn(M, K_IN, generator=g).to(DEV, torch.bfloat16).requires_grad_()
        self.gys = [torch.randn(M, n, generator=g).to(DEV, torch.bfloat16) for n in Ns]
        self.keys = L.new_dropout_keys(len(Ns), DEV)
        self.cpu_keys = self.keys.cpu()  # the GEMM path reads its keys on the host: CPU keys cost no sync
        # The engine: LoRALinear over NF4Linear (models/lora.py), fp32 adapter masters as in training.
        from models.lora import LoRALinear
        from models.nf4 import NF4Linear

        self.layers = []
        for w, a, b in zip(w_cpu, self.As, self.Bs):
            base = NF4Linear(K_IN, w.shape[0], bias=False, compute_dtype=torch.bfloat16, device=DEV)
            layer = LoRALinear(base.quantize_(w.to(DEV)), R, ALPHA, dropout).train()
            with torch.no_grad():
                layer.lora_A.weight.copy_(a.float())
                layer.lora_B.weight.copy_(b.float())
            self.layers.append(layer)
        self.layer_params = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        self.peer = self.peer_params = None
        if bnb is not None:
            mods = {}
            for i, w in enumerate(w_cpu):
                lin = bnb.nn.Linear4bit(K_IN, w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                        compress_statistics=True, quant_type="nf4")
                lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
                mods[f"p{i}"] = lin.to("cpu")  # quantized here, on the CPU
                same = torch.equal(lin.weight.data.view(-1), q_cpu[i].packed)
                RESULTS["env"][f"peer_nf4_bytes_equal_ours_{w.shape[0]}x{K_IN}"] = same
            config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(mods))
            self.peer = peft.get_peft_model(_Holder(**mods).to(DEV), config).train()
            self.peer_params = [p for p in self.peer.parameters() if p.requires_grad]
            RESULTS["env"]["peer_layer"] = type(self.peer.base_model.model.p0).__module__ + "." + \
                type(self.peer.base_model.model.p0).__name__

    # ---- the timed functions: forward, or forward + backward ----
    def ours(self, keys=None):
        return L.lora_forward(self.x, self.bases, self.As, self.Bs, [SCALE] * len(self.Ns), self.p,
                              self.keys if keys is None else keys, backend="triton")

    def ours_step(self):
        torch.autograd.grad(self.ours(), [self.x, *self.As, *self.Bs], self.gys)

    def ours_separate_step(self):  # q, k, v as three single-projection calls (qkv shape only)
        ys = [L.lora_forward(self.x, [b], [a], [bb], [SCALE], self.p, self.keys[i:i + 1], backend="triton")[0]
              for i, (b, a, bb) in enumerate(zip(self.bases, self.As, self.Bs))]
        torch.autograd.grad(ys, [self.x, *self.As, *self.Bs], self.gys)

    def engine(self):
        return [layer(self.x) for layer in self.layers]

    def engine_step(self):
        torch.autograd.grad(self.engine(), [self.x, *self.layer_params], self.gys)

    def gemm(self, options):  # the GEMM path, one call per projection (as LoRALinear makes them)
        return [L.lora_forward(self.x, [b], [a], [bb], [SCALE], self.p, self.cpu_keys[i:i + 1], backend="cublas",
                               options=options)[0]
                for i, (b, a, bb) in enumerate(zip(self.bases, self.As, self.Bs))]

    def candidate(self, name):
        """(forward, forward + backward) closures of one CANDIDATES entry."""
        path, options = CANDIDATES[name]
        if path == "gemm":
            fwd = lambda: self.gemm(options)  # noqa: E731
            leaves = [self.x, *self.As, *self.Bs]
        else:
            def fwd():
                with _layer_path(self.layers, path):
                    return self.engine()
            leaves = [self.x, *self.layer_params]
        return fwd, lambda: torch.autograd.grad(fwd(), leaves, self.gys)

    def peer_step(self):
        torch.autograd.grad(self.peer(self.x), [self.x, *self.peer_params], self.gys)

    def bf16_base(self):
        return [F.linear(self.x, w) for w in self.w16]

    def bf16_base_step(self):
        torch.autograd.grad(self.bf16_base(), [self.x], self.gys)

    def nf4_base_step(self):
        torch.autograd.grad([nf4_matmul(self.x, b.weight) for b in self.bases], [self.x], self.gys)

    # ---- floors ----
    def floor_ms(self) -> tuple[float, float]:
        N = sum(self.Ns)
        flops = 2 * 2 * M * K_IN * N + len(self.Ns) * 6 * M * K_IN * R + 6 * M * N * R
        nf4_bytes = sum(b.weight.nbytes for b in self.bases)
        # x read twice (forward GEMM, dA), y written, dY read, dX written, W read twice.
        hbm = 2 * (3 * M * K_IN + 2 * M * N) + 2 * nf4_bytes
        return 1e3 * flops / PEAK_FLOPS, 1e3 * hbm / PEAK_BYTES


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check_correctness(cases):
    for name, case in cases.items():
        for kind in ("nf4", "dense bf16"):
            bases = case.bases if kind == "nf4" else [L.Base(w) for w in case.w16]
            leaves = [case.x, *case.As, *case.Bs]
            args = (case.x, bases, case.As, case.Bs, [SCALE] * len(case.Ns), case.p, case.keys)
            want = L.lora_reference(*args)
            g_want = torch.autograd.grad(want, leaves, case.gys)
            for backend in ("triton", "cublas"):
                got = L.lora_forward(*args, backend=backend)
                g_got = torch.autograd.grad(got, leaves, case.gys)
                S = len(case.Ns)
                row = dict(shape=name, base=kind, path=backend, y=max(_rel(a, b) for a, b in zip(got, want)),
                           dX=_rel(g_got[0], g_want[0]),
                           dA=max(_rel(a, b) for a, b in zip(g_got[1:1 + S], g_want[1:1 + S])),
                           dB=max(_rel(a, b) for a, b in zip(g_got[1 + S:], g_want[1 + S:])))
                row["ok"] = all(row[k] < 2e-2 for k in ("y", "dX", "dA", "dB"))
                RESULTS["correctness"].append(row)
    print_table(RESULTS["correctness"])


def _interleaved(fns: dict, rounds: int) -> dict:
    """{name: (median over rounds, every round's ms)}: each round runs bench_ms on every fn in turn,
    so a slow spell of the host (the steps are host-bound: ours, the peer's and the bases' alike)
    falls on all of them rather than on one."""
    runs = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            runs[k].append(bench_ms(fn))
    return {k: (statistics.median(v), v) for k, v in runs.items()}


def time_cases(cases, candidates, rounds=ROUNDS):
    for name, case in cases.items():
        compute_ms, bytes_ms = case.floor_ms()
        main = {"engine": case.engine_step, "bf16_base": case.bf16_base_step, "ours_nf4_base": case.nf4_base_step}
        if case.peer is not None:
            main["peer"] = case.peer_step
        timed = _interleaved(main, rounds)
        ours = bench_ms(case.ours_step)
        row = dict(shape=name, ours_ms=ours, ours_fwd_ms=bench_ms(lambda: case.ours()),
                   bf16_base_ms=timed["bf16_base"][0], bf16_base_fwd_ms=bench_ms(case.bf16_base),
                   ours_nf4_base_ms=timed["ours_nf4_base"][0], floor_ms=max(compute_ms, bytes_ms),
                   floor_compute_ms=compute_ms, floor_hbm_ms=bytes_ms, engine_path=ML.CUDA_PATH,
                   rounds={k: v[1] for k, v in timed.items()})
        row["engine_ms"] = timed["engine"][0]
        row["engine_fwd_ms"] = bench_ms(case.engine)
        row["engine_over_bf16_base"] = row["engine_ms"] / row["bf16_base_ms"]
        if len(case.Ns) > 1:
            row["ours_3_calls_ms"] = bench_ms(case.ours_separate_step)
        if case.peer is not None:
            row["peer_ms"] = timed["peer"][0]
            row["peer_over_engine_by_round"] = [p / e for p, e in zip(timed["peer"][1], timed["engine"][1])]
            row["peer_fwd_ms"] = bench_ms(lambda: case.peer(case.x))
            row["peer_over_ours"] = row["peer_ms"] / ours
            row["peer_over_engine"] = row["peer_ms"] / row["engine_ms"]
        row["ours_over_bf16_base"] = ours / row["bf16_base_ms"]
        row["ours_over_floor"] = ours / row["floor_ms"]
        RESULTS["rows"].append(row)
        for cand in candidates:
            fwd, step = case.candidate(cand)
            c = dict(shape=name, candidate=cand, ms=bench_ms(step), fwd_ms=bench_ms(fwd))
            c["bwd_ms"] = c["ms"] - c["fwd_ms"]
            c["over_bf16_base"] = c["ms"] / row["bf16_base_ms"]
            c["over_nf4_base"] = c["ms"] / row["ours_nf4_base_ms"]
            if "peer_ms" in row:
                c["peer_over"] = row["peer_ms"] / c["ms"]
            c["meets_targets"] = (c["over_bf16_base"] <= TARGETS["ours_over_bf16_base"]
                                  and c.get("peer_over", 0.0) >= TARGETS["peer_over_ours"])
            RESULTS["candidates"].append(c)
            row[f"{cand}_ms"] = c["ms"]
    print_table(RESULTS["rows"], ["shape", "engine_path", "engine_ms", "peer_ms", "peer_over_engine",
                                  "engine_over_bf16_base", "ours_ms", "peer_over_ours", "bf16_base_ms",
                                  "ours_over_bf16_base", "ours_nf4_base_ms", "engine_fwd_ms", "ours_fwd_ms",
                                  "peer_fwd_ms", "bf16_base_fwd_ms", "ours_3_calls_ms", "floor_ms", "ours_over_floor"])
    if RESULTS["candidates"]:
        print()
        print_table(RESULTS["candidates"], ["shape", "candidate", "ms", "fwd_ms", "bwd_ms", "peer_over", "over_bf16_base",
                                            "over_nf4_base", "meets_targets"])
    print(f"targets: peer / x >= {TARGETS['peer_over_ours']}, x / bf16 base <= {TARGETS['ours_over_bf16_base']}")


# ----------------------------------------------------------------------------------------------
# Breakdown: which kernels a step runs, for how long, and whether the GPU waits for the host
# ----------------------------------------------------------------------------------------------


def _kernel_events(prof):
    from torch.autograd import DeviceType

    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


def _short(name: str) -> str:
    return name if len(name) <= 72 else name[:69] + "..."


def profile_step(fn, steps: int = 6) -> dict:
    """GPU time per kernel per step (torch.profiler), busy time vs span of `steps` back-to-back calls
    (L2 not flushed between them), and the host time of one call (perf_counter, no sync)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3 / steps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001  (no CUPTI: keep the host and wall times)
        return dict(host_ms=host_ms, wall_ms=wall_ms, profiler_error=repr(e)[:300], kernels=[])
    events = sorted(_kernel_events(prof), key=lambda e: e.time_range.start)
    per_kernel: dict[str, list] = {}
    busy, end = 0.0, None
    for e in events:
        s, t = e.time_range.start, e.time_range.end
        busy += max(0.0, t - max(s, end if end is not None else s))  # union of the intervals
        end = t if end is None else max(end, t)
        per_kernel.setdefault(e.name, [0, 0.0])
        per_kernel[e.name][0] += 1
        per_kernel[e.name][1] += t - s
    span = (end - events[0].time_range.start) if events else 0.0
    kernels = sorted(({"kernel": _short(k), "calls": c / steps, "us": us / steps} for k, (c, us) in per_kernel.items()),
                     key=lambda d: -d["us"])
    return dict(gpu_busy_ms=busy / steps / 1e3, span_ms=span / steps / 1e3, idle_ms=(span - busy) / steps / 1e3,
                host_ms=host_ms, wall_ms=wall_ms, kernels=kernels)


def _bench_of(shape: str, step: str):
    """The do_bench ms the timing part measured for this step (None when it did not run)."""
    row = next((r for r in RESULTS["rows"] if r["shape"] == shape), {})
    keys = {"bf16 base": "bf16_base_ms", "nf4 base": "ours_nf4_base_ms", "peer": "peer_ms"}
    if step in keys:
        return row.get(keys[step])
    if step.startswith("engine"):
        return row.get("engine_ms")
    return next((c["ms"] for c in RESULTS["candidates"] if c["shape"] == shape and c["candidate"] == step), None)


def breakdown(cases, candidates):
    for name in BREAKDOWN_SHAPES:
        case = cases[name]
        engine = f"engine ({ML.CUDA_PATH})"
        steps = {"bf16 base": case.bf16_base_step, "nf4 base": case.nf4_base_step, engine: case.engine_step}
        if case.peer is not None:
            steps["peer"] = case.peer_step
        steps.update({cand: case.candidate(cand)[1] for cand in candidates})
        rows = []
        for label, fn in steps.items():
            row = dict(shape=name, step=label, do_bench_ms=_bench_of(name, label), **profile_step(fn))
            RESULTS["breakdown"].append(row)
            rows.append(row)
        print(f"{name}: per step, GPU busy = sum of kernel time (profiler, 6 back-to-back steps, L2 warm), "
              "idle = span - busy (launch gaps), host = one call's CPU time, wall = synchronized")
        print_table(rows, ["step", "do_bench_ms", "gpu_busy_ms", "idle_ms", "span_ms", "host_ms", "wall_ms",
                           "profiler_error"])
        for row in rows:
            if row["step"] in BREAKDOWN_STEPS or row["step"] == engine:
                if row["kernels"]:
                    print(f"\n{name} | {row['step']}: kernels per step")
                    print_table([dict(k, us=round(k["us"], 1)) for k in row["kernels"][:8]], ["us", "calls", "kernel"])
        print()


# ----------------------------------------------------------------------------------------------
# Per-launch times
# ----------------------------------------------------------------------------------------------


def _pieces(case, dy_config=None, gemm_config=None):
    """The fused path's five launches on prepared inputs, each as a closure."""
    x2, S = case.x.detach(), len(case.Ns)
    a_cat = torch.cat([a.detach() for a in case.As])
    b_cat = torch.cat([b.detach() for b in case.Bs])
    scales = [SCALE] * S
    xa = L._launch_down(x2, a_cat, case.keys, scales, case.p, R)
    g, _ = L._launch_dy(case.gys, b_cat, xa, scales, R)
    return {
        "down (xa)": lambda: L._launch_down(x2, a_cat, case.keys, scales, case.p, R),
        "fwd GEMM + epilogue": lambda: L._launch_fwd(x2, xa, b_cat, None, case.bases, R, gemm_config),
        "dY pass (g, dB)": lambda: L._launch_dy(case.gys, b_cat, xa, scales, R, dy_config),
        "dX GEMM + epilogue + dA": lambda: L._launch_dx(case.gys, case.bases, g, a_cat, case.keys, case.p, R, x2,
                                                        gemm_config),
        "dA alone (no dX)": lambda: L._launch_da(x2, g, case.keys, case.p, R, S),
    }


def _gemm_pieces(case, down_config=None, adx_config=None, dy_config=None):
    """The GEMM path's launches for the first projection, each as a closure (names say which)."""
    x2, a, b = case.x.detach(), case.As[0].detach(), case.Bs[0].detach()
    base, dy, keys, p = case.bases[0], case.gys[0], L.key_pair(case.cpu_keys[0]), case.p
    w = base.dense(torch.bfloat16)
    b16 = b.to(torch.bfloat16)
    sc = SCALE / (1 - p)
    xa = L._launch_adapter_down(x2, a, keys, p, sc)[0]
    g = dy @ b16
    y, t = torch.mm(xa, b16.t()), torch.empty_like(x2)
    ws = R * (M + K_IN + b.shape[0])  # the backward's fp32 accumulators: dA, g, dB
    return {
        "gemm: dequant W -> bf16": lambda: base.dense(torch.bfloat16),
        "gemm: cast A, B to bf16": lambda: (a.to(torch.bfloat16), b.to(torch.bfloat16)),
        "gemm: down (Triton, dropout + x A^T)": lambda: L._launch_adapter_down(x2, a, keys, p, sc, down_config),
        "gemm: down + B cast + accumulators zeroed (Triton)": lambda: L._launch_adapter_down(
            x2, a, keys, p, sc, down_config, b=b, workspace=ws),
        "gemm: down + B cast + accumulators zeroed + dequant W (Triton)": lambda: L._launch_adapter_down(
            x2, a, keys, p, sc, down_config, b=b, workspace=ws, nf4=base.weight if base.is_nf4 else None),
        "gemm: down + B cast + accumulators zeroed + dequant W + Y = xa B^T (Triton)": lambda: L._launch_adapter_down(
            x2, a, keys, p, sc, down_config, b=b, workspace=ws, nf4=base.weight if base.is_nf4 else None, y=y),
        "gemm: Y = xa B^T (cuBLAS, K=r)": lambda: torch.mm(xa, b16.t()),
        "gemm: Y += x W^T (cuBLAS beta=1)": lambda: y.addmm_(x2, w.t()),
        "gemm: Y = x W^T (cuBLAS, no C)": lambda: F.linear(x2, w),
        "gemm: Y += xa B^T (cuBLAS beta=1, K=r)": lambda: y.addmm_(xa, b16.t()),
        "gemm: g = dY B (cuBLAS)": lambda: dy @ b16,
        "gemm: dB = dY^T xa (cuBLAS, fp32 out)": lambda: L._mm_f32(dy.t(), xa),
        "gemm: g, dB in one dY pass (Triton)": lambda: L._launch_dy(
            [dy], b, xa, [1.0], R, dy_config or L.dy_native_config(dy.shape[1]), native=True),
        "gemm: T + dA (Triton, one x pass)": lambda: L._launch_adapter_dx(x2, g, a, keys, p, sc, t, False, True,
                                                                          adx_config),
        "gemm: dA alone (Triton)": lambda: L._launch_adapter_dx(x2, g, a, keys, p, sc, None, False, True, adx_config),
        "gemm: dX += dY W (cuBLAS beta=1)": lambda: t.addmm_(dy, w),
        "gemm: dX = dY W (cuBLAS, no C)": lambda: dy @ w,
    }


def time_kernels(cases):
    for name in ("q/o 4096->4096", "k/v 4096->1024"):
        case = cases[name]
        for kernel, fn in {**_gemm_pieces(case), **_pieces(case)}.items():
            RESULTS["kernels"].append(dict(shape=name, kernel=kernel, us=1e3 * bench_ms(fn)))
    name = "q+k+v 4096->6144"
    for kernel, fn in _pieces(cases[name]).items():
        RESULTS["kernels"].append(dict(shape=name, kernel=kernel, us=1e3 * bench_ms(fn)))
    print_table(RESULTS["kernels"])


def sweep(cases):
    """The GEMM path's Triton passes (down, T + dA: the same x for every shape; one-pass dY) over a
    few tiles each. The first config of each list is the default (kernels/lora.py)."""
    for name in ("q/o 4096->4096", "k/v 4096->1024"):
        case = cases[name]
        for cfg in DOWN_SWEEP if name.startswith("q/o") else []:
            fn = _gemm_pieces(case, down_config=cfg)["gemm: down (Triton, dropout + x A^T)"]
            RESULTS["sweep"].append(dict(shape=name, kernel="adapter down", config=str(cfg), us=1e3 * bench_ms(fn)))
        for cfg in ADX_SWEEP if name.startswith("q/o") else []:
            fn = _gemm_pieces(case, adx_config=cfg)["gemm: T + dA (Triton, one x pass)"]
            RESULTS["sweep"].append(dict(shape=name, kernel="adapter T + dA", config=str(cfg), us=1e3 * bench_ms(fn)))
        for cfg in DY_NATIVE_SWEEP:
            fn = _gemm_pieces(case, dy_config=cfg)["gemm: g, dB in one dY pass (Triton)"]
            RESULTS["sweep"].append(dict(shape=name, kernel="dY pass native", config=str(cfg), us=1e3 * bench_ms(fn)))
    print_table([r for r in RESULTS["sweep"] if "kernel" in r], ["shape", "kernel", "us", "config"])


def fused_sweep(cases):
    for name in ("q/o 4096->4096", "k/v 4096->1024"):
        case = cases[name]
        for cfg in FWD_SWEEP:
            p = _pieces(case, gemm_config=cfg)
            row = dict(shape=name, config=str(cfg), fwd_us=1e3 * bench_ms(p["fwd GEMM + epilogue"]),
                       dx_us=1e3 * bench_ms(p["dX GEMM + epilogue + dA"]))
            RESULTS["sweep"].append(row)
        for cfg in DY_SWEEP:
            p = _pieces(case, dy_config=cfg)
            RESULTS["sweep"].append(dict(shape=name, config=str(cfg), dy_us=1e3 * bench_ms(p["dY pass (g, dB)"])))
    print_table([r for r in RESULTS["sweep"] if "kernel" not in r])


PARTS = ("correctness", "timing", "breakdown", "kernels", "sweep", "fused_sweep")


def main(argv=None):
    global OUT_PATH
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep part")
    p.add_argument("--parts", default="correctness,timing,breakdown,kernels,sweep")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"any of {','.join(CANDIDATES)}")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds of the engine, peer and bases")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/lora.py needs a CUDA GPU (the kernels' CPU tests are in tests/kernels).")
    parts = [x for x in a.parts.split(",") if x and not (a.no_sweep and x == "sweep")]
    candidates = [c for c in a.candidates.split(",") if c]
    unknown = [x for x in parts if x not in PARTS] + [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown parts/candidates {unknown}; parts: {PARTS}; candidates: {list(CANDIDATES)}")
    OUT_PATH = a.out
    RESULTS["case"]["dropout"] = a.dropout
    RESULTS["config"] = dict(engine_path=ML.CUDA_PATH, gemm_options=str(L.GEMM_OPTIONS), parts=parts,
                             candidates=candidates)
    bnb, peft = _peers()
    t0 = time.time()
    cases = {name: Case(Ns, a.dropout, bnb, peft) for name, Ns in SHAPES.items()}
    print(f"[setup] {time.time() - t0:.1f}s", flush=True)
    jobs = dict(correctness=lambda: check_correctness(cases), timing=lambda: time_cases(cases, candidates, a.rounds),
                breakdown=lambda: breakdown(cases, candidates), kernels=lambda: time_kernels(cases), sweep=lambda: sweep(cases),
                fused_sweep=lambda: fused_sweep(cases))
    for part in parts:
        section(part)(jobs[part])
    write_json(a.out, RESULTS)


if __name__ == "__main__":
    main()
