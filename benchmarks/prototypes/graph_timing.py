"""How the graph timing of the decode GEMV reads (common.bench_graph_us): per-call microseconds of
graphs of n calls (cycling over 6 weight copies), with and without the spin kernel before the start
event (`busy`), and the slope T(48) - T(12) over 36 calls, i.e. the per-call cost deep in a chain.
Also the GEMV without its cast launch (timing only: its sums are never cast nor re-zeroed) and with
programmatic dependent launch off.

Usage (GPU): python3 benchmarks/prototypes/graph_timing.py   (writes graph_timing.json into $OUT or /tmp)
Results: benchmarks/RESULTS.md and NOTES.md, "Session 12"."""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402

from common import bench_graph_us  # noqa: E402
from kernels import nf4 as N  # noqa: E402
from kernels import nf4_tc as T  # noqa: E402
from kernels import pdl  # noqa: E402


def graph_total_us(calls, busy: bool) -> float:
    """Median microseconds of one replay of a graph of `calls` (common.bench_graph_us gives it per call)."""
    return bench_graph_us(calls, reps=30, busy=busy) * len(calls)


def gemv_no_cast(x, q):
    """nf4_gemv_tc's GEMV launch without the cast launch (timing only)."""
    n, k = q.shape
    m = x.shape[0]
    programs, per, meta = T.plan(n, k, N._num_sms(x.device), None)
    meta["PDL"] = meta["PDL"] and pdl.enabled(x)
    acc = T.resident_sums(x.device, m * n, "timing probe")
    T._nf4_tc_kernel[(programs,)](
        x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, N.nf4_half_pairs(str(x.device), x.dtype), acc,
        T.zero_words(x.device), m, n, k, per, **T.kernel_constexprs(x.dtype, None, T.takes_four(m), None),
        **T.PDL_PTX, launch_pdl=meta["PDL"], **meta)


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    out = dict(gpu=torch.cuda.get_device_name(), rows=[])
    for n, k in [(14336, 4096), (4096, 14336)]:
        qs = [N.quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
              for _ in range(6)]
        nbytes = qs[0].packed.numel() + qs[0].absmax.numel() + 4 * qs[0].absmax2.numel()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
        for what in ("gemv", "gemv no cast", "gemv no pdl"):
            for busy in (True, False):
                pdl.ENABLED = what != "gemv no pdl"
                fn = gemv_no_cast if what == "gemv no cast" else N.nf4_matmul
                total = {c: graph_total_us([(lambda q: lambda: fn(x, q))(qs[i % 6]) for i in range(c)], busy)
                         for c in (1, 4, 6, 12, 48)}
                pdl.ENABLED = True
                slope = (total[48] - total[12]) / 36
                row = dict(shape=f"{n}x{k}", M=1, what=what, busy=busy,
                           per_call_us={c: round(t / c, 2) for c, t in total.items()},
                           slope_us=round(slope, 2), slope_TBps=round(nbytes / slope / 1e6, 3))
                out["rows"].append(row)
                print(row, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "graph_timing.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
