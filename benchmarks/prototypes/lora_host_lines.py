"""Host (CPU) time per LoRA step of the GEMM path's pieces, from timing wrappers around its functions.

    python3 benchmarks/prototypes/lora_host_lines.py      # from the repository root, on a GPU machine

Prints, per step of benchmarks/lora.py's engine step (q/o and k/v, 3 rounds of 30 steps), the host
microseconds spent in LoRALinear.forward, the autograd Function's forward and backward bodies, the
two adapter launchers, all Triton launches together, and torch.autograd.grad (session 10's numbers
are in benchmarks/RESULTS.md)."""
import sys, time, os, collections
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
import lora as LB
from kernels import lora as L
import models.lora as ML
T = collections.defaultdict(float); pc = time.perf_counter
def wrap(obj, name, label, static=False):
    f = getattr(obj, name)
    def g(*a, **k):
        t0 = pc(); r = f(*a, **k); T[label] += pc() - t0; return r
    setattr(obj, name, staticmethod(g) if static else g)
from triton.runtime.jit import JITFunction
wrap(JITFunction, "run", "  triton run (all)")
wrap(L, "_launch_adapter_down", " down launcher")
wrap(L, "_launch_adapter_dx", " dx launcher")
wrap(L, "_mm_f32", " mm_f32 (dB)")
wrap(L._GemmLoRAFunction, "forward", "forward body", static=True)
wrap(L._GemmLoRAFunction, "backward", "backward body", static=True)
wrap(L, "lora_gemm", "lora_gemm (apply)")
wrap(ML.LoRALinear, "forward", "LoRALinear.forward")
wrap(L, "_layer_args", " _layer_args")
for name, Ns in [("q/o", (4096,)), ("k/v", (1024,))]:
    case = LB.Case(Ns, 0.1, None, None)
    for _ in range(5): case.engine_step()
    for rnd in range(3):
        torch.cuda.synchronize(); T.clear()
        t0 = pc()
        for _ in range(30):
            t1 = pc(); ys = case.engine(); T["step: forward"] += pc() - t1
            t1 = pc(); torch.autograd.grad(ys, [case.x, *case.layer_params], case.gys); T["step: autograd.grad"] += pc() - t1
        T["step total"] = pc() - t0
        torch.cuda.synchronize()
        print(name, "round", rnd, "  ".join(f"{k.strip()}={T[k] / 30 * 1e6:.0f}" for k in sorted(T, key=lambda k: -T[k])), flush=True)
