"""PROTOTYPE (session 6 measurement driver): where the host time of one LoRA layer step goes.

The engine path (LoRALinear over NF4Linear, forward + backward) on the k/v and q/o shapes of
benchmarks/lora.py: host and wall milliseconds per step over 30 back-to-back steps (no sync in
between: when host > GPU the wall is the host's), beside the NF4 and bf16 bases, then cProfile of
30 engine steps. Run from the repository root: python3 benchmarks/prototypes/lora_host_profile.py
"""
import cProfile, io, os, pstats, sys, time, torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import benchmarks.lora as BL
OUT = os.environ.get("OUT", ".")
for name in ("k/v 4096->1024", "q/o 4096->4096"):
    Ns = BL.SHAPES[name]
    case = BL.Case(Ns, 0.1, None, None)
    for step_name, step in (("engine", case.engine_step), ("nf4 base", case.nf4_base_step), ("bf16 base", case.bf16_base_step)):
        for _ in range(5): step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(30): step()
        t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        print(f"{name} {step_name}: host {1e3 * (t1 - t0) / 30:.3f} ms/step, wall {1e3 * (t2 - t0) / 30:.3f} ms/step", flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(30): case.engine_step()
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28); print(s.getvalue()[:9000])
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40); print(s.getvalue()[:9000])
