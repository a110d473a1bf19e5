"""Small helpers shared by the benchmark scripts: timing, one printed table, JSON output.

Scripts run from the repository root (`python benchmarks/nf4.py --out runs/nf4.json`); importing
this module puts the root on sys.path so `kernels`, `models` and `engine` import.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() over `rep` ms of repeats (triton.testing.do_bench, L2 flushed)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])[0]


def wall_median_ms(fn, warm: int = 1, rep: int = 3) -> float:
    """Median wall-clock milliseconds of fn() (synchronized), for whole workloads of many kernels
    (a generate call, a training step) where per-kernel event timing does not apply."""
    import time

    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def cuda_ms(fn, calls: int, repeats: int = 1) -> float:
    """GPU milliseconds per call of fn(): CUDA events around `calls` back-to-back calls, the best of
    `repeats` such runs. For work already captured (a graph's replay) or too long to warm up twice."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


BUSY_CYCLES = 200_000  # the spin kernel before each timed replay: ~0.1-0.2 ms at the H100's clocks


def bench_graph_us(calls, reps: int = 20, busy: bool = True) -> float:
    """Median microseconds per call of `calls` (a list of thunks) replayed back to back from one
    CUDA graph: no launch gaps, as in graph-captured decoding. Give calls on different inputs (more
    bytes than L2 holds) so each call reads from HBM.

    busy: a spin kernel (torch.cuda._sleep) runs before the start event, so the host has submitted
    the graph before the clock starts. Without it, the start event fires on an idle GPU and the
    graph's submission (~10 us on the H100 hosts: a graph of one empty kernel timed 11 us) lands in
    the measure, i.e. ~2.5 us per call in a graph of 4 calls (benchmarks/RESULTS.md, session 12)."""
    import statistics

    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy:
            torch.cuda._sleep(BUSY_CYCLES)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def section(results: dict, name: str, after=None):
    """Decorator: run one part of a benchmark now; a failure is recorded in results["errors"] and
    the run goes on. Frees the CUDA cache afterwards, then calls after() (e.g. rewrite the JSON)."""
    import time
    import traceback

    def deco(fn):
        import torch

        t0 = time.time()
        try:
            fn()
            print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
        except Exception:
            results["errors"][name] = traceback.format_exc()[-1500:]
            print(f"[{name}] FAILED\n{results['errors'][name]}", flush=True)
        torch.cuda.empty_cache()
        if after is not None:
            after()
        return fn
    return deco


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    return p


def env_info() -> dict:
    import torch
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_GB=round(props.total_memory / 1e9, 1))
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows of dicts as an aligned text table (columns: given order, else first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path, payload: dict, quiet: bool = False) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    if not quiet:
        print(f"wrote {path}")


def replayed_step_ms(model, replays: int = 20) -> float:
    """GPU time of one decode step replayed from the graph that generate(reuse_graph=True) kept on
    the model (best of 3 x `replays`, CUDA events), the step counter, cache slot and positions put
    back before each replay (3 tiny copies, in the timing). Less noisy than differences of
    end-to-end times, which include the host's per-step work."""
    import torch

    dec, graph = model._decode_reuse.dec, model._decode_reuse.runner.graph
    t0, slot0, pos0 = torch.zeros_like(dec.t), dec.slot.clone(), dec.pos.clone()

    def again():
        dec.t.copy_(t0)
        dec.slot.copy_(slot0)
        dec.pos.copy_(pos0)
        graph.replay()

    again()
    return cuda_ms(again, replays, repeats=3)
