"""The LoRA GEMM path's host changes of session 11 on and off, interleaved in one process (GPU machine):

    python3 benchmarks/prototypes/lora_host_ab.py      # from the repository root

'off' launches through fn[grid] (kernels.launch.FAST = False) and uses triton.cdiv / next_power_of_2 in the
host code, as before session 11. Prints do_bench medians of 7 rounds per step (q/o, k/v, q+k+v through
LoRALinear), the host time per step, and a cProfile of the q/o step (results/lora_host_ab_call3_session11.json)."""
import sys, time, os, collections, statistics, json, cProfile, pstats, io
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, triton
import lora as LB
from common import bench_ms
from kernels import lora as L, launch as LA, nf4 as N
OUT = os.environ.get("OUT", ".")
orig = (LA.cdiv, LA.next_power_of_2)
def mode(on):
    LA.FAST = on
    c, p2 = orig if on else (triton.cdiv, triton.next_power_of_2)
    L.cdiv = N.cdiv = c; L.next_power_of_2 = N.next_power_of_2 = p2
res = {}
cases = {}
for name, Ns in [("q/o", (4096,)), ("k/v", (1024,)), ("qkv", (4096, 1024, 1024))]:
    cases[name] = LB.Case(Ns, 0.1, None, None)
    for on in (False, True):
        mode(on)
        for _ in range(5): cases[name].engine_step()
pc = time.perf_counter
for rnd in range(7):
    for name, case in cases.items():
        for on in ((False, True) if rnd % 2 else (True, False)):
            mode(on)
            ms = bench_ms(case.engine_step)
            res.setdefault("wall_ms", {}).setdefault(f"{name} {'new' if on else 'off'}", []).append(round(ms, 4))
    # host time per step (no sync inside): 30 steps
    for name in ("q/o", "k/v"):
        case = cases[name]
        for on in (False, True):
            mode(on)
            torch.cuda.synchronize(); t0 = pc()
            for _ in range(30):
                case.engine_step()
            t1 = pc(); torch.cuda.synchronize()
            res.setdefault("host_us", {}).setdefault(f"{name} {'new' if on else 'off'}", []).append(round((t1 - t0) / 30 * 1e6))
med = {k: statistics.median(v) for k, v in res["wall_ms"].items()}
print("wall ms per step (do_bench), medians of 7 interleaved rounds:", json.dumps(med, indent=1), flush=True)
print("host us per step (enqueue of 30 steps; GPU-bound when below GPU time):",
      json.dumps({k: statistics.median(v) for k, v in res["host_us"].items()}), flush=True)
print(json.dumps(res), flush=True)
mode(True)
case = cases["q/o"]
pr = cProfile.Profile(); pr.enable()
for _ in range(60): case.engine_step()
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
print(s.getvalue()[-5000:])
json.dump(res, open(f"{OUT}/host_ab_session11.json", "w"), indent=1)
