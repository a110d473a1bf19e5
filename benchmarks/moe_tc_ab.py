"""A/B of the MoE decode experts (kernels/moe_tc.py) on Mixtral-sized random NF4 experts, CUDA-graph timed.

Candidates in one run: the row kernels (kernels.moe.moe_decode_rows, up to 4 tokens), an older copy
of kernels/moe_tc.py (--old, e.g. `git show 16f20a7:kernels/moe_tc.py > /tmp/old.py`) and
moe_decode_tc with each config of --configs. Two layers' experts alternate in the graph (more bytes
than L2 holds); routing: 2 distinct random experts per token out of 8, seeded per token count.

    python3 benchmarks/moe_tc_ab.py --old /tmp/old.py --configs '{"default": {}, "1 row tile": {"REP": 1}}'
"""
import importlib.util
import json

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import bench_graph_us, env_info, parser, write_json

from kernels import moe as K
from kernels import moe_tc
from kernels.nf4 import quantize_nf4

C, I, E, TOP_K = 4096, 14336, 8, 2


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--old", default=None, help="path of an older kernels/moe_tc.py to time beside")
    p.add_argument("--configs", default='{"default": {}}', help="JSON: name -> moe_decode_tc config")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe_tc_ab.py needs a CUDA GPU")
    old = None
    if a.old:
        spec = importlib.util.spec_from_file_location("moe_tc_old", a.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    g = torch.Generator(device="cuda").manual_seed(0)

    def q(n, k):
        return quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)

    layers = [K.NF4Experts.build([q(I, C) for _ in range(E)], [q(I, C) for _ in range(E)],
                                 [q(C, I) for _ in range(E)]) for _ in range(2)]
    rows = []
    for T in (1, 3, 8):
        gt = torch.Generator().manual_seed(T)
        ids = torch.stack([torch.randperm(E, generator=gt)[:TOP_K] for _ in range(T)]).cuda()
        wt = torch.softmax(torch.randn(T, TOP_K, generator=gt), -1).cuda().to(torch.bfloat16)
        x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
        nbytes = torch.unique(ids).numel() * layers[0].expert_nbytes()
        want = K.moe_decode_reference(x, wt, ids, layers[0])
        cands = [("rows", lambda w: K.moe_decode_rows(x, wt, ids, w))] if T <= K.ROWS_MAX_TOKENS else []
        if old is not None:
            cands.append(("old", lambda w: old.moe_decode_tc(x, wt, ids, w)))
        cands += [(name, (lambda c: lambda w: moe_tc.moe_decode_tc(x, wt, ids, w, c))(c))
                  for name, c in json.loads(a.configs).items()]
        for name, fn in cands:
            err = ((fn(layers[0]).float() - want.float()).abs().max() / want.float().abs().max()).item()
            us = min(bench_graph_us([(lambda w: lambda: fn(w))(w) for w in layers]) for _ in range(2))
            row = dict(tokens=T, experts=torch.unique(ids).numel(), what=name, us=round(us, 1),
                       TBps=round(nbytes / us / 1e6, 3), err=round(err, 4))
            rows.append(row)
            print(row, flush=True)
    if a.out:
        write_json(a.out, dict(env=env_info(), rows=rows))


if __name__ == "__main__":
    main()
