"""PROTOTYPE, not used by the engine: the NF4 decode GEMV (M=1) in Gluon (Triton 3.6's explicit-layout
dialect) on CUDA cores. Measured slower than nf4_gemv. Superseded by kernels/nf4_tc.py (session 5:
tensor cores, one lookup per byte), which the engine uses.

Idea (benchmarks/NOTES.md, "Session 4"): a thread owns whole 64-element groups (8 int32 words) of
one row, so the FMAs are in-thread chains. x is staged once per program in shared memory as fp32,
and the absmax codes load straight into slices of that layout. The only layout conversion left is
the NF4 table's store for the gather: 2 barriers per step instead of 13. ptxas (sm_90): ~5.0
instructions per weight element and 55-96 registers, against nf4_gemv's 6.0 and 124.

Measured (H100, CUDA graph, M=1; benchmarks/results/gluon_gemv_session4.json), 14336x4096:
  - lanes over 8 groups of 4 rows: 76 us (x reads 256 bytes apart per lane: 8-way bank conflicts);
  - 2 groups x 16 rows per warp: 27.7-28.4 us;
  - two groups per thread or words two steps ahead: 28-31 us;
  - nf4_gemv: 22.1-23.0 us.
ncu on the best variant (benchmarks/results/ncu_gluon_gemv_stalls_session4.txt), 28.6 us:
  - issue 0.41 per scheduler-cycle;
  - short scoreboard 22% and MIO throttle 19% (1.25 shared-memory loads per element: the table
    lookups and x);
  - long scoreboard 22% (the absmax chain, loaded in-step);
  - barriers 6%;
  - achieved occupancy 35% of a theoretical 56%.
Next steps not taken: the absmax codes a step ahead; x in registers from L1 (bf16, 8 per 16-byte
load) instead of shared memory, to relieve the MIO pipe.

Gluon does not run in the Triton interpreter, and its API changes between Triton releases. This
file compiles with Triton 3.6 (the GPU machine's). To time it against nf4_gemv on a GPU, run
`python benchmarks/prototypes/gluon_gemv_ab.py`.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def gemv_gluon_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, y_ptr, N,
                      K: gl.constexpr, TPW_G: gl.constexpr, WPC_G: gl.constexpr, num_warps: gl.constexpr,
                      SPT_G: gl.constexpr = 1, AHEAD2: gl.constexpr = False):
    # (BN, G, W=8 words, T=8 codes per word); a thread: one (row, group), 8 words, 64 codes.
    # Lanes of a warp that read different groups read x 256 bytes apart: the same banks.
    G: gl.constexpr = SPT_G * TPW_G * WPC_G
    L4: gl.constexpr = gl.BlockedLayout([1, SPT_G, 8, 8], [32 // TPW_G, TPW_G, 1, 1], [num_warps // WPC_G, WPC_G, 1, 1],
                                        [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(3, L4)  # (BN, G, W)
    LG: gl.constexpr = gl.SliceLayout(2, LW)  # (BN, G)
    LN: gl.constexpr = gl.SliceLayout(1, LG)  # (BN,)
    LX: gl.constexpr = gl.SliceLayout(0, L4)  # (G, W, T)
    BN: gl.constexpr = (32 // TPW_G) * (num_warps // WPC_G)
    BK: gl.constexpr = G * 64
    STEPS: gl.constexpr = K // BK

    # x -> fp32 in shared memory once: (STEPS, G, W, T)
    XL: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [num_warps, 1, 1], [2, 1, 0])
    x_smem = gl.allocate_shared_memory(gl.float32, [STEPS, G, 8, 8], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    o1 = gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, XL)))
    o2 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
    o3 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
    offs_x = o1[:, None, None] * 64 + o2[None, :, None] * 8 + o3[None, None, :]  # (G, W, T)
    for s in range(STEPS):
        x_smem.index(s).store(gl.load(x_ptr + s * BK + offs_x).to(gl.float32))
    gl.thread_barrier()

    table = gl.load(pairs_ptr.to(gl.pointer_type(gl.float32)) + 2 * gl.arange(0, 16, layout=gl.BlockedLayout([1], [32], [num_warps], [0])) + 1)

    pid = gl.program_id(0)
    offs_n = pid * BN + gl.arange(0, BN, layout=LN)  # (BN,)
    rows = offs_n.to(gl.int64)
    offs_g = gl.arange(0, G, layout=gl.SliceLayout(0, LG))  # (G,)
    offs_wd = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))  # (W,)
    row_words = K // 8
    w_base = w_ptr.to(gl.pointer_type(gl.int32)) + rows[:, None, None] * row_words + \
        (offs_g[None, :, None] * 8 + offs_wd[None, None, :])  # (BN, G, W) word pointers of step 0
    t = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    shifts = (t // 2) * 8 + (1 - t % 2) * 4  # element t of a word: byte t // 2, high nibble first
    shifts4 = shifts[None, None, None, :]
    blk0 = rows[:, None] * (K // 64) + offs_g[None, :]  # (BN, G) quant blocks of step 0
    off = gl.load(offset_ptr)

    acc = gl.zeros([BN, G], gl.float32, LG)
    words = gl.load(w_base)
    if AHEAD2:  # two steps of words in flight (Little's law: ~25 KB per SM at 3 TB/s)
        words2 = gl.load(w_base + gl.minimum(1, STEPS - 1) * (BK // 8))
    for s in range(STEPS):
        cur = words
        if AHEAD2:
            words = words2
            words2 = gl.load(w_base + gl.minimum(s + 2, STEPS - 1) * (BK // 8))
        else:
            words = gl.load(w_base + gl.minimum(s + 1, STEPS - 1) * (BK // 8))
        blk = blk0 + s * G
        a_q = gl.load(absmax_ptr + blk).to(gl.int32)
        a2 = gl.load(absmax2_ptr + blk // 256)
        scale = gl.load(code2_ptr + a_q) * a2 + off  # (BN, G)
        codes = (cur[:, :, :, None] >> shifts4) & 15  # (BN, G, W, T)
        flat = gl.reshape(codes, [BN * G * 64])
        vals = gl.reshape(gl.gather(table, flat, 0), [BN, G, 8, 8])
        vals = gl.convert_layout(vals, L4)
        xs = x_smem.index(s).load(LX)  # (G, W, T) fp32
        part = gl.sum(gl.sum(vals * xs[None, :, :, :], axis=3), axis=2)  # (BN, G)
        acc = acc + part * scale
    y = gl.sum(acc, axis=1)
    gl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


def gemv_gluon(x, q, tpw_g=8, wpc_g=1, num_warps=4, spt_g=1, ahead2=False):
    N, K = q.shape
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    BN = (32 // tpw_g) * (num_warps // wpc_g)
    gemv_gluon_kernel[(triton.cdiv(N, BN),)](x, *q.tensors(), y, N, K=K, TPW_G=tpw_g, WPC_G=wpc_g, num_warps=num_warps,
                                             SPT_G=spt_g, AHEAD2=ahead2)
    return y
