"""The Gluon GEMV prototype vs nf4_gemv (M=1) on Mixtral shapes, on a GPU: relative error against
the reference and CUDA-graph time. Configs: (lanes over groups, warps over groups, warps, groups per
thread, words two steps ahead). Writes gl_ab.json under $OUT (default: here)."""
import json, os, sys, torch
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..")); sys.path.insert(0, os.path.join(here, "..", "..")); sys.path.insert(0, here)
import common  # noqa
from common import bench_graph_us
from kernels import nf4 as N
import gluon_gemv as GG
res = []
g = torch.Generator(device="cuda").manual_seed(0)
for (n, k) in ((14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)):
    qs = [N.quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02) for _ in range(4)]
    nbytes = qs[0].packed.numel() + qs[0].absmax.numel() + 4 * qs[0].absmax2.numel()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
    want = N.nf4_matmul_reference(x, qs[0]).float()
    for rnd in range(2):
        for name, fn in [("nf4_gemv", lambda q: N.nf4_gemv(x, q))] + [
                (f"gluon {c}", (lambda c: lambda q: GG.gemv_gluon(x, q, *c))(c))
                for c in ((2, 4, 4, 1, False), (2, 4, 4, 1, True), (2, 4, 4, 2, False), (2, 4, 4, 2, True),
                          (2, 2, 4, 2, True), (4, 4, 4, 1, True), (1, 4, 4, 2, True))]:
            try:
                got = fn(qs[0]).float()
                err = ((got - want).abs().max() / want.abs().max()).item()
                us = bench_graph_us([(lambda q: lambda: fn(q))(q) for q in qs])
                r = dict(N=n, K=k, round=rnd, what=name, us=us, TBps=nbytes / us / 1e6, err=err)
            except Exception as e:
                r = dict(N=n, K=k, what=name, error=repr(e)[:300])
            res.append(r); print(r, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gl_ab.json"), "w"), indent=1)
