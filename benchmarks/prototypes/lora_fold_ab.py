"""Session 13: Y = xa B^T in the forward's Triton launch (y_in_down) on and off, interleaved in one process:
GPU busy per step (profiler), do_bench wall, host enqueue time, q/o and k/v through the GEMM path."""
import sys, time, os, statistics, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
import lora as LB
from common import bench_ms
from kernels import lora as L
pc = time.perf_counter
res = {}
cases = {name: LB.Case(Ns, 0.1, None, None) for name, Ns in [("q/o", (4096,)), ("k/v", (1024,))]}
opts = {"fold": L.GemmOptions(), "cublas_y": L.GemmOptions(y_in_down=False)}
steps = {(n, o): (lambda c=c, op=op: torch.autograd.grad(c.gemm(op), [c.x, *c.As, *c.Bs], c.gys))
         for n, c in cases.items() for o, op in opts.items()}
for fn in steps.values():
    for _ in range(5): fn()
torch.cuda.synchronize()
for rnd in range(5):
    order = list(steps.items()) if rnd % 2 == 0 else list(reversed(steps.items()))
    for (n, o), fn in order:
        k = f"{n} {o}"
        prof = LB.profile_step(fn)
        res.setdefault("gpu_busy_us", {}).setdefault(k, []).append(round(prof["gpu_busy_ms"] * 1e3, 1))
        res.setdefault("wall_ms", {}).setdefault(k, []).append(round(bench_ms(fn), 4))
        torch.cuda.synchronize(); t0 = pc()
        for _ in range(30): fn()
        t1 = pc(); torch.cuda.synchronize()
        res.setdefault("host_us", {}).setdefault(k, []).append(round((t1 - t0) / 30 * 1e6))
        if rnd == 0:
            res.setdefault("kernels", {})[k] = [(round(d["us"], 1), d["kernel"]) for d in prof["kernels"][:8]]
med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in res.items() if m != "kernels"}
print(json.dumps(med, indent=1), flush=True)
print(json.dumps(res["kernels"], indent=0), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "fold_ab_s13.json"), "w"), indent=1)
