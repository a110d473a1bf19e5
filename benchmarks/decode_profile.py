"""Where the GPU time of one decode step goes: its kernels by name, count and GPU time.

CUDA (the default): builds the random-weight NF4 Mixtral of benchmarks/mixtral_random.py with
--layers L, prefills a 400-token prompt once and repeats the KV cache for 3 samples (as
engine.sampling.generate does), runs a few eager decode steps (Triton compiles), profiles ONE
eager step with torch.profiler and prints its kernels sorted by GPU time, then times a step
replayed from a CUDA graph (engine.sampling's _GraphStep, the sampler's own path). --compare
does it all twice: transformer.py's fused kernels on (`Transformer.backend = None`, the default)
and off ("reference"), each on a fresh cache.

--device cpu: a smoke mode on tiny-moe (NF4 experts, MoE on its kernels) that needs no GPU. It
counts what one decode step would launch: aten ops that are not views, plus Triton launches
(which run in the interpreter), grouped by where they come from - transformer.py's own code per
layer ("layer"), the projections, the MoE block, and the per-step rest (embedding, RoPE tables,
mask, lm_head, sampling). CPU projections run the NF4 reference (dequant + matmul), so only the
"layer" and "step" rows say what a CUDA step launches.

Usage: python benchmarks/decode_profile.py [--layers 2] [--compare] [--out decode_profile.json]
       python benchmarks/decode_profile.py --device cpu --compare
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

if __name__ == "__main__" and ("cpu" in sys.argv or "--device=cpu" in sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import engine.sampling as sampling  # noqa: E402
from benchmarks.common import cuda_ms  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.moe import SparseMoE  # noqa: E402
from models.nf4 import NF4Linear, replace_linears_with_nf4  # noqa: E402
from models.transformer import DecoderLayer, Transformer  # noqa: E402

SAMPLES, PROMPT = 3, 400


# ----------------------------------------------------------------------------------------------
# Models and a decoder positioned after the shared prefill
# ----------------------------------------------------------------------------------------------


def tiny_moe() -> Transformer:
    """tiny-moe with NF4 projections and experts (router and lm_head dense), fp32, on the CPU."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny-moe")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    replace_linears_with_nf4(m, skip=("gate", "lm_head"), compute_dtype=torch.float32)
    for mod in m.modules():
        if isinstance(mod, SparseMoE):
            mod.backend = "triton"  # the decode kernels, as on CUDA (interpreted here)
    return m


@torch.no_grad()
def decoder(model: Transformer, steps: int, device) -> sampling._Decoder:
    """engine.sampling's decode state after one prefill of a PROMPT-token prompt shared by SAMPLES
    rows (what generate() builds), with cache room for `steps` decode steps."""
    S = PROMPT + steps + 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g).to(device)  # (1, L)
    mask = torch.ones((1, S), dtype=torch.long, device=device)  # (1, S): no padding
    pos = torch.arange(PROMPT, device=device)[None]  # (1, L)
    model.setup_kv_cache(1, S)
    logits = model(ids, attention_mask=mask, position_ids=pos, input_pos=pos[0])[:, -1]  # (1, V)
    model.repeat_kv_cache(SAMPLES)
    streams = torch.arange(SAMPLES, device=device)
    dec = sampling._Decoder(model, mask.repeat_interleave(SAMPLES, 0), pos[:, -1].repeat(SAMPLES) + 1,
                            PROMPT, sampling.stream_keys(0, streams), logits.shape[-1],
                            max_new_tokens=steps + 1, temperature=0.7, top_p=0.95,
                            eos=torch.tensor([-1], device=device), pad_id=0)
    dec.record(logits.repeat_interleave(SAMPLES, 0))
    return dec


# ----------------------------------------------------------------------------------------------
# CPU: count the ops of one step by origin
# ----------------------------------------------------------------------------------------------

_NO_KERNEL = {"empty", "empty_like", "empty_strided", "promote_types", "detach", "lift_fresh",
              "_local_scalar_dense", "set_", "resize_"}


class OpCounter(TorchDispatchMode):
    """Counts non-view aten ops and Triton launches, keyed by (origin, op name). The origin is the
    innermost enclosing module of interest: a projection, the MoE block, a decoder layer, or the
    step outside the layers. Ops that a Triton launch issues itself (the interpreter's copies) are
    not counted; the launch counts once."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.origin = ["step"]
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and not func.is_view and name not in _NO_KERNEL:
            self.counts[(self.origin[-1], name)] += 1
        return func(*args, **(kwargs or {}))

    def watch(self, model: nn.Module):
        """Hooks that track the origin (and a wrapper around DecoderLayer.forward_fused, which is
        not a module call); returns a function that removes them."""
        kinds = [(SparseMoE, "moe"), (NF4Linear, "proj"), (nn.Linear, "proj"), (DecoderLayer, "layer"),
                 (nn.Embedding, "step")]
        handles = []
        for m in model.modules():
            kind = next((k for cls, k in kinds if isinstance(m, cls)), None)
            if m is model.lm_head:
                kind = "step"
            if kind is None:
                continue
            handles.append(m.register_forward_pre_hook(lambda *_, k=kind: self.origin.append(k)))
            handles.append(m.register_forward_hook(lambda *_: self.origin.pop() and None))
        fused = DecoderLayer.forward_fused

        def forward_fused(layer, *args, **kwargs):
            self.origin.append("layer")
            try:
                return fused(layer, *args, **kwargs)
            finally:
                self.origin.pop()

        DecoderLayer.forward_fused = forward_fused

        def remove():
            DecoderLayer.forward_fused = fused
            for h in handles:
                h.remove()
        return remove

    def count_triton(self):
        """Patch the interpreter's launch so that each Triton launch counts as one kernel."""
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run
        counter = self

        def counted(fn_self, *args, **kwargs):
            counter.counts[(counter.origin[-1], "triton:" + fn_self.fn.__name__)] += 1
            counter.in_triton += 1
            try:
                return run(fn_self, *args, **kwargs)
            finally:
                counter.in_triton -= 1

        InterpretedFunction.run = counted
        return lambda: setattr(InterpretedFunction, "run", run)


@torch.no_grad()
def count_cpu(backend: str | None) -> dict:
    model = tiny_moe()
    model.backend = backend
    dec = decoder(model, steps=3, device="cpu")
    dec.step()  # warm
    counter = OpCounter()
    unwatch, unpatch = counter.watch(model), counter.count_triton()
    try:
        with counter:
            dec.step()
    finally:
        unpatch()
        unwatch()
    model.clear_kv_cache()
    layers = model.config.num_hidden_layers
    by_origin = Counter()
    for (origin, _), n in counter.counts.items():
        by_origin[origin] += n
    layer_ops = Counter({op: n / layers for (o, op), n in counter.counts.items() if o == "layer"})
    step_ops = Counter({op: n for (o, op), n in counter.counts.items() if o == "step"})
    return {"backend": backend or "auto", "per_layer": by_origin["layer"] / layers,
            "per_step_outside_layers": by_origin["step"],
            "proj_per_layer_cpu": by_origin["proj"] / layers, "moe_per_layer": by_origin["moe"] / layers,
            "layer_ops": dict(layer_ops.most_common()), "step_ops": dict(step_ops.most_common())}


def print_cpu(r: dict):
    print(f"\n== transformer.backend={r['backend']}: kernels of one decode step (tiny-moe, CPU count) ==")
    print(f"per layer, transformer.py's own ops: {r['per_layer']:g}   "
          f"(+ MoE block {r['moe_per_layer']:g}, + projections: CPU reference, not counted)")
    for op, n in r["layer_ops"].items():
        print(f"    {op:40s} {n:g}")
    print(f"per step, outside the layers: {r['per_step_outside_layers']}")
    for op, n in r["step_ops"].items():
        print(f"    {op:40s} {n:g}")


# ----------------------------------------------------------------------------------------------
# CUDA: profile one eager step, time a graph-replayed step
# ----------------------------------------------------------------------------------------------


def _kernel_table(prof) -> list[dict]:
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        r = rows.setdefault(e.name, [0, 0.0])
        r[0] += 1
        r[1] += e.time_range.elapsed_us()
    table = [{"kernel": k, "count": c, "gpu_us": us} for k, (c, us) in rows.items()]
    return sorted(table, key=lambda r: -r["gpu_us"])


@torch.no_grad()
def profile_cuda(model: Transformer, backend: str | None, replays: int = 20) -> dict:
    model.backend = backend
    device = torch.device("cuda")
    dec = decoder(model, steps=replays + 8, device=device)
    for _ in range(2):  # Triton compiles, caches fill
        dec.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    dec.step()
    torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - t) * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        dec.step()
        torch.cuda.synchronize()
    table = _kernel_table(prof)
    r = {"backend": backend or "auto", "eager_step_ms": eager_ms, "kernels": sum(x["count"] for x in table),
         "kernel_gpu_us": sum(x["gpu_us"] for x in table), "table": table}
    graph = sampling._GraphStep(dec.step, device)
    graph()  # warm-up on the side stream
    graph()  # capture and replay
    if graph.graph is None:
        r["graph_step_ms"], r["graph_failed"] = None, graph.failed
    else:
        r["graph_step_ms"] = cuda_ms(graph, replays)
    del graph
    model.clear_kv_cache()
    return r


def print_cuda(r: dict, layers: int, top: int):
    print(f"\n== transformer.backend={r['backend']}: one eager decode step, {layers} layers, "
          f"{SAMPLES} samples after {PROMPT} tokens ==")
    print(f"{'kernel':90s} {'count':>6s} {'GPU us':>9s}")
    for x in r["table"][:top]:
        print(f"{x['kernel'][:90]:90s} {x['count']:6d} {x['gpu_us']:9.1f}")
    if len(r["table"]) > top:
        rest = r["table"][top:]
        print(f"{'(%d more kinds)' % len(rest):90s} {sum(x['count'] for x in rest):6d} "
              f"{sum(x['gpu_us'] for x in rest):9.1f}")
    print(f"total: {r['kernels']} kernels ({r['kernels'] / layers:.1f} per layer incl. per-step ones), "
          f"{r['kernel_gpu_us']:.1f} us of GPU time; eager step {r['eager_step_ms']:.2f} ms (wall)")
    if r.get("graph_step_ms") is not None:
        print(f"CUDA-graph replayed step: {r['graph_step_ms']:.3f} ms")
    else:
        print(f"CUDA-graph step: not captured ({r.get('graph_failed')})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--compare", action="store_true", help="also run with the fused kernels off")
    p.add_argument("--top", type=int, default=40, help="rows of the kernel table")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    backends = [None, "reference"] if a.compare else [None]
    if a.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        res = {"device": "cpu", "model": "tiny-moe"}
        for b in backends:
            r = count_cpu("triton" if b is None else b)  # "triton": the kernel path, interpreted
            print_cpu(r)
            res[r["backend"]] = r
    else:
        from benchmarks.mixtral_random import random_nf4_mixtral

        model = random_nf4_mixtral(a.layers)
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers}
        for b in backends:
            r = profile_cuda(model, b)
            print_cuda(r, a.layers, a.top)
            res[r["backend"]] = r
        if a.compare and res["auto"].get("graph_step_ms") and res["reference"].get("graph_step_ms"):
            print(f"\ngraph step: fused {res['auto']['graph_step_ms']:.3f} ms vs reference "
                  f"{res['reference']['graph_step_ms']:.3f} ms; kernels {res['auto']['kernels']} vs "
                  f"{res['reference']['kernels']}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
