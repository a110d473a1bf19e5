"""Session 13: the forward launch with Y = xa B^T written by its row tiles, against the cuBLAS call."""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch
from triton.testing import do_bench
from kernels import lora as L
from kernels.nf4 import quantize_nf4
torch.manual_seed(0)
M, K, r, p = 5120, 4096, 16, 0.1
sc = 4.0 / 0.9
keys = (1234567, 7654321)
out = {"device": torch.cuda.get_device_name(), "rows": []}
def us(fn): return round(do_bench(fn, warmup=50, rep=300) * 1e3, 1)
for N in (4096, 1024):
    x2 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, K, device="cuda") * 0.05
    b = torch.randn(N, r, device="cuda") * 0.05
    q = quantize_nf4(torch.randn(N, K, device="cuda") * 0.02)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    ws = r * (M + K + N)
    xa = L._launch_adapter_down(x2, a, keys, p, sc, b=b, workspace=ws, nf4=q)[0]
    b16 = b.to(torch.bfloat16)
    row = dict(N=N, launch_no_y=us(lambda: L._launch_adapter_down(x2, a, keys, p, sc, b=b, workspace=ws, nf4=q)),
               cublas_y=us(lambda: torch.mm(xa, b16.t(), out=y)))
    ref = xa @ b16.t()
    for name, cfg in {"default": None, "w8": dict(num_warps=8), "maxnreg168": dict(maxnreg=168),
                      "bn128": dict(BLOCK_N=128), "s2": dict(num_stages=2)}.items():
        try:
            y.fill_(float("nan"))
            L._launch_adapter_down(x2, a, keys, p, sc, cfg, b=b, workspace=ws, nf4=q, y=y)
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row[name] = dict(us=us(lambda: L._launch_adapter_down(x2, a, keys, p, sc, cfg, b=b, workspace=ws, nf4=q, y=y)), err=err)
        except Exception as e:
            row[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(json.dumps(row), flush=True)
    out["rows"].append(row)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "down_probe_s13.json"), "w"), indent=1)
