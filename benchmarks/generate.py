"""Multiprompt decoding on Mixtral-8x7B shapes: 3 samples x 32 new tokens after a 400-token prompt.

Ours: all 32 layers, random NF4 weights built on the GPU (benchmarks/mixtral_random.py), the
engine's sampler (one prefill shared by the 3 samples, static KV cache). Reports the prefill,
the end-to-end time and the time per decode step ((end-to-end - prefill) / 31), plus the same at
2 and 4 layers so it can be compared with the peer's extrapolation (benchmarks/peer_seed_stack.py,
run in the same device call). Per-step rows: the steady step (difference of the 32- and 16-token
end-to-end medians: noisy), the step inside one generate() call (CUDA events around each graph
replay, engine.sampling.TIMED_STEPS: median over its steps, whose routing differs) with the GPU's
gap between steps, and one step replayed alone (the same routing every time). Floor: the NF4
bytes of the experts the 3 tokens touch plus the attention weights, at 3.0 TB/s (about 4.8 ms per
step for 32 layers).

Usage: python benchmarks/generate.py --out generate.json [--layers 32] [--peer peer.json]
"""
import argparse
import json
import os
import statistics
import torch

from common import replayed_step_ms, wall_median_ms  # noqa: E402  (puts the repo root on sys.path)

from benchmarks.mixtral_random import random_nf4_mixtral
import engine.sampling as sampling
from engine.sampling import generate


def measure(layers):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = random_nf4_mixtral(layers)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    prompt = torch.randint(0, 32000, (400,)).tolist()

    def run(n, reuse=False):
        return generate(model, [prompt], max_new_tokens=n, samples=3, temperature=0.7, top_p=0.95, seed=0,
                        reuse_graph=reuse)

    out = run(32)
    assert all(len(s) == 32 for s in out[0])
    e2e = wall_median_ms(lambda: run(32))  # every call: warm-up step + capture + replays
    decode_path = str(sampling.LAST_DECODE)  # how the 32-token runs decoded (eager or CUDA graph)
    e2e_reused = wall_median_ms(lambda: run(32, True))  # the captured step kept between calls
    reused = sampling.LAST_DECODE.get("reused")
    e2e16_reused = wall_median_ms(lambda: run(16, True))
    prefill = wall_median_ms(lambda: run(1))
    # the steps inside one generate() call: CUDA events around every replay (engine.sampling.TIMED_STEPS)
    sampling.TIMED_STEPS = []
    try:
        run(32, True)
        torch.cuda.synchronize()
        steps = [a.elapsed_time(b) for a, b in sampling.TIMED_STEPS]
        gaps = [sampling.TIMED_STEPS[i][1].elapsed_time(sampling.TIMED_STEPS[i + 1][0])
                for i in range(len(steps) - 1)]
    finally:
        sampling.TIMED_STEPS = None
    run(4, True)  # a KV cache of 448 slots (404 rounded up to 64): room for the replays' slot
    replayed = replayed_step_ms(model)
    r = {"layers": layers, "decode_path": decode_path, "weights_GB": weights_gb, "e2e_ms": e2e,
         "prefill_ms": prefill, "decode_step_ms": (e2e - prefill) / 31, "e2e_reused_ms": e2e_reused,
         "reused": reused, "decode_step_reused_ms": (e2e_reused - prefill) / 31,
         "steady_step_ms": (e2e_reused - e2e16_reused) / 16, "replayed_step_ms": replayed,
         "loop_step_ms": statistics.median(steps), "loop_steps_ms": [round(t, 3) for t in steps],
         "loop_gap_ms": statistics.median(gaps), "peak_GB": torch.cuda.max_memory_allocated() / 1e9}
    sampling.release_decode_graph(model)
    del model
    torch.cuda.empty_cache()
    print(r, flush=True)
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="generate.json")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--peer", default=None, help="JSON written by benchmarks/peer_seed_stack.py")
    p.add_argument("--no-tc", action="store_true", help="decode without kernels/nf4_tc.py (A/B against it)")
    p.add_argument("--no-pdl", action="store_true",
                   help="launch every kernel in plain stream order (kernels/pdl.py; A/B against it)")
    p.add_argument("--moe-rows", action="store_true",
                   help="the MoE experts on the row kernels instead of kernels/moe_tc.py (A/B against it)")
    p.add_argument("--no-fused-qkv", action="store_true",
                   help="q, k, v as three GEMVs instead of one multi-weight launch (A/B against it)")
    a = p.parse_args()
    if a.no_fused_qkv:
        import models.transformer

        models.transformer.FUSED_QKV = False
    if a.moe_rows:
        import kernels.moe

        kernels.moe.TC_DEFAULT = False
    if a.no_tc:
        import kernels.nf4_tc

        kernels.nf4_tc.ENABLED = False
    if a.no_pdl:
        import kernels.pdl

        kernels.pdl.ENABLED = False
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "nf4_tc": not a.no_tc,
           "pdl": not a.no_pdl, "moe_tc": not a.moe_rows, "fused_qkv": not a.no_fused_qkv}
    for layers in (2, 4, a.layers):
        res[f"L{layers}"] = measure(layers)
    per = (res["L4"]["decode_step_ms"] - res["L2"]["decode_step_ms"]) / 2
    res["L32_decode_step_ms_extrapolated"] = res["L2"]["decode_step_ms"] + 30 * per
    big = res[f"L{a.layers}"]
    rows = [("ours, 32 layers measured", big["decode_step_ms"], big["e2e_ms"]),
            ("ours, 32 layers, graph kept across calls", big["decode_step_reused_ms"], big["e2e_reused_ms"]),
            ("ours, 32 layers, steady step (e2e 32 - e2e 16)", big["steady_step_ms"], None),
            ("ours, 32 layers, step inside generate()", big["loop_step_ms"], None),
            ("ours, 32 layers, gap between those steps", big["loop_gap_ms"], None),
            ("ours, 32 layers, step replayed alone", big["replayed_step_ms"], None),
            ("ours, extrapolated from 2/4 layers", res["L32_decode_step_ms_extrapolated"], None)]
    if a.peer and not os.path.exists(a.peer):
        print(f"no peer results at {a.peer} (did benchmarks/peer_seed_stack.py finish?); ours only")
        a.peer = None
    if a.peer:
        peer = json.load(open(a.peer))
        res["peer"] = peer
        if "L32_decode_step_ms_extrapolated" in peer:
            rows.append(("peer (tf 4.57 + bnb), extrapolated", peer["L32_decode_step_ms_extrapolated"],
                         peer["L32_gen_ms_extrapolated"]))
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"\n{'generate 3x32 after 400 tokens':40s} {'ms/decode step':>15s} {'end-to-end ms':>14s}")
    for name, step, e2e in rows:
        print(f"{name:40s} {step:15.2f} {e2e if e2e is not None else float('nan'):14.1f}")
    if a.peer and "L32_decode_step_ms_extrapolated" in res.get("peer", {}):
        print(f"speed-up per decode step vs peer: {res['peer']['L32_decode_step_ms_extrapolated'] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
