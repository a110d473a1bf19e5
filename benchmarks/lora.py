"""Fused LoRA (r=16) over an NF4 base vs bitsandbytes + PEFT and vs the frozen bf16 base alone (GPU).

    python benchmarks/lora.py --out runs/bench_lora.json          # about 1-2 minutes on an H100
    python benchmarks/lora.py --dropout 0 --no-sweep

Case: Mixtral's attention projections, 5120 tokens (batch 8 x 640), bf16, LoRA r=16, alpha=64,
dropout 0.1 in training mode (the v5 recipe), forward plus backward (dX, dA, dB):
  q/o 4096->4096, k/v 4096->1024, and q+k+v over one x (4096 -> 4096 + 1024 + 1024).
1. Correctness in bf16 on the GPU: our kernels vs `lora_reference` (same dropout mask): relative
   error of y, dX, dA, dB, for the NF4 base and a dense bf16 base.
2. Timing (median of triton.testing.do_bench, L2 flushed), forward + backward:
   ours             lora_forward over NF4 weights (fused kernels)
   peer             bitsandbytes Linear4bit (nf4, compute bf16, double quant) + a PEFT LoRA layer,
                    the same NF4 bytes (both quantized on the CPU, byte-equal)
   bf16 base        the frozen bf16 weight alone: cuBLAS forward + dX (the ceiling LoRA adds to)
   ours NF4 base    our NF4 GEMM forward + dX without the adapter (kernels/nf4.py)
   plus the forward alone, and our per-kernel times for the single-projection shapes.
   Ratios: peer / ours (target >= 2), ours / bf16 base (target <= 1.15).
3. A small sweep of the two GEMM kernels' tiles and of the dY pass (skip with --no-sweep).
Floors: FLOPs / 750 TFLOP/s and the least HBM traffic / 3.0 TB/s (the DESIGN.md anchors).
bitsandbytes and peft are optional: without them the peer columns are left out.
"""
from __future__ import annotations

import time
import traceback

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
import torch.nn.functional as F
from common import bench_ms, env_info, parser, print_table, write_json
from torch import nn

from kernels import lora as L
from kernels.nf4 import nf4_matmul, quantize_nf4

DEV = "cuda"
M = 8 * 640
K_IN = 4096
SHAPES = {"q/o 4096->4096": (4096,), "k/v 4096->1024": (1024,), "q+k+v 4096->6144": (4096, 1024, 1024)}
R, ALPHA = 16, 64
TARGETS = dict(peer_over_ours=2.0, ours_over_bf16_base=1.15)
PEAK_FLOPS, PEAK_BYTES = 750e12, 3.0e12

FWD_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2),
]  # BLOCK_N is W's rows per tile (the MMA's A operand), BLOCK_M the tokens
DY_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=3) for bm, bn, w in
            [(32, 128, 4), (32, 256, 8), (64, 128, 4), (64, 256, 8)]]

RESULTS: dict = {"env": env_info(), "case": dict(M=M, K=K_IN, r=R, alpha=ALPHA), "targets": TARGETS,
                 "correctness": [], "rows": [], "kernels": [], "sweep": [], "errors": {}}


def section(name, fn, *args):
    """Run one part; a failure is recorded and the run goes on."""
    t0 = time.time()
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        RESULTS["errors"][name] = repr(e)
    print(f"[{name}] {time.time() - t0:.1f}s\n")


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
        # The engine's default path: LoRALinear over NF4Linear (models/lora.py), base through
        # nf4_matmul, adapter as thin matmuls (fp32 adapter weights, as in training).
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
        return L.lora_forward(self.x, self.bases, self.As, self.Bs, [ALPHA / R] * len(self.Ns), self.p,
                              self.keys if keys is None else keys, backend="triton")

    def ours_step(self):
        torch.autograd.grad(self.ours(), [self.x, *self.As, *self.Bs], self.gys)

    def ours_separate_step(self):  # q, k, v as three single-projection calls (qkv shape only)
        ys = [L.lora_forward(self.x, [b], [a], [bb], [ALPHA / R], self.p, self.keys[i:i + 1], backend="triton")[0]
              for i, (b, a, bb) in enumerate(zip(self.bases, self.As, self.Bs))]
        torch.autograd.grad(ys, [self.x, *self.As, *self.Bs], self.gys)

    def engine_step(self):
        ys = [layer(self.x) for layer in self.layers]
        torch.autograd.grad(ys, [self.x, *self.layer_params], self.gys)

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
            args = (case.x, bases, case.As, case.Bs, [ALPHA / R] * len(case.Ns), case.p, case.keys)
            got = L.lora_forward(*args, backend="triton")
            want = L.lora_reference(*args)
            g_got = torch.autograd.grad(got, leaves, case.gys)
            g_want = torch.autograd.grad(want, leaves, case.gys)
            row = dict(shape=name, base=kind, y=max(_rel(a, b) for a, b in zip(got, want)),
                       dX=_rel(g_got[0], g_want[0]),
                       dA=max(_rel(a, b) for a, b in zip(g_got[1:1 + len(case.Ns)], g_want[1:1 + len(case.Ns)])),
                       dB=max(_rel(a, b) for a, b in zip(g_got[1 + len(case.Ns):], g_want[1 + len(case.Ns):])))
            row["ok"] = all(row[k] < 2e-2 for k in ("y", "dX", "dA", "dB"))
            RESULTS["correctness"].append(row)
    print_table(RESULTS["correctness"])


def time_cases(cases):
    for name, case in cases.items():
        compute_ms, bytes_ms = case.floor_ms()
        ours = bench_ms(case.ours_step)
        row = dict(shape=name, ours_ms=ours, ours_fwd_ms=bench_ms(lambda: case.ours()),
                   bf16_base_ms=bench_ms(case.bf16_base_step), bf16_base_fwd_ms=bench_ms(case.bf16_base),
                   ours_nf4_base_ms=bench_ms(case.nf4_base_step), floor_ms=max(compute_ms, bytes_ms),
                   floor_compute_ms=compute_ms, floor_hbm_ms=bytes_ms)
        row["engine_ms"] = bench_ms(case.engine_step)
        row["engine_over_bf16_base"] = row["engine_ms"] / row["bf16_base_ms"]
        if len(case.Ns) > 1:
            row["ours_3_calls_ms"] = bench_ms(case.ours_separate_step)
        if case.peer is not None:
            row["peer_ms"] = bench_ms(case.peer_step)
            row["peer_fwd_ms"] = bench_ms(lambda: case.peer(case.x))
            row["peer_over_ours"] = row["peer_ms"] / ours
            row["peer_over_engine"] = row["peer_ms"] / row["engine_ms"]
        row["ours_over_bf16_base"] = ours / row["bf16_base_ms"]
        row["ours_over_floor"] = ours / row["floor_ms"]
        RESULTS["rows"].append(row)
    print_table(RESULTS["rows"], ["shape", "engine_ms", "peer_ms", "peer_over_engine", "engine_over_bf16_base",
                                  "ours_ms", "peer_over_ours", "bf16_base_ms",
                                  "ours_over_bf16_base", "ours_nf4_base_ms", "ours_fwd_ms", "peer_fwd_ms",
                                  "bf16_base_fwd_ms", "ours_3_calls_ms", "floor_ms", "ours_over_floor"])
    print(f"targets: peer/ours >= {TARGETS['peer_over_ours']}, ours/bf16 base <= {TARGETS['ours_over_bf16_base']}")


def _pieces(case, dy_config=None, gemm_config=None):
    """Our five launches on prepared inputs, each as a closure (for per-kernel times and sweeps)."""
    x2, S = case.x.detach(), len(case.Ns)
    a_cat = torch.cat([a.detach() for a in case.As])
    b_cat = torch.cat([b.detach() for b in case.Bs])
    scales = [ALPHA / R] * S
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


def time_kernels(cases):
    for name, case in cases.items():
        for kernel, fn in _pieces(case).items():
            RESULTS["kernels"].append(dict(shape=name, kernel=kernel, us=1e3 * bench_ms(fn)))
    print_table(RESULTS["kernels"])


def sweep(cases):
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
    print_table(RESULTS["sweep"])


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--no-sweep", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/lora.py needs a CUDA GPU (the kernels' CPU tests are in tests/kernels).")
    RESULTS["case"]["dropout"] = a.dropout
    bnb, peft = _peers()
    t0 = time.time()
    cases = {name: Case(Ns, a.dropout, bnb, peft) for name, Ns in SHAPES.items()}
    print(f"[setup] {time.time() - t0:.1f}s")
    section("correctness", check_correctness, cases)
    section("timing", time_cases, cases)
    section("kernels", time_kernels, cases)
    if not a.no_sweep:
        section("sweep", sweep, cases)
    write_json(a.out, RESULTS)


if __name__ == "__main__":
    main()
