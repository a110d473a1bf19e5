"""MoE decode experts on the tensor-core GEMV core (kernels/nf4_tc.py): 1-8 tokens, NF4, sm_90.

Why: the row kernels (kernels/moe.py) run the CUDA-core loop, ~6 instructions per weight element
(~1.5 TB/s at 3 tokens); the tensor-core core spends ~3.5 and does not grow with the token count.
One launch streams every routed expert's w1 and w3 through it, one more every routed w2, the work
shared evenly by many short programs (stream-K over (routed expert, weight, row tile, span) items,
their number read on the device; the hardware balances the SMs), so a launch's fixed cost is paid
once per ~400 MB, not per weight. multi_gemv (at the end) runs the same kernel over several weights
that share their rows: attention's q, k and v while decoding.

Five launches, static shapes, no host sync (CUDA-graph safe):
1. plan (one program): R, the routed experts in order, each one's pair count and pairs;
2. gate/up: G = x w1^T and U = x w3^T per (pair, row): fp32 atomics into resident sums;
3. swiglu: h = silu(G) * U rounded to x's dtype (as the row kernels round it); G, U back to zero;
4. down: Y = h w2^T per (pair, row), the same way;
5. combine: out[t] = sum_k weight[t, k] * Y[t top_k + k] in fp32, cast; Y back to zero.

An expert serves at most T pairs (a token's top-k experts are distinct), so its pairs fit the MMA's
8 columns: lane column j reads pair j's activations (the first pair's where j >= the count; those
columns are dropped). The code2 table in shared memory is expert 0's: NF4Experts.build records
whether every expert has the same one (bitsandbytes' and our quantizer's fixed map), and
`supported` requires it.
"""
import torch
import triton
import triton.language as tl

from kernels import nf4_tc as TC
from kernels.norm import SlotSums
from kernels.nf4 import _num_sms, nf4_half_pairs

MAX_TOKENS = TC.MAX_TOKENS  # 8: the MMA's columns
# As kernels/nf4_tc.py's GEMV: 4 warps, 2 row tiles, registers capped at 128 (4 programs per SM). Unlike
# it, many short programs: ITEMS items per program at the most experts the pairs can route to (so
# several waves; at least WAVES); the hardware then balances the SMs. No programmatic dependent launch:
# measured 105.2 vs 107.2 us with it at 1 token, 256.2 vs 257.1 at 3 (H100, session 7). ITEMS=10 against
# one wave (H100, Mixtral experts, benchmarks/moe_tc_ab.py): 108 vs 104 us at 1 token, 226 vs 258 at 3,
# 313 vs 361 at 8 (ITEMS 6: 104 / 234 / 314; 16: 107 / 240 / 323; 24: 134 / 255 / 344); in two later runs
# ITEMS 8 read 1% under 10 at 3 and 8 tokens (220-222 / 311-314 us), 12 above. Other shapes lost there:
# 3 uncapped programs per SM, 8 warps x 1 or 2 row tiles. The dense GEMV has too few items for this
# (3584 on 14336x4096: one wave is 6.8 per program) and is best at one wave.
# SPLIT: the warps take consecutive spans of the same rows where K allows (see nf4_tc's GEMV and the kernel).
DEFAULT_CONFIG = dict(W=4, REP=2, WAVES=4, MAXNREG=128, ITEMS=8, FOUR=True, ALU=None, DP4A=None,
                      SPLIT=True)  # see nf4_tc


def plan_size(E: int) -> int:
    """int32 entries of a plan (`plan_body`) for E experts."""
    return 1 + 2 * E + MAX_TOKENS * E


@triton.jit
def _plan_kernel(ids_ptr, plan_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, COLS: tl.constexpr):
    plan_body(ids_ptr, plan_ptr, P, E, BLOCK_P, BLOCK_E, COLS)


@triton.jit
def plan_body(ids_ptr, plan_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, COLS: tl.constexpr):
    """plan (int32): [0] R, the number of routed experts; [1 + s] the expert of slot s < R (ascending
    ids); [1 + E + e] the number of pairs routed to e; [1 + 2E + COLS e + j] its j-th pair in pair
    order (its first pair for j >= the count; pair 0 for an expert nobody picked). The ids are read
    past L1 (.cg): kernels.moe's fused router plans from ids other programs have just written."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1, cache_modifier=".cg")  # (BP,) int64
    match = ids[None, :] == offs_e[:, None]  # (BE, BP)
    m32 = match.to(tl.int32)
    count = tl.sum(m32, axis=1)  # (BE,)
    rank = tl.cumsum(m32, axis=1) - 1  # (BE, BP): the pair's place among its expert's pairs
    routed = (count > 0) & (offs_e < E)
    slot = tl.cumsum(routed.to(tl.int32), axis=0) - 1
    tl.store(plan_ptr, tl.sum(routed.to(tl.int32), axis=0))
    tl.store(plan_ptr + 1 + slot, offs_e, mask=routed)
    tl.store(plan_ptr + 1 + E + offs_e, count, mask=offs_e < E)
    first = tl.sum(tl.where(match & (rank == 0), offs_p[None, :], 0), axis=1)  # (BE,)
    for j in tl.static_range(COLS):
        pj = tl.sum(tl.where(match & (rank == j), offs_p[None, :], 0), axis=1)
        tl.store(plan_ptr + 1 + 2 * E + offs_e * COLS + j, tl.where(count > j, pj, first), mask=offs_e < E)


def plan_reference(ids: torch.Tensor, E: int, cols: int = MAX_TOKENS) -> torch.Tensor:
    """_plan_kernel's output in PyTorch (int32, 1 + 2E + cols E entries; unused slots are -1)."""
    ids = ids.reshape(-1).tolist()
    plan = [-1] * (1 + 2 * E + cols * E)
    routed = sorted(set(ids))
    plan[0] = len(routed)
    for s, e in enumerate(routed):
        plan[1 + s] = e
    for e in range(E):
        mine = [p for p, i in enumerate(ids) if i == e]
        plan[1 + E + e] = len(mine)
        for j in range(cols):
            plan[1 + 2 * E + cols * e + j] = mine[j] if j < len(mine) else (mine[0] if mine else 0)
    return torch.tensor(plan, dtype=torch.int32)


@triton.jit
def _swiglu_zero_kernel(gu_ptr, h_ptr, n, BLOCK: tl.constexpr):
    """h = silu(G) * U rounded to h's dtype (kernels.moe._swiglu's rounding); G = U = 0 after."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gu_ptr + offs, mask=mask)
    u = tl.load(gu_ptr + n + offs, mask=mask)
    tl.store(h_ptr + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # every warp has loaded: the zeros' layout (Triton's choice) spans other warps' elements
    tl.store(gu_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=mask)
    tl.store(gu_ptr + n + offs, tl.zeros([BLOCK], tl.float32), mask=mask)


@triton.jit
def _combine_zero_kernel(y_ptr, w_ptr, out_ptr, C, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_k w[t top_k + k] * Y[t top_k + k] (fp32, then out's dtype); Y = 0 after."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        p = t * TOP_K + k
        acc += tl.load(w_ptr + p).to(tl.float32) * tl.load(y_ptr + p * C + offs, mask=mask)
    tl.store(out_ptr + t * C + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    # Every warp has loaded before any zeroes: Triton lays the zeros out differently from the loads
    # (4 vs 8 elements per thread), so a warp's zeros cover other warps' elements. Measured on an
    # H100 before this barrier: wrong sums from element 128 on for 3 and 4 slots.
    tl.debug_barrier()
    for k in tl.static_range(TOP_K):
        tl.store(y_ptr + (t * TOP_K + k) * C + offs, tl.zeros([BLOCK], tl.float32), mask=mask)


if TC.gluon is not None:
    gluon, gl = TC.gluon, TC.gl

    @gluon.jit
    def _segment(seg, table_ptr, plan_ptr, E, MATS: gl.constexpr):
        """Segment seg = slot x MATS + weight: its expert and the pointer to its weight's 5 NF4 fields
        in the (MATS, 5, E) table of data_ptrs (packed, absmax, absmax2, code2, offset), E apart."""
        slot = seg // MATS
        e = gl.load(plan_ptr + 1 + slot)
        return e, table_ptr + (seg - slot * MATS) * 5 * E + e

    @gluon.jit
    def _segment_state(seg, table_ptr, plan_ptr, E, col, ROW_DIV, MATS: gl.constexpr, COLS: gl.constexpr):
        """What the items of segment seg share: its expert; its weight's codes, absmax codes and nested
        absmax (pointers) and double-quant offset; and the activation row each lane's column reads."""
        e, fields = _segment(seg, table_ptr, plan_ptr, E, MATS)
        words_ptr = gl.multiple_of(gl.load(fields).to(gl.pointer_type(gl.int32)), 16)  # the host checks
        aq_ptr = gl.load(fields + E).to(gl.pointer_type(gl.int16))
        absmax2 = gl.load(fields + 2 * E).to(gl.pointer_type(gl.float32))
        off = gl.load(gl.load(fields + 4 * E).to(gl.pointer_type(gl.float32)))
        x_row = gl.load(plan_ptr + 1 + 2 * E + e * COLS + col) // ROW_DIV  # (1, 16W, 1)
        return e, words_ptr, aq_ptr, absmax2, off, x_row

    @gluon.jit
    def _expert_item(words_ptr, aq_ptr, tile, s, spans, w_off, aq_off, BN: gl.constexpr):
        """Item (segment, row tile, span): the words (REP, 16W, 16) and absmax codes of its rows."""
        base = (tile * BN).to(gl.int64) * spans + s
        return gl.load(words_ptr + base * 16 + w_off), gl.load(aq_ptr + base + aq_off)

    @gluon.jit
    def _next_expert_item(it, seg, tile, s, end, tiles, spans):
        """(segment, tile, span) of item it + 1 (of it itself at the last: the pipeline re-reads it)."""
        s = s + (it + 1 < end).to(gl.int32)
        wrap = (s == spans).to(gl.int32)
        s = s - wrap * spans
        tile = tile + wrap
        wrap = (tile == tiles).to(gl.int32)
        return seg + wrap, tile - wrap * tiles, s

    @gluon.jit
    def _moe_tc_kernel(x_ptr, table_ptr, plan_ptr, code2_ptr, pairs_ptr, out_ptr, zeros_ptr, P, N, K, E, X_WORDS,
                       ROW_DIV, ASM: gl.constexpr, CONSTRAINTS: gl.constexpr, FILL_TABLE: gl.constexpr,
                       FILL_CODE2: gl.constexpr, FOUR: gl.constexpr, MATS: gl.constexpr, COLS: gl.constexpr,
                       W: gl.constexpr, REP: gl.constexpr, PER_SEGMENT: gl.constexpr, SPLIT: gl.constexpr,
                       num_warps: gl.constexpr):
        # out (MATS, P, N) fp32 += the routed experts' weights times their pairs' activation rows: row
        # x[pair // ROW_DIV] (X_WORDS int32 words apart). N % BN == 0 and K % 128 == 0 (the host checks).
        # PER_SEGMENT (multi_gemv: every token is a pair of every segment): out (R, P, N), by segment.
        # SPLIT (K % (128 W) == 0): as in nf4_tc's GEMV, the warps hold the same 16 REP rows and an item
        # is W consecutive spans, warp w taking the w-th (a program reads 64 W contiguous bytes per row).
        BN: gl.constexpr = REP * 16 if SPLIT else REP * 16 * W
        STEP: gl.constexpr = W if SPLIT else 1  # spans per item
        L: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 8, 4], [1, W, 1], [2, 1, 0])
        spans = K // 128
        steps = spans // STEP  # items per row tile
        tiles = N // BN
        r3 = gl.arange(0, REP, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
        r2 = gl.arange(0, 16 * W, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
        q1 = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
        row_in_tile, warp_span = TC.item_rows(r3, r2, W, SPLIT)  # (REP, 16W, 1), (1, 16W, 1)
        w_off = row_in_tile * (spans * 16) + warp_span * 16 + q1
        aq_off = row_in_tile * spans + warp_span
        # the pair whose activations this lane loads (its MMA column's), and the pairs of its accumulators
        col, tok = TC.mma_columns(r2, q1, FOUR)
        x_col = 16 * (q1 // 4) + warp_span * 64  # its 16 words of its span
        acc_col = q1 % 4 < 2
        pairs_of = plan_ptr + 1 + 2 * E  # (E, COLS)

        res_table, res_code2 = TC._reserve_tables(W)
        TC._fill_pair_table(pairs_ptr, W, FILL_TABLE)
        TC._fill_code2(code2_ptr, W, FILL_CODE2)

        items = gl.load(plan_ptr) * (MATS * tiles * steps)  # R routed experts x MATS weights x tiles x steps
        per = gl.cdiv(items, gl.num_programs(0))
        start = gl.program_id(0) * per
        end = gl.minimum(start + per, items)
        first = gl.minimum(start, items - 1)
        seg = first // (tiles * steps)
        tile = (first - seg * (tiles * steps)) // steps
        s = first - (seg * tiles + tile) * steps  # the item's step: spans STEP s .. STEP s + STEP - 1
        e, wp, ap, a2p, off, x_row = _segment_state(seg, table_ptr, plan_ptr, E, col, ROW_DIV, MATS, COLS)
        words, aq = _expert_item(wp, ap, tile, s * STEP, spans, w_off, aq_off, BN)
        TC._cta_barrier()

        acc = gl.zeros([REP, 16 * W, 16], gl.float32, L)
        for it in range(start, end):
            n_seg, n_tile, n_s = _next_expert_item(it, seg, tile, s, end, tiles, steps)
            cur, cur_aq = words, aq
            cur_e, cur_a2p, cur_off, cur_row = e, a2p, off, x_row
            if n_seg != seg:  # a new segment (rare: a program meets 1-3): its state, for the prefetch
                e, wp, ap, a2p, off, x_row = _segment_state(n_seg, table_ptr, plan_ptr, E, col, ROW_DIV, MATS, COLS)
            words, aq = _expert_item(wp, ap, n_tile, n_s * STEP, spans, w_off, aq_off, BN)
            rows = tile * BN + row_in_tile  # (REP, 16W, 1)
            a2 = gl.load(cur_a2p + ((aq_off + (tile * BN * spans + s * STEP)) >> 7))  # (row * spans + span) >> 7
            x_words = (x_ptr.to(gl.pointer_type(gl.int32)) + cur_row.to(gl.int64) * X_WORDS + x_col
                       + s * (64 * STEP))
            acc = gl.inline_asm_elementwise(
                ASM, CONSTRAINTS, [cur, TC.x_operand(x_words, q1, zeros_ptr, FOUR), cur_aq.to(gl.int32), a2, cur_off,
                                   acc],
                gl.float32, is_pure=True, pack=8)
            flush = (s == steps - 1) | (it == end - 1)
            if flush:  # this program's share of the (expert, weight, tile) is done
                n_pairs = gl.load(plan_ptr + 1 + E + cur_e)
                pair = gl.load(pairs_of + cur_e * COLS + tok)  # (1, 1, 16)
                out_seg = seg if PER_SEGMENT else seg % MATS
                gl.atomic_add(out_ptr + (out_seg * P + pair).to(gl.int64) * N + rows, acc,
                              mask=acc_col & (tok < n_pairs), sem="relaxed")
            acc = gl.where(flush, gl.zeros_like(acc), acc)
            seg, tile, s = n_seg, n_tile, n_s

        TC._keep_reservations(res_table, res_code2, out_ptr, items < 0, W)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def supported(x: torch.Tensor, experts: torch.Tensor, w) -> bool:
    """Whether moe_decode_tc takes this call: Gluon, sm_90, CUDA bf16/fp16 x of 1..8 tokens, the
    experts' rows a multiple of the 128-row tile and their columns of 128, one code2 for all experts
    (NF4Experts.code2_shared) and 16-byte-aligned codes (the kernel's 16-byte word loads)."""
    bn = DEFAULT_CONFIG["REP"] * 16 * DEFAULT_CONFIG["W"]
    return (TC.gluon is not None and x.is_cuda and x.dtype in TC.DTYPES and x.dim() == 2
            and 1 <= x.shape[0] <= MAX_TOKENS and TC.cuda_capability(x.device) == (9, 0)
            and w.hidden % bn == 0 and w.intermediate % bn == 0 and w.hidden % 128 == 0
            and w.intermediate % 128 == 0 and w.code2_shared and w.packed_aligned and w.absmax_aligned)


def programs_for(c: dict, sms: int, max_items: int) -> int:
    """Programs of one launch: at least WAVES x SMs, and max_items / ITEMS when that is more."""
    return max(c["WAVES"] * sms, triton.cdiv(max_items, c["ITEMS"]) if c.get("ITEMS") else 0)


def _meta(c: dict) -> dict:
    """The launch's tile constexprs and options from a config."""
    return dict(W=c["W"], REP=c["REP"], num_warps=c["W"], **({"maxnreg": c["MAXNREG"]} if c.get("MAXNREG") else {}))


def _launch(x_rows, table, plan, code2, out, P, N, K, E, row_div, mats, meta, c, active=None, per_segment=False,
            columns=MAX_TOKENS):
    """One _moe_tc_kernel launch; `active`: the most segments' slots the plan can fill (default: every
    pair on its own expert); `columns`: the most pairs a segment can have (the four-column PTX for <= 4)."""
    bn = meta["REP"] * 16 * meta["W"]  # an item is 8 KB either way: bn rows x 1 span, or bn / W rows x W spans
    max_items = (min(P, E) if active is None else active) * mats * (N // bn) * (K // 128)
    programs = programs_for(c, _num_sms(x_rows.device), max_items)
    split = TC.takes_split(K, c)
    compiled = _moe_tc_kernel[(programs,)](
        x_rows, table, plan, code2, nf4_half_pairs(str(x_rows.device), x_rows.dtype), out, TC.zero_words(x_rows.device),
        P, N, K, E, x_rows.stride(0) // 2, row_div,
        **TC.kernel_constexprs(x_rows.dtype, c["ALU"], TC.takes_four(columns, c), c["DP4A"]), MATS=mats,
        COLS=MAX_TOKENS, PER_SEGMENT=per_segment, SPLIT=split, **meta)
    TC.check_shared(compiled, "moe_tc")


_LAST_OUTPUT: list = [None]  # the last SlotSums handed out (combine=False), to check it was used


def moe_decode_tc(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w,
                  config: dict | None = None, plan: torch.Tensor | None = None,
                  combine: bool = True) -> "torch.Tensor | SlotSums":
    """kernels.moe.moe_decode on the tensor-core core: out (T, C) in x.dtype for 1..8 tokens.
    x (T, C); weights, experts (T, top_k) (routing weights, int64 expert ids); plan: the experts'
    plan (`plan_body`, int32 (plan_size(E),)) when the router already made it, else made here.
    combine=False: return the per-slot sums as a kernels.norm.SlotSums instead of launching the
    combine (the next RMSNorm combines them in its own launch)."""
    if not supported(x, experts, w):
        raise ValueError(f"moe_decode_tc needs sm_90, bf16/fp16 x of 1..{MAX_TOKENS} tokens and NF4 experts whose "
                         f"sizes are multiples of 128 with one code2 (got x {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}); kernels.moe.moe_decode serves the rest")
    c = dict(DEFAULT_CONFIG, **(config or {}))
    T, C = x.shape
    top_k = experts.shape[-1]
    P, I, E = experts.numel(), w.intermediate, w.num_experts
    x = x.contiguous()
    ids = experts.reshape(-1).contiguous()
    meta = _meta(c)
    if plan is None:
        plan = torch.empty(plan_size(E), dtype=torch.int32, device=x.device)
        _plan_kernel[(1,)](ids, plan, P, E, BLOCK_P=max(2, triton.next_power_of_2(P)),
                           BLOCK_E=max(2, triton.next_power_of_2(E)), COLS=MAX_TOKENS)
    elif plan.shape != (plan_size(E),) or plan.dtype != torch.int32:
        raise ValueError(f"moe_decode_tc: plan must be int32 of {plan_size(E)} entries, got {plan.dtype} "
                         f"{tuple(plan.shape)}")
    gu = TC.resident_sums(x.device, 2 * P * I, "moe_gate_up")  # (2, P, I): G then U, kept at zero
    y = TC.resident_sums(x.device, P * C, "moe_down")  # (P, C)
    last = _LAST_OUTPUT[0]
    if last is not None and not last.taken:  # an earlier call's sums were never combined (an error
        last.take()                          # between the MoE block and the next norm): clear them
        last.sums.zero_()
    _LAST_OUTPUT[0] = None
    done = False
    try:
        code2 = w.w1[0].code2
        _launch(x, w.table13, plan, code2, gu, P, I, C, E, top_k, 2, meta, c, columns=T)
        h = torch.empty((P, I), dtype=x.dtype, device=x.device)
        _swiglu_zero_kernel[(triton.cdiv(P * I, 1024),)](gu, h, P * I, BLOCK=1024, num_warps=4)
        _launch(h, w.table2, plan, code2, y, P, C, I, E, 1, 1, meta, c, columns=T)
        if not combine:
            done = True
            _LAST_OUTPUT[0] = SlotSums(y.view(P, C), weights.reshape(T, top_k), x.dtype)
            return _LAST_OUTPUT[0]
        out = torch.empty((T, C), dtype=x.dtype, device=x.device)
        _combine_zero_kernel[(T, triton.cdiv(C, 1024))](y, weights.reshape(-1).contiguous(), out, C, TOP_K=top_k,
                                                       BLOCK=1024, num_warps=4)
        done = True
        return out
    finally:
        if not done:  # an error between the launches: the next call must find the sums at zero
            gu.zero_()
            y.zero_()


# ----------------------------------------------------------------------------------------------
# Several weights over the same rows in one launch (attention's q, k and v while decoding)
# ----------------------------------------------------------------------------------------------
# The same kernel with a fixed plan: every weight cut into segments of `rows` rows (an "expert" each,
# its pointers offset into the weight's buffers), every token a pair of every segment. One launch and
# one cast instead of three GEMV launches and three casts.

_MULTI: dict = {}  # (device, every segment's pointers, tokens) -> (table, plan, rows): kept for good


def segment_rows(weights, bn: int = DEFAULT_CONFIG["REP"] * 16 * DEFAULT_CONFIG["W"]) -> int | None:
    """The largest of 1024 / 512 / 256 / 128 rows that divides every weight's rows, is a multiple of the
    kernel's row tile, and starts each segment on a nested-absmax block (rows x K / 64 % 256 == 0);
    None if none does."""
    for rows in (1024, 512, 256, 128):
        if rows % bn == 0 and all(q.shape[0] % rows == 0 and (rows * q.shape[1] // 64) % 256 == 0 for q in weights):
            return rows
    return None


def segment_table(weights, rows: int) -> list[list[int]]:
    """(5, R) data_ptrs of each segment's packed codes, absmax codes, nested absmax, code2, offset."""
    table: list[list[int]] = [[], [], [], [], []]
    for q in weights:
        N, K = q.shape
        for r0 in range(0, N, rows):
            blocks = r0 * K // 64
            for field, ptr in enumerate((q.packed.data_ptr() + r0 * K // 2, q.absmax.data_ptr() + blocks,
                                         q.absmax2.data_ptr() + 4 * (blocks // 256), q.code2.data_ptr(),
                                         q.offset.data_ptr())):
                table[field].append(ptr)
    return table


def multi_supported(x: torch.Tensor, weights) -> bool:
    """Whether multi_gemv takes x (T, K) times these NF4 weights: sm_90, bf16/fp16, 1..8 rows, one K
    (a multiple of 128), segment rows that fit (segment_rows), 16-byte-aligned codes, 2-byte-aligned
    absmax codes."""
    if not (TC.gluon is not None and x.is_cuda and x.dtype in TC.DTYPES and x.dim() == 2
            and 1 <= x.shape[0] <= MAX_TOKENS and TC.cuda_capability(x.device) == (9, 0)):
        return False
    K = x.shape[1]
    return (K % 128 == 0 and all(q.shape[1] == K for q in weights) and segment_rows(weights) is not None
            and all(q.packed.data_ptr() % 16 == 0 and q.absmax.data_ptr() % 2 == 0 for q in weights))


def _multi_plan(x: torch.Tensor, weights):
    T = x.shape[0]
    rows = segment_rows(weights)
    table = segment_table(weights, rows)
    # keyed by every pointer the table holds: a weight's buffers may be freed and others allocated at
    # some of the same addresses
    key = (str(x.device), rows, tuple(map(tuple, table)), T)
    if key not in _MULTI:
        if torch.cuda.is_current_stream_capturing():  # the code2 check below syncs: not inside a capture
            return None
        if not bool(torch.stack([q.code2 for q in weights]).eq(weights[0].code2).all()):
            _MULTI[key] = None  # one code2 table for all: not these weights
        else:
            R = len(table[0])
            plan = [R, *range(R), *[T] * R] + [j if j < T else 0 for _ in range(R) for j in range(MAX_TOKENS)]
            _MULTI[key] = (torch.tensor([table], dtype=torch.int64, device=x.device),
                           torch.tensor(plan, dtype=torch.int32, device=x.device), rows)
    return _MULTI[key]


@triton.jit
def _segments_cast_zero_kernel(out_ptr, y_ptr, T, ROWS, COLS, BLOCK: tl.constexpr):
    """y[t, s ROWS + n] = out[s, t, n] in y's dtype; out = 0 after. Program (segment s, token t)."""
    s, t = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROWS
    src = out_ptr + (s * T + t) * ROWS + offs
    tl.store(y_ptr + t * COLS + s * ROWS + offs, tl.load(src, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # every warp has loaded before any zeroes (see _combine_zero_kernel)
    tl.store(src, tl.zeros([BLOCK], tl.float32), mask=mask)


def multi_gemv(x: torch.Tensor, weights, config: dict | None = None, epilogue=None):
    """[x W_i^T] side by side: (T, sum N_i) in x's dtype, one GEMV launch and one cast; None when the
    weights do not share one code2 (or their first call is inside a CUDA-graph capture): the caller
    runs them one by one. Check multi_supported first. epilogue(sums, rows): launched instead of the
    cast, on the fp32 sums (segments, T, rows), which it must leave at zero; its result is returned
    (kernels.rope.rope_from_sums)."""
    entry = _multi_plan(x, weights)
    if entry is None:
        return None
    table, plan, rows = entry
    c = dict(DEFAULT_CONFIG, **(config or {}))
    T, K = x.shape
    R = table.shape[-1]
    cols = sum(q.shape[0] for q in weights)
    x = x.contiguous()
    meta = _meta(c)
    out = TC.resident_sums(x.device, R * T * rows, "multi_gemv")  # (R, T, rows)
    done = False
    try:
        _launch(x, table, plan, weights[0].code2, out, T, rows, K, R, 1, 1, meta, c, active=R, per_segment=True,
                columns=T)
        if epilogue is not None:
            y = epilogue(out.view(R, T, rows), rows)
            done = True
            return y
        y = torch.empty((T, cols), dtype=x.dtype, device=x.device)
        _segments_cast_zero_kernel[(R, T)](out, y, T, rows, cols, BLOCK=triton.next_power_of_2(rows), num_warps=4)
        done = True
        return y
    finally:
        if not done:
            out.zero_()
