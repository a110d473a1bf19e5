"""A/B of the tensor-core decode GEMV (kernels/nf4_tc.py) on the Mixtral shapes, CUDA-graph timed.

Candidates, all in the same run: nf4_gemv's CUDA-core kernels (`pre-tc`, nf4_gemv(x, q, {})), an
older copy of kernels/nf4_tc.py (--old, e.g. `git show fcfc01b:kernels/nf4_tc.py > /tmp/old.py`),
and nf4_gemv_tc with each config of --configs (JSON: name -> config dict; default: the default
config). Each timing replays 6 calls on 6 different weights from one CUDA graph (more bytes than
L2 holds); the table keeps the best of --rounds rounds.

    python3 benchmarks/nf4_tc_ab.py --old /tmp/old.py --configs '{"default": {}, "no cast reuse": {"RESIDENT": false}}'
"""
import importlib.util
import json
import traceback

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import bench_graph_us, env_info, parser, write_json

from kernels import nf4 as N
from kernels import nf4_tc as T

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]
TOKENS = (1, 3, 8)


def _module(path: str):
    spec = importlib.util.spec_from_file_location("nf4_tc_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--old", default=None, help="path of an older kernels/nf4_tc.py to time beside")
    p.add_argument("--configs", default='{"default": {}}', help="JSON: name -> nf4_gemv_tc config")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_tc_ab.py needs a CUDA GPU")
    configs = json.loads(a.configs)
    old = _module(a.old) if a.old else None
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in SHAPES:
        qs = [N.quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
              for _ in range(6)]
        nbytes = qs[0].packed.numel() + qs[0].absmax.numel() + 4 * qs[0].absmax2.numel()
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            want = N.nf4_matmul_reference(x, qs[0]).float()
            cands = [("pre-tc", lambda q: N.nf4_gemv(x, q, {}))]
            if old is not None:
                cands.append(("old", lambda q: old.nf4_gemv_tc(x, q)))
            cands += [(name, (lambda c: lambda q: T.nf4_gemv_tc(x, q, c))(c)) for name, c in configs.items()]
            for rnd in range(a.rounds):
                for name, fn in cands:
                    try:
                        err = ((fn(qs[0]).float() - want).abs().max() / want.abs().max()).item()
                        us = bench_graph_us([(lambda q: lambda: fn(q))(q) for q in qs])
                        row = dict(N=n, K=k, M=m, round=rnd, what=name, us=round(us, 2),
                                   TBps=round(nbytes / us / 1e6, 3), err=round(err, 5))
                    except Exception:  # noqa: BLE001  (a failing candidate is recorded, the rest run)
                        row = dict(N=n, K=k, M=m, what=name, error=traceback.format_exc()[-600:])
                    rows.append(row)
                    print(row, flush=True)
    best = {}
    for r in rows:
        if "us" in r:
            key = (r["N"], r["K"], r["M"], r["what"])
            best[key] = min(best.get(key, 1e9), r["us"])
    names = ["pre-tc"] + (["old"] if old else []) + list(configs)
    print("\nshape M | " + " | ".join(names))
    for n, k in SHAPES:
        for m in TOKENS:
            print(f"{n}x{k} {m} | " + " | ".join(str(best.get((n, k, m, nm), "-")) for nm in names))
    if a.out:
        write_json(a.out, dict(env=env_info(), rows=rows))


if __name__ == "__main__":
    main()
