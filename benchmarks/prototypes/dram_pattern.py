"""Does the GEMV's access pattern (64 bytes of each of 128 rows per item, rows 2 KB apart) cap the DRAM
rate? Pure-load kernels over a 14336 x 2048-byte buffer (the NF4 codes of a 14336x4096 weight), summing
what they read, each pattern over the same bytes; CUDA-graph timed over 6 copies (a floor for the
decode GEMV: what one launch of this size reads at best with the same item shapes).

Usage (from the repository root, on a GPU): python3 benchmarks/prototypes/dram_pattern.py
(writes dram_pattern.json into $OUT, or /tmp)
Results: benchmarks/NOTES.md, "Session 9"."""
import sys, os, json
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch, triton, triton.language as tl
from common import bench_graph_us

@triton.jit
def _blocks(src, out, ROWS_TOTAL: tl.constexpr, ROW_WORDS: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr,
            ITEMS: tl.constexpr, PER: tl.constexpr):
    # item i: row block i // (ROW_WORDS // BW), word block i % (ROW_WORDS // BW): BR rows x BW words
    pid = tl.program_id(0)
    acc = tl.zeros([BR, BW], tl.int32)
    cols_per = ROW_WORDS // BW
    r = tl.arange(0, BR)[:, None]
    c = tl.arange(0, BW)[None, :]
    for k in range(PER):
        i = pid * PER + k
        if i < ITEMS:
            rb = i // cols_per
            cb = i % cols_per
            acc += tl.load(src + (rb * BR + r).to(tl.int64) * ROW_WORDS + cb * BW + c)
    tl.store(out + pid, tl.sum(acc))

def run(br, bw, programs, warps):
    rows, row_words = 14336, 512
    items = (rows // br) * (row_words // bw)
    per = triton.cdiv(items, programs)
    bufs = [torch.randint(0, 1 << 30, (rows, row_words), dtype=torch.int32, device="cuda") for _ in range(6)]
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    grid = (triton.cdiv(items, per),)
    calls = [(lambda b=b: _blocks[grid](b, out, rows, row_words, br, bw, items, per, num_warps=warps)) for b in bufs]
    us = bench_graph_us(calls)
    return dict(rows=br, bytes_per_row=4 * bw, programs=programs, warps=warps, per=per, us=round(us, 2),
                TBps=round(rows * row_words * 4 / us / 1e6, 3))

res = []
for br, bw, programs, warps in [(128, 16, 528, 4), (128, 16, 1056, 4), (128, 16, 2112, 4),
                                (64, 32, 528, 4), (32, 64, 528, 4), (16, 128, 528, 4), (128, 32, 528, 4),
                                (32, 64, 1056, 4), (8, 512, 528, 4), (8, 512, 1056, 4)]:
    r = run(br, bw, programs, warps)
    res.append(r)
    print(r, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "dram_pattern.json"), "w"), indent=1)
