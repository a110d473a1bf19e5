"""Refuted prototype (session 12): a row-complete variant of the tensor-core decode GEMV.

kernels/nf4_tc.py splits K across programs (stream-K over (row tile, span) items), adds each
tile's partial sums into an fp32 buffer with atomics, and needs a second launch to cast the sums
to x's dtype. Here a program owns whole row tiles of 16 REP rows; its W warps hold the same rows
and split K (warp w streams spans w SPW .. (w + 1) SPW - 1), and at a tile's end the warps' sums
meet in shared memory (PTX stores and loads at offsets after the tables, double-buffered, one
barrier per tile) and the program writes y in x's dtype: no atomics, no sums buffer, no cast.

Prediction: the per-row contiguous stretch per warp (64 SPW bytes) reads like the pure-load
kernel's 16 x 512-byte items (12.4 us against 13.3 for the GEMV's 128 x 64; benchmarks/prototypes/
dram_pattern.py), and the cast launch (~0.8 us) goes: ~14 us at M=1 on 14336x4096.
Outcome (H100, session 12, benchmarks/RESULTS.md): correct (160 shape/dtype/token checks) but
slower on every Mixtral shape at M=1: 18.7-21.6 us against 15.9 on 14336x4096. A warp still reads
64 bytes per row per step (the stretch is contiguous over time, not within one wave of requests,
which is what the pure-load kernel measured), tiles of 16 REP rows give 1.7 (REP 1) or 0.85
(REP 2) tiles per program slot, and REP 1 halves the bytes each warp has in flight.
INTERLEAVE (warp w takes spans w, W + w, 2 W + w, ...: each step reads 64 W contiguous bytes per row,
the pattern that made kernels/nf4_tc.py's SPLIT 1.1 us faster) did not rescue it: 18.6-23.3 us against
14.8 for nf4_gemv_tc with SPLIT (same call). Owning whole tiles, not the DRAM pattern, is what loses.

Usage (GPU): python3 benchmarks/prototypes/nf4_tc_rows.py  (correctness, then an A/B against
nf4_gemv_tc; writes nf4_tc_rows.json into $OUT or /tmp)
"""
import json
import os
import sys
import traceback

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402
import triton  # noqa: E402

from kernels.nf4 import NF4Tensor, _num_sms, nf4_half_pairs  # noqa: E402
from kernels import pdl  # noqa: E402
from kernels.nf4_tc import (DEFAULT_CONFIG, PDL_PTX, SHARED_BYTES, _cta_barrier, _fill_code2,  # noqa: E402
                            _fill_pair_table, _keep_reservations, _reserve_tables, gl, gluon, kernel_constexprs,
                            mma_columns, takes_four, x_operand, zero_words)

# each valid sum to its slot (an offset into shared memory), and back
_RED_STORE = ("{ .reg .pred p; .reg .b32 b; setp.ne.u32 p, $3, 0; mov.u32 b, global_smem; add.u32 b, b, $2; "
              "@p st.shared.f32 [b], $1; mov.b32 $0, 0; }")
_RED_LOAD = "{ .reg .b32 b; mov.u32 b, global_smem; add.u32 b, b, $1; ld.shared.f32 $0, [b]; }"

if gluon is not None:

    @gluon.jit
    def _reserve_tables_red(W: gl.constexpr, BUF: gl.constexpr):
        """_reserve_tables plus the row-complete kernel's two reduction buffers (2 BUF bytes), which its
        PTX addresses at SHARED_BYTES onwards (the launcher checks the total)."""
        res_table, res_code2 = _reserve_tables(W)
        res_red = gl.allocate_shared_memory(gl.int32, [BUF // 2], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        return res_table, res_code2, res_red

    @gluon.jit
    def _keep_red(res_red, f32_ptr, never, W: gl.constexpr, BUF: gl.constexpr):
        RL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        idx = gl.arange(0, BUF // 2, layout=RL)
        gl.atomic_add(f32_ptr + idx, res_red.load(RL).to(gl.float32), mask=(idx >= 0) & never)


    @gluon.jit
    def _rows_operands(tile, j, spans, w_words, w_off, aq_codes, aq_off, row_in_tile, span0, N,
                       BN: gl.constexpr, EVEN_N: gl.constexpr):
        """_item_operands for the row-complete kernel: span span0 + j of the tile's rows, span0 being
        the warp's first span (a tensor: each warp has its own)."""
        if EVEN_N:
            base = (tile * BN).to(gl.int64) * spans + j
            words = gl.load(w_words + base * 16 + w_off)
            aq = gl.load(aq_codes + base + aq_off)
        else:
            rows = gl.minimum(tile * BN + row_in_tile, N - 1).to(gl.int64) * spans + span0 + j
            words = gl.load(w_words + rows * 16 + (w_off % 16))
            aq = gl.load(aq_codes + rows)
        return words, aq

    @gluon.jit
    def _nf4_tc_rows_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, y_ptr,
                            zeros_ptr, M, N, K,
                            ASM: gl.constexpr, CONSTRAINTS: gl.constexpr, FILL_TABLE: gl.constexpr,
                            FILL_CODE2: gl.constexpr, FOUR: gl.constexpr, GDC_WAIT: gl.constexpr,
                            GDC_LAUNCH: gl.constexpr, RED_STORE: gl.constexpr, RED_LOAD: gl.constexpr,
                            RED_OFF: gl.constexpr, W: gl.constexpr, REP: gl.constexpr, EVEN_N: gl.constexpr,
                            PDL: gl.constexpr, EARLY: gl.constexpr, INTERLEAVE: gl.constexpr,
                            num_warps: gl.constexpr):
        # Row-complete: a program owns whole row tiles of BN = 16 REP rows (tiles pid, pid + programs,
        # ...); its W warps hold the same rows and split K, warp w taking spans w SPW .. (w + 1) SPW - 1,
        # so each warp streams 64 SPW contiguous bytes of every row. At a tile's end the warps' sums
        # meet in shared memory (RED_STORE, a barrier, RED_LOAD: our own bytes after the tables) and
        # the program writes y in its dtype: no atomics, no sums buffer, no cast launch.
        BN: gl.constexpr = REP * 16
        GROUPS: gl.constexpr = 2 if FOUR else 1  # FOUR: the two quant groups' lanes hold separate sums
        L: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 8, 4], [1, W, 1], [2, 1, 0])
        spans = K // 128
        SPW = spans // W
        r3 = gl.arange(0, REP, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
        r2 = gl.arange(0, 16 * W, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
        q1 = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
        # thread (warp w, g, t) holds positions r2 = 8 w + g and 8 w + g + 8 W: MMA rows g and g + 8 of
        # every warp's row tile, which here are the same rows for all warps
        warp = (r2 // 8) % W
        row_in_tile = r3 * 16 + r2 % 8 + 8 * (r2 // (8 * W))  # (REP, 16W, 1) in [0, BN)
        JS: gl.constexpr = W if INTERLEAVE else 1  # span stride of a warp's steps
        span0 = warp if INTERLEAVE else warp * SPW  # INTERLEAVE: step j of warp w is span j W + w
        w_words = w_ptr.to(gl.pointer_type(gl.int32))
        w_off = row_in_tile * (spans * 16) + span0 * 16 + q1
        aq_codes = absmax_ptr.to(gl.pointer_type(gl.int16))
        aq_off = row_in_tile * spans + span0
        token, tok = mma_columns(r2, q1, FOUR)
        x_words = (x_ptr.to(gl.pointer_type(gl.int32)) + gl.minimum(token, M - 1) * (K // 2) + 16 * (q1 // 4)
                   + span0 * 64)
        valid = q1 % 4 < 2  # accumulators 2, 3 of each four pass through
        grp = (q1 // 8) if FOUR else q1 * 0  # the lane's quant group (t >= 2: group B)
        # byte offset (after the tables) of each valid sum in one of the two reduction buffers:
        # [buffer][warp][group][row][token] fp32
        slot = ((((warp * 2 + grp) * BN + row_in_tile) * 8 + tok) * 4)
        OL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [W, 1], [1, 0])  # (BN rows, 8 tokens)
        o_row = gl.arange(0, BN, layout=gl.SliceLayout(1, OL))[:, None]
        o_tok = gl.arange(0, 8, layout=gl.SliceLayout(0, OL))[None, :]
        o_slot = (o_row * 8 + o_tok) * 4
        BUF: gl.constexpr = W * 2 * BN * 8 * 4

        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        tiles = gl.cdiv(N, BN)
        end = gl.cdiv(tiles - pid, programs) * SPW  # this program's items: its tiles times SPW spans
        tile = pid
        j = pid * 0

        res_table, res_code2, res_red = _reserve_tables_red(W, BUF)
        if PDL:  # as _nf4_tc_kernel
            gl.inline_asm_elementwise(GDC_LAUNCH, "=r,r", [gl.program_id(0)], gl.int32, is_pure=False, pack=1)
            _fill_pair_table(pairs_ptr, W, FILL_TABLE)
            if EARLY:
                words, aq = _rows_operands(tile, j * JS, spans, w_words, w_off, aq_codes, aq_off, row_in_tile, span0, N,
                                           BN, EVEN_N)
            gl.inline_asm_elementwise(GDC_WAIT, "=r,r", [gl.program_id(0)], gl.int32, is_pure=False, pack=1)
            if not EARLY:
                words, aq = _rows_operands(tile, j * JS, spans, w_words, w_off, aq_codes, aq_off, row_in_tile, span0, N,
                                           BN, EVEN_N)
        else:
            words, aq = _rows_operands(tile, j * JS, spans, w_words, w_off, aq_codes, aq_off, row_in_tile, span0, N,
                                       BN, EVEN_N)
            _fill_pair_table(pairs_ptr, W, FILL_TABLE)
        off = gl.load(offset_ptr)
        _fill_code2(code2_ptr, W, FILL_CODE2)
        _cta_barrier()

        acc = gl.zeros([REP, 16 * W, 16], gl.float32, L)
        buf = pid * 0
        for it in range(0, end):
            last = j == SPW - 1
            step = (it + 1 < end).to(gl.int32)  # 0 on the last item: the pipeline re-reads it
            wrap = step * last.to(gl.int32)
            n_j = j + step - wrap * SPW
            n_tile = tile + wrap * programs
            cur, cur_aq = words, aq
            words, aq = _rows_operands(n_tile, n_j * JS, spans, w_words, w_off, aq_codes, aq_off, row_in_tile, span0, N,
                                       BN, EVEN_N)
            if EVEN_N:
                a2 = gl.load(absmax2_ptr + ((aq_off + (tile * BN * spans + j * JS)) >> 7))
            else:
                a2 = gl.load(absmax2_ptr + ((gl.minimum(tile * BN + row_in_tile, N - 1) * spans + span0 + j * JS) >> 7))
            acc = gl.inline_asm_elementwise(
                ASM, CONSTRAINTS, [cur, x_operand(x_words + j * (64 * JS), q1, zeros_ptr, FOUR), cur_aq.to(gl.int32),
                                   a2, off, acc],
                gl.float32, is_pure=True, pack=8)
            if last:  # the tile's K is done: the warps' (and groups') sums meet in shared memory
                base = RED_OFF + buf * BUF
                gl.inline_asm_elementwise(RED_STORE, "=r,f,r,r", [acc, slot + base, valid.to(gl.int32)], gl.int32,
                                          is_pure=False, pack=1)
                _cta_barrier()
                total = gl.zeros([BN, 8], gl.float32, OL)
                for w in gl.static_range(W):
                    for g in gl.static_range(GROUPS):
                        total += gl.inline_asm_elementwise(RED_LOAD, "=f,r", [o_slot + (base + (w * 2 + g) * BN * 32)],
                                                           gl.float32, is_pure=False, pack=1)
                o_rows = tile * BN + o_row
                gl.store(y_ptr + o_tok * N + o_rows, total.to(y_ptr.dtype.element_ty), mask=(o_rows < N) & (o_tok < M))
                buf = 1 - buf  # the next tile writes the other buffer: no barrier needed before it
                acc = gl.zeros_like(acc)
            tile, j = n_tile, n_j

        _keep_reservations(res_table, res_code2, y_ptr.to(gl.pointer_type(gl.float32)), off != off, W)
        _keep_red(res_red, y_ptr.to(gl.pointer_type(gl.float32)), off != off, W, BUF)


def rows_plan(N: int, sms: int, c: dict) -> tuple[int, dict]:
    """(programs, constexprs) of the row-complete kernel: one program per tile of 16 REP rows
    (ROWS_PROGRAMS None), or at most ROWS_PROGRAMS x SMs programs walking tiles pid, pid + programs, ..."""
    W, REP = c["W"], c.get("ROWS_REP") or c["REP"]
    tiles = triton.cdiv(N, 16 * REP)
    programs = tiles if not c.get("ROWS_PROGRAMS") else min(tiles, c["ROWS_PROGRAMS"] * sms)
    meta = dict(W=W, REP=REP, EVEN_N=N % (16 * REP) == 0, PDL=bool(c["PDL"]), EARLY=bool(c["EARLY"]),
                INTERLEAVE=bool(c.get("INTERLEAVE")), num_warps=W)
    if c.get("MAXNREG"):
        meta["maxnreg"] = c["MAXNREG"]
    return programs, meta


def rows_shared_bytes(W: int, REP: int) -> int:
    """The row-complete kernel's shared memory: the tables, then two reduction buffers of
    [W warps][2 groups][16 REP rows][8 tokens] fp32."""
    return SHARED_BYTES + 2 * (W * 2 * 16 * REP * 8 * 4)


def _launch_rows(x: torch.Tensor, q: NF4Tensor, c: dict) -> torch.Tensor:
    N, K = q.shape
    M = x.shape[0]
    programs, meta = rows_plan(N, _num_sms(x.device), c)
    meta["PDL"] = meta["PDL"] and pdl.enabled(x)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    compiled = _nf4_tc_rows_kernel[(programs,)](
        x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, nf4_half_pairs(str(x.device), x.dtype), y,
        zero_words(x.device), M, N, K, **kernel_constexprs(x.dtype, c["ALU"], takes_four(M, c), c["DP4A"]),
        **PDL_PTX, RED_STORE=_RED_STORE, RED_LOAD=_RED_LOAD, RED_OFF=SHARED_BYTES, launch_pdl=meta["PDL"], **meta)
    if compiled.metadata.shared != rows_shared_bytes(meta["W"], meta["REP"]):  # the PTX's offsets assume it
        raise RuntimeError(f"row-complete kernel: {compiled.metadata.shared} bytes of shared memory, expected "
                           f"{rows_shared_bytes(meta['W'], meta['REP'])}")
    return y


def gemv_rows(x: torch.Tensor, q: NF4Tensor, config: dict | None = None) -> torch.Tensor:
    """Y (M, N) = X (M, K) @ W^T through the row-complete kernel (1..8 rows, K a multiple of 128 W)."""
    c = dict(DEFAULT_CONFIG, ROWS_REP=None, ROWS_PROGRAMS=None)
    c.update(config or {})
    if (q.shape[1] // 128) % c["W"]:
        raise ValueError(f"K = {q.shape[1]} does not split into whole spans over {c['W']} warps")
    return _launch_rows(x.contiguous(), q, c)


CONFIGS = {"rows2": {}, "rows1": {"ROWS_REP": 1}, "rows_w8": {"W": 8, "ROWS_REP": 1},
           "rows2_p4": {"ROWS_PROGRAMS": 4}, "rows1_p4": {"ROWS_REP": 1, "ROWS_PROGRAMS": 4},
           "ileave2": {"INTERLEAVE": True}, "ileave1": {"INTERLEAVE": True, "ROWS_REP": 1},
           "ileave1_p4": {"INTERLEAVE": True, "ROWS_REP": 1, "ROWS_PROGRAMS": 4},
           "ileave_w8": {"INTERLEAVE": True, "W": 8, "ROWS_REP": 1}}


def main():
    from common import bench_graph_us
    from kernels import nf4 as N
    from kernels import nf4_tc as T
    torch.manual_seed(0)
    rows = []
    for n, k in [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (1000, 4096), (37, 1024)]:
        qs = [N.quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(6)]
        nbytes = qs[0].packed.numel() + qs[0].absmax.numel() + 4 * qs[0].absmax2.numel()
        for m in (1, 3, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = N.nf4_matmul_reference(x, qs[0]).float()
            cands = {"nf4_gemv_tc": lambda q: T.nf4_gemv_tc(x, q)}
            cands.update({name: (lambda c: lambda q: gemv_rows(x, q, c))(c) for name, c in CONFIGS.items()})
            for name, fn in cands.items():
                try:
                    err = ((fn(qs[0]).float() - want).abs().max() / want.abs().max()).item()
                    us = bench_graph_us([(lambda q: lambda: fn(q))(q) for q in qs])
                    row = dict(N=n, K=k, M=m, what=name, us=round(us, 2), TBps=round(nbytes / us / 1e6, 3),
                               err=round(err, 5), ok=err < 2e-2)
                except Exception:  # noqa: BLE001
                    row = dict(N=n, K=k, M=m, what=name, error=traceback.format_exc()[-600:])
                rows.append(row)
                print(row, flush=True)
    out = os.path.join(os.environ.get("OUT", "/tmp"), "nf4_tc_rows.json")
    json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
