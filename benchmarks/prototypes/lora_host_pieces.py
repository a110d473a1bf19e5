"""Where a lone q/o LoRA step's host time goes on the GEMM path (session 12 measurement driver).

Wraps the GEMM path's functions (the autograd Function's forward and backward bodies, the three launchers,
kernels.launch's pieces, the compiled kernels' C launchers, torch.mm) in perf_counter timers and enqueues 30
forward + backward steps of benchmarks/lora.py's q/o case with no sync in between; prints the microseconds
per step of each (nested: a launcher includes its launch()), then a few of the same calls in a tight loop.
The wrappers add ~0.5 us per call. Run from the repository root on a GPU:
python3 benchmarks/prototypes/lora_host_pieces.py  (writes host_probe3.json into $OUT or /tmp)
Results: benchmarks/NOTES.md, "LoRA, session 12"."""
import sys, time, os, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
import lora as LB
from kernels import lora as L, launch as LA, nf4 as N
pc = time.perf_counter
acc = {}
def wrap(name, fn):
    def w(*a, **k):
        t0 = pc(); r = fn(*a, **k); acc[name] = acc.get(name, 0.0) + pc() - t0; return r
    return w
F = L._GemmLoRAFunction
F.forward = staticmethod(wrap("fwd body", F.forward))
F.backward = staticmethod(wrap("bwd body", F.backward))
for nm in ("_launch_dy", "_launch_adapter_dx", "_launch_adapter_down", "_scratch", "dequant_launch", "key_pair",
           "_rows_per_prog", "_num_sms", "keep_threshold"):
    setattr(L, nm, wrap(nm, getattr(L, nm)))
real_launch = LA.launch
L.launch = wrap("launch()", real_launch)
for nm in ("_key", "_device", "hooks_idle", "_stream"):
    setattr(LA, nm, wrap("LA." + nm, getattr(LA, nm)))
N.NF4Tensor.tensors = wrap("nf4.tensors", N.NF4Tensor.tensors)
torch_mm, torch_addmm = torch.mm, torch.Tensor.addmm_
L.torch.mm = wrap("torch.mm", torch_mm)
case = LB.Case((4096,), 0.1, None, None)
def step():
    t0 = pc(); ys = case.engine(); t1 = pc()
    torch.autograd.grad(ys, [case.x, *case.layer_params], case.gys); t2 = pc()
    acc["engine() outer"] = acc.get("engine() outer", 0.0) + t1 - t0
    acc["grad outer"] = acc.get("grad outer", 0.0) + t2 - t1
for _ in range(5): step()
torch.cuda.synchronize()
# wrap the launcher call itself: find kept entries and wrap their launchers
for key, entry in list(LA._KERNELS.items()):
    launcher, function, metadata, tail = entry
    LA._KERNELS[key] = (wrap("C launcher " + getattr(key[0], "__name__", str(key[0]))[:30], launcher), function, metadata, tail)
out = []
for rnd in range(5):
    acc.clear()
    torch.cuda.synchronize(); t0 = pc()
    for _ in range(30): step()
    t1 = pc(); torch.cuda.synchronize()
    r = {k: round(v / 30 * 1e6, 1) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}
    r["step"] = round((t1 - t0) / 30 * 1e6, 1)
    out.append(r)
print(json.dumps(out[-2:], indent=0), flush=True)
# micro costs in a tight loop, for comparison
dev = case.x.device
def tight(fn, n=2000):
    for _ in range(50): fn()
    t0 = pc()
    for _ in range(n): fn()
    return round((pc() - t0) / n * 1e6, 2)
print("tight:", dict(empty=tight(lambda: torch.empty((5120, 16), device=dev)),
                     num_sms=tight(lambda: N._num_sms(dev)), current_device=tight(torch.cuda.current_device),
                     new_empty=tight(lambda: case.x.new_empty((5120, 4096)))), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "host_probe3.json"), "w"), indent=1)
