"""The Mixtral-8x7B MoE block (C=4096, I=14336, E=8, top-2) on one GPU, measured in one run:
our NF4 decode kernels vs our expert loop vs transformers' MixtralSparseMoeBlock in bf16.

    python benchmarks/moe.py --out runs/bench_moe.json          # about a minute on an H100
    python benchmarks/moe.py --no-sweep --no-peer               # ours only, default configs

1. Correctness in bf16: the decode kernels against the expert loop on the same NF4 weights
   (1, 3, 8 and 24 tokens), and each kernel against its PyTorch reference at 3 tokens.
2. Decode at 1, 3 and 24 tokens (3 = three samples of one prompt; 24 = 8 prompts x 3 samples):
   the whole block (router + experts), ours with the kernels (eager, and replayed from a CUDA
   graph, which is how the sampler runs it), ours with the loop, and the peer in bf16 (anchor
   1.67 ms at 1 token). ms and TB/s of the NF4 bytes of the experts the tokens touch. Each kernel
   alone at the same sizes. The floor: those bytes at 3.0 TB/s.
3. 8192 tokens forward (prefill / training shape): our loop (fused NF4 GEMM per expert) vs the
   peer in bf16, ms and TFLOP/s.
4. A sweep of kernel configs at 3 tokens (dequant mode, tiles, warps, stages, split-K); the best
   per kernel goes into the JSON next to the default.
Timings: median of triton.testing.do_bench (L2 flushed before every call).
"""
from __future__ import annotations

import time
import traceback

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import bench_ms, env_info, parser, print_table, write_json
from common import section as common_section
from torch import nn

from kernels import moe as K
from kernels import moe_tc
from models.moe import SparseMoE, route
from models.nf4 import NF4Linear, replace_linears_with_nf4

C, I, E, TOP_K = 4096, 14336, 8, 2
DEV, DT = "cuda", torch.bfloat16
COPY_TBPS = 3.0  # DESIGN.md anchor: device-to-device copy on the H100
PEER_ANCHOR_MS = {1: 1.67}  # DESIGN.md: transformers 5.17 Mixtral block, decode 1 token, bf16
DECODE_TOKENS = (1, 3, 24)
SWEEP_GATE_UP = [  # the first is the default at 3 tokens; DEQUANT 0/1/2: see kernels/moe.py
    dict(DEQUANT=d, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
    for d, bn, bk, w, s in [(2, 64, 256, 4, 3), (2, 64, 256, 4, 4), (2, 64, 128, 4, 4), (2, 128, 256, 8, 3),
                            (2, 32, 256, 4, 3), (1, 64, 256, 4, 3), (1, 128, 256, 8, 3), (0, 64, 64, 4, 3)]
]
SWEEP_DOWN = [dict(SWEEP_GATE_UP[0], SPLIT_K=s) for s in (None, 1, 4)] + [
    dict(SWEEP_GATE_UP[i], SPLIT_K=None) for i in (2, 3, 5)]

RESULTS: dict = {"env": env_info(), "shape": dict(C=C, I=I, E=E, top_k=TOP_K), "correctness": [], "decode": [],
                 "kernels": [], "prefill": [], "sweep": {}, "errors": {}}


def section(name):
    """Run one part (common.section)."""
    return common_section(RESULTS, name)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def build_ours(seed=0) -> SparseMoE:
    """The block with random NF4 experts (quantized on the GPU one weight at a time) and a bf16 router."""
    with torch.device("meta"):
        moe = SparseMoE(C, I, E, TOP_K)
    replace_linears_with_nf4(moe, skip=("gate",), compute_dtype=DT)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    for m in moe.modules():
        if isinstance(m, NF4Linear):
            m.quantize_(torch.randn(m.out_features, m.in_features, device=DEV, dtype=DT, generator=gen) * 0.02)
    moe.gate = nn.Linear(C, E, bias=False, device=DEV, dtype=DT)
    moe.gate.weight.normal_(0, 0.02, generator=gen)
    return moe.eval()


@torch.no_grad()
def build_peer():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=C, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K)
    blk = MixtralSparseMoeBlock(cfg).to(DEV, DT)
    for p in blk.parameters():
        p.normal_(0, 0.02)
    return blk.eval()


def peer_forward(blk, x):
    out = blk(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def tokens(T, seed=1):
    return torch.randn(T, C, device=DEV, dtype=DT, generator=torch.Generator(device=DEV).manual_seed(seed))


def touched(moe: SparseMoE, x) -> int:
    return torch.unique(route(moe.gate(x), TOP_K, x.dtype)[1]).numel()


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-peer", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    moe = build_ours()
    with torch.no_grad():
        nf4 = moe._decode_experts(3, torch.device(DEV), False)[0]
    expert_bytes = nf4.expert_nbytes()
    RESULTS["expert_nf4_MB"] = expert_bytes / 1e6
    print(f"built NF4 block in {time.time() - t0:.1f}s: {expert_bytes / 1e6:.1f} MB per expert", flush=True)
    peer = None
    if not args.no_peer:
        try:
            peer = build_peer()
        except Exception:
            RESULTS["errors"]["peer_build"] = traceback.format_exc()[-1500:]
            print("peer unavailable:", RESULTS["errors"]["peer_build"][-300:], flush=True)

    @section("correctness")
    @torch.no_grad()
    def _():
        for T in (1, 3, 8, 24):
            x = tokens(T, seed=T)
            moe.backend = "reference"
            want = moe(x)
            moe.backend = None
            got = moe(x)
            RESULTS["correctness"].append(dict(what=f"block kernels vs loop, {T} tokens", rel_err=rel_err(got, want)))
        x = tokens(3)
        weights, ids = route(moe.gate(x), TOP_K, x.dtype)
        h = K.moe_gate_up(x, ids, nf4)
        RESULTS["correctness"].append(dict(what="gate_up vs reference", rel_err=rel_err(h, K.moe_gate_up_reference(x, ids, nf4))))
        y = K.moe_down(h, ids, weights, nf4).sum(0)
        RESULTS["correctness"].append(dict(what="down vs reference",
                                           rel_err=rel_err(y, K.moe_down_reference(h, ids, weights, nf4)[0])))
        print_table(RESULTS["correctness"])

    @section("decode")
    @torch.no_grad()
    def _():
        for T in DECODE_TOKENS:
            x = tokens(T)
            n_exp = touched(moe, x)
            nbytes = n_exp * expert_bytes
            floor_ms = nbytes / COPY_TBPS / 1e9
            moe.backend = None
            rows = [("ours kernels", bench_ms(lambda: moe(x))),
                    ("ours kernels, CUDA graph", bench_ms(graphed(lambda: moe(x))))]
            saved_tc, K.TC_DEFAULT = K.TC_DEFAULT, False  # the tensor-core kernels (kernels/moe_tc.py) off
            if T <= K.ROWS_MAX_TOKENS:  # the row kernels (the default before moe_tc), then the two MMA kernels
                rows.append(("ours row kernels, CUDA graph", bench_ms(graphed(lambda: moe(x)))))
                saved, K.ROWS_MAX_TOKENS = K.ROWS_MAX_TOKENS, 0
                rows.append(("ours MMA kernels, CUDA graph", bench_ms(graphed(lambda: moe(x)))))
                K.ROWS_MAX_TOKENS = saved
            K.TC_DEFAULT = saved_tc
            moe.backend = "reference"
            rows.append(("ours expert loop", bench_ms(lambda: moe(x))))
            moe.backend = None
            if peer is not None:
                rows.append(("transformers bf16", bench_ms(lambda: peer_forward(peer, x))))
            for what, ms in rows:
                peer_bytes = n_exp * 3 * C * I * 2 if what.startswith("transformers") else nbytes
                RESULTS["decode"].append(dict(tokens=T, what=what, experts=n_exp, ms=ms, TBps=peer_bytes / ms / 1e9,
                                              floor_ms=floor_ms, over_floor=ms / floor_ms,
                                              anchor_ms=PEER_ANCHOR_MS.get(T) if what.startswith("transformers") else None))
        print_table(RESULTS["decode"])
        g3 = [r for r in RESULTS["decode"] if r["tokens"] == 3 and r["what"] == "ours kernels, CUDA graph"]
        if g3:
            RESULTS["decode_32_layers_moe_ms"] = 32 * g3[0]["ms"]
            print(f"3 tokens, 32 layers of MoE (graph-replayed): {32 * g3[0]['ms']:.2f} ms per decode step")

    @section("kernels")
    @torch.no_grad()
    def _():
        for T in DECODE_TOKENS:
            x = tokens(T)
            weights, ids = route(moe.gate(x), TOP_K, x.dtype)
            n_exp = torch.unique(ids).numel()
            h = K.moe_gate_up(x, ids, nf4)
            y = K.moe_down(h, ids, weights, nf4)
            gu_bytes = n_exp * 2 * (nf4.w1[0].packed.numel() + nf4.w1[0].absmax.numel())
            dn_bytes = n_exp * (nf4.w2[0].packed.numel() + nf4.w2[0].absmax.numel())
            rows_kernels = [("row kernels (gate_up + down + combine)", lambda: K.moe_decode_rows(x, weights, ids, nf4),
                             gu_bytes + dn_bytes)] if T <= K.ROWS_MAX_TOKENS else []
            if moe_tc.supported(x, ids, nf4):
                rows_kernels.append(("tensor-core kernels (plan, gate_up, swiglu, down, combine)",
                                     lambda: moe_tc.moe_decode_tc(x, weights, ids, nf4), gu_bytes + dn_bytes))
            for what, fn, nb in rows_kernels + [("gate_up", lambda: K.moe_gate_up(x, ids, nf4), gu_bytes),
                                 ("down", lambda: K.moe_down(h, ids, weights, nf4), dn_bytes),
                                 ("combine", lambda: K.moe_combine(y, TOP_K, DT), 0),
                                 ("router", lambda: route(moe.gate(x), TOP_K, x.dtype), 0)]:
                ms = bench_ms(fn)
                RESULTS["kernels"].append(dict(tokens=T, kernel=what, us=ms * 1e3, TBps=nb / ms / 1e9 if nb else None,
                                               split_k=y.shape[0] if what == "down" else None))
        print_table(RESULTS["kernels"])

    @section("prefill_8192")
    @torch.no_grad()
    def _():
        T = 8192
        x = tokens(T)
        flops = 2 * T * TOP_K * 3 * C * I
        moe.backend = None  # 8192 tokens: the loop (fused NF4 GEMM per expert)
        rows = [("ours expert loop (NF4)", bench_ms(lambda: moe(x), rep=200))]
        if peer is not None:
            rows.append(("transformers bf16", bench_ms(lambda: peer_forward(peer, x), rep=200)))
        for what, ms in rows:
            RESULTS["prefill"].append(dict(tokens=T, what=what, ms=ms, TFLOPs=flops / ms / 1e9))
        print_table(RESULTS["prefill"])

    if not args.no_sweep:
        @section("sweep")
        @torch.no_grad()
        def _():
            x = tokens(3)
            weights, ids = route(moe.gate(x), TOP_K, x.dtype)
            h = K.moe_gate_up(x, ids, nf4)
            want_h = h.float()
            want_y = K.moe_down(h, ids, weights, nf4).sum(0)
            for name, configs, run, check in [
                ("gate_up", SWEEP_GATE_UP, lambda c: K.moe_gate_up(x, ids, nf4, c), want_h),
                ("down", SWEEP_DOWN, lambda c: K.moe_down(h, ids, weights, nf4, c), want_y),
            ]:
                rows = []
                for c in configs:
                    try:
                        out = run(c)
                        err = rel_err(out.sum(0) if name == "down" else out, check)
                        rows.append(dict(c, us=bench_ms(lambda: run(c)) * 1e3, rel_err=err))
                    except Exception as exc:  # a config that does not compile: record and go on
                        rows.append(dict(c, us=None, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
                print(f"-- {name}, 3 tokens")
                print_table(rows)
                ok = [r for r in rows if r.get("us") is not None and r["rel_err"] < 2e-2]
                RESULTS["sweep"][name] = dict(rows=rows, best=min(ok, key=lambda r: r["us"]) if ok else None,
                                              default=K.moe_config(6, DT)[name])

    write_json(args.out, RESULTS)
    if RESULTS["errors"]:
        print("errors in:", ", ".join(RESULTS["errors"]))


if __name__ == "__main__":
    main()
