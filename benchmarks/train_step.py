"""A QLoRA training step at v5 settings on Mixtral-8x7B shapes: ours, at 2 and 4 layers.

Batch 8 x 640 tokens, LoRA r=16 / alpha=64 / dropout 0.1 on q/k/v/o over an NF4 base (router
and lm_head bf16), gradient checkpointing, AdamW, completion loss on the second half of each
sequence, through the engine's own Trainer pieces (model forward, chunked cross-entropy).
The per-layer difference extrapolates to 32 layers, as the peer's anchor does
(benchmarks/peer_seed_stack.py, same device call), which gives tokens/s.

Data parallel (issue 9): under torchrun each rank runs the same per-rank step (8 x 640 tokens)
and sums the adapter gradients over the ranks once per step, as engine.train does; rank 0 reports
the step time and the tokens/s of all ranks together. Scaling efficiency = tokens/s with N ranks /
(N x tokens/s with one).

Usage: python benchmarks/train_step.py --out train_step.json [--peer peer.json] [--moe auto|loop|grouped]
       torchrun --nproc_per_node N benchmarks/train_step.py --out train_step_nN.json
"""
import argparse
import json
import os

import torch

from common import wall_median_ms  # noqa: E402  (puts the repo root on sys.path)

from benchmarks.mixtral_random import random_nf4_mixtral
from engine.loss import chunked_cross_entropy
from engine.train import Dist, all_reduce_grads, init_distributed
from models.lora import DEFAULT_TARGETS, EXPERT_TARGETS, inject_lora
from models.moe import SparseMoE


MOE_BACKENDS = {"auto": None, "loop": "reference", "grouped": "grouped"}  # --moe -> SparseMoE.backend


def measure(layers, batch=8, seq=640, dist: Dist = Dist(), rep=5, moe="auto", expert_lora=False):
    torch.cuda.empty_cache()
    model = random_nf4_mixtral(layers)
    for m in model.modules():
        if isinstance(m, SparseMoE):
            m.backend = MOE_BACKENDS[moe]
    targets = DEFAULT_TARGETS + (EXPERT_TARGETS if expert_lora else ())
    inject_lora(model, r=16, alpha=64, dropout=0.1, targets=targets)
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, fused=True)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    labels = ids.clone()
    labels[:, : seq // 2] = -100

    def step():
        hidden = model(ids, return_hidden=True)
        loss_sum, n = chunked_cross_entropy(hidden, model.lm_head.weight, labels)
        (loss_sum / n).backward()
        all_reduce_grads(params, dist)  # data parallel: adapter gradients summed over the ranks (engine.train)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    step_ms = wall_median_ms(step, warm=2, rep=rep)
    r = {"layers": layers, "moe": moe, "expert_lora": expert_lora, "step_ms": step_ms, "peak_GB": torch.cuda.max_memory_allocated() / 1e9}
    del model, opt
    torch.cuda.empty_cache()
    if dist.main:
        print(r, flush=True)
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="train_step.json")
    p.add_argument("--peer", default=None)
    p.add_argument("--layers", default="2,4", help="two layer counts; the 32-layer step is extrapolated from them")
    p.add_argument("--rep", type=int, default=5, help="timed steps per layer count (median)")
    p.add_argument("--moe", default="auto", choices=sorted(MOE_BACKENDS),
                   help="the MoE experts' path: auto (the engine's choice), loop (one expert at a time), grouped")
    p.add_argument("--expert_lora", action="store_true", help="LoRA on the experts' w1/w2/w3 too")
    a = p.parse_args()
    lo, hi = (int(v) for v in a.layers.split(","))
    if "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist = init_distributed(torch.device("cuda"))
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "world": dist.world}
    for layers in (lo, hi):
        res[f"L{layers}"] = measure(layers, dist=dist, rep=a.rep, moe=a.moe, expert_lora=a.expert_lora)
    per = (res[f"L{hi}"]["step_ms"] - res[f"L{lo}"]["step_ms"]) / (hi - lo)
    res["per_layer_ms"] = per
    res["L32_step_ms_extrapolated"] = res[f"L{lo}"]["step_ms"] + (32 - lo) * per
    res["L32_tokens_per_s"] = dist.world * 8 * 640 / res["L32_step_ms_extrapolated"] * 1e3
    if not dist.main:
        return
    print(f"\n{'QLoRA step, v5 settings':36s} {'ms/layer':>9s} {'32-layer step ms':>17s} {'tokens/s':>9s}")
    name = "ours" + (f", {dist.world} ranks" if dist.world > 1 else "")
    print(f"{name:36s} {per:9.1f} {res['L32_step_ms_extrapolated']:17.0f} {res['L32_tokens_per_s']:9.0f}")
    if a.peer:
        peer = json.load(open(a.peer))
        if "L32_step_ms_extrapolated" in peer:
            pp = (peer["L4_step_ms"] - peer["L2_step_ms"]) / 2
            res["peer"] = peer
            tps = 8 * 640 / peer["L32_step_ms_extrapolated"] * 1e3
            print(f"{'peer (tf 4.57 + PEFT + bnb)':36s} {pp:9.1f} {peer['L32_step_ms_extrapolated']:17.0f} {tps:9.0f}")
            print(f"speed-up: {peer['L32_step_ms_extrapolated'] / res['L32_step_ms_extrapolated']:.2f}x")
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
