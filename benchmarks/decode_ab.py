"""A/B of decode-step variants in one process: the 32-layer step replayed alone, modes interleaved.

Each mode is a set of module flags (dotted name -> value), e.g. engine.sampling.FUSED_SAMPLING, or
entries of module-level dicts, e.g. kernels.moe_tc.DEFAULT_CONFIG.TAIL.
One random-weight NF4 Mixtral (benchmarks/mixtral_random.py) serves every mode; for each round and
mode the flags are set, the decode graph is captured afresh (generate(reuse_graph=True) on a
400-token prompt, 3 samples) and the step is replayed alone (CUDA events, as benchmarks/generate.py's
"step replayed alone" row). Rounds interleave the modes so that clock and thermal drift hit all
alike; the table reports each mode's best and median over rounds, and its ratio to the first mode.

Usage: python benchmarks/decode_ab.py [--layers 32] [--rounds 3] [--out decode_ab.json]
         [--modes '{"now": {}, "torch sampling": {"engine.sampling.FUSED_SAMPLING": false}}']
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics

import torch

from common import replayed_step_ms  # noqa: E402  (puts the repo root on sys.path)

from benchmarks.mixtral_random import random_nf4_mixtral
import engine.sampling as sampling
from engine.sampling import generate

DEFAULT_MODES = {"now": {}, "torch sampling": {"engine.sampling.FUSED_SAMPLING": False}}


def _flag(dotted: str):
    """(holder, name) of a flag: a module attribute (kernels.nf4_tc.LOOKUP_ALU) or an entry of a
    module-level dict (kernels.moe_tc.DEFAULT_CONFIG.TAIL)."""
    module, _, name = dotted.rpartition(".")
    try:
        holder = importlib.import_module(module)
    except ModuleNotFoundError:
        parent, _, attr = module.rpartition(".")
        holder = getattr(importlib.import_module(parent), attr, None)
        if not isinstance(holder, dict) or name not in holder:
            raise SystemExit(f"unknown flag {dotted!r}: {module} is neither a module nor a dict with {name!r}")
        return holder, name
    if not hasattr(holder, name):
        raise SystemExit(f"unknown flag {dotted!r}: {module} has no attribute {name!r}")
    return holder, name


def _get(holder, name):
    return holder[name] if isinstance(holder, dict) else getattr(holder, name)


def _set(holder, name, value) -> None:
    if isinstance(holder, dict):
        holder[name] = value
    else:
        setattr(holder, name, value)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--modes", default=json.dumps(DEFAULT_MODES), help="JSON: mode name -> {dotted flag: value}")
    p.add_argument("--out", default="decode_ab.json")
    a = p.parse_args()
    modes = json.loads(a.modes)
    defaults = {f: _get(*_flag(f)) for spec in modes.values() for f in spec}
    model = random_nf4_mixtral(a.layers)
    prompt = torch.randint(0, 32000, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(a.rounds):
        for mode, spec in modes.items():
            for f, v in {**defaults, **spec}.items():
                _set(*_flag(f), v)
            sampling.release_decode_graph(model)
            generate(model, [prompt], max_new_tokens=4, samples=3, temperature=0.7, top_p=0.95, seed=0,
                     reuse_graph=True)  # a 448-slot cache: room for the replays' slot
            if not sampling.LAST_DECODE.get("cuda_graph"):
                raise SystemExit(f"mode {mode!r} did not decode from a CUDA graph: {sampling.LAST_DECODE}")
            times[mode].append(replayed_step_ms(model, a.replays))
            print(f"round {rnd} {mode:30s} {times[mode][-1]:.3f} ms", flush=True)
    for f, v in defaults.items():
        _set(*_flag(f), v)
    base = min(times[next(iter(modes))])
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "modes": modes, "step_ms": times}
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"\n{'decode step, ' + str(a.layers) + ' layers':30s} {'best ms':>9s} {'median ms':>10s} {'vs first':>9s}")
    for mode, v in times.items():
        print(f"{mode:30s} {min(v):9.3f} {statistics.median(v):10.3f} {min(v) / base:9.3f}")


if __name__ == "__main__":
    main()
