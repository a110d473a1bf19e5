"""NF4 decode GEMV on tensor cores: Y (M, N) = X (M, K) @ W^T for 1 <= M <= 8 tokens, bf16/fp16.

Why: the CUDA-core decode loop (`kernels.nf4.nf4_rows_loop`) spends ~6 instructions per weight
element (code extraction, a gather per element, an FMA per token, group sums, layout conversions);
this kernel (Gluon, Triton's explicit-layout dialect, with inline PTX) spends ~2.5, and its cost
does not grow with the token count:

- Tensor cores do the products: mma.m16n8k16 with W as the A operand (16 weight rows) and the
  tokens as the 8 columns of B, so 1..8 tokens cost the same.
- Each packed byte holds two consecutive elements (high nibble first), and an A-operand register
  holds exactly two consecutive k's (bf16x2): one lookup per byte in a 256-entry table of bf16 pairs
  gives the register. The table sits in shared memory replicated once per lane (entry b of lane l
  at word 32 b + l), so a warp's 32 lookups never share a bank: one dp4a makes the address (byte k
  of the word times 128, plus the lane's base), one LDS loads the pair (DP4A_LOOKUP; prmt + mad
  otherwise). LOOKUP_ALU byte pairs per row tile are looked up in registers instead (`_alu_pair`).
- A thread loads 16 contiguous bytes of each of its rows per step: a "span" of 2 quant groups
  (128 columns) is 64 bytes per row, lanes t < 2 of a row holding group A and t >= 2 group B. The
  MMA sums over k, so the k order is free: MMA j takes bytes 2j and 2j + 1 of every lane's 16
  (`span_slots`). Each group is scaled by its own absmax, exactly as the reference does. With at
  most 4 tokens (`takes_four`), columns 0-3 of B carry the tokens on group A's lanes and columns
  4-7 the same tokens on group B's (the other lanes read zeros), so one chain of 8 MMAs serves both
  groups; with more, each MMA runs twice, with x zeroed on one group's lanes each time (_asm).

Layout: a program has W warps of 16 rows times REP row tiles; lane 4g + t holds words 4t..4t+3 of
rows g and g + 8W of its warp (BlockedLayout([1, 1, 4], [1, 8, 4], [1, W, 1]) over (REP, 16 W, 16)
words), which are the rows of its MMA fragments; the PTX takes one row tile at a time (pack=8).
With SPLIT (the default where the spans divide by W), the W warps hold the same 16 REP rows instead
(lane 4g + t: rows g and g + 8 of each row tile) and an item is W consecutive spans, warp w taking
the w-th: a program then reads 64 W contiguous bytes of each row at once, which the DRAM serves
faster than 64 bytes of each of 16 W REP rows (benchmarks/NOTES.md, session 12).
Work: (row tile, span(s)) items shared evenly by one wave of programs (stream-K); a program walks its
items as one stream, loading the next item's words while it computes this one's, and adds each
tile's sums into an fp32 buffer with atomics; one more launch casts the sums to x's dtype and
leaves the buffer at zero for the next call (`resident_sums`). Both launch with programmatic
dependent launch (kernels/pdl.py) on sm_90: the GEMV's launch, table fill and first weight loads
(EARLY) overlap the previous kernel, and it waits for that kernel before reading x or the sums
buffer. The PTX reads x itself (the warps read the same span, or with SPLIT W neighbouring ones: L1
hits after the first), so no copy of x waits in registers. The PTX owns its tables at
offset 0 of the kernel's shared memory (`global_smem`); two Gluon allocations reserve the space, and
the launcher refuses a build whose shared memory is anything but those bytes.

CPU (no Gluon there): `emulate` is the kernel's arithmetic in PyTorch; tests also run the PTX for
one warp through a small interpreter (tests/kernels/test_nf4_tc.py). GPU tests run the kernel.
"""
import torch
import triton
import triton.language as tl

from kernels import pdl
from kernels.nf4 import (BLOCKSIZE, NF4_VALUES, NF4Tensor, _absmax_reference, _check_2d, _num_sms,
                         cuda_capability, nf4_half_pairs)

try:  # Gluon: Triton >= 3.5 (the API this file uses is the one of Triton 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - older Triton: the caller falls back to kernels.nf4
    gluon = gl = None
else:  # the CTA barrier: gl.thread_barrier (Triton 3.5-3.6), gl.barrier (later)
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

MAX_TOKENS = 8  # the MMA's N
ENABLED = True  # False: nf4_gemv keeps its own kernels (benchmarks' A/B runs, --no-tc)


def span_slots() -> torch.Tensor:
    """(2, 8, 16) int64: for group chain c (0: group A, 1: group B) and MMA j of a span, the span
    column (0..127) that each of the MMA's 16 k slots multiplies, or -1 where the chain's x operand
    is zero (the other group's lanes). Slot 2t + 8s + e is lane t's byte 16t + 2j + s, element e."""
    slots = torch.full((2, 8, 16), -1, dtype=torch.long)
    for j in range(8):
        for t in range(4):
            for s in range(2):
                for e in range(2):
                    slots[t // 2, j, 2 * t + 8 * s + e] = 2 * (16 * t + 2 * j + s) + e
    return slots


def emulate(x: torch.Tensor, q: NF4Tensor, out_dtype: torch.dtype | None = None, four: bool | None = None
            ) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch (fp32 accumulation, K % 128 == 0): per span and group
    chain, the MMAs' A tiles gathered through the pair table at `span_slots`, B from x at the same
    columns, the chain's sum scaled by the group's absmax; returned in out_dtype (default x.dtype;
    the kernel's accumulator is fp32). The eight-column PTX adds both groups into one sum span after
    span; the four-column one (`four`, default: at most 4 tokens) keeps a sum per group (its lanes)
    and adds the two at the end. For tests on machines without a GPU."""
    N, K = q.shape
    M = x.shape[0]
    four = takes_four(M) if four is None else four
    table = nf4_half_pairs("cpu", x.dtype)
    packed = q.packed.reshape(N, K // 2).to(torch.long).cpu()
    absmax = _absmax_reference(q).reshape(N, K // BLOCKSIZE).cpu()
    xs = x.cpu().float()
    y = torch.zeros(2 if four else 1, M, N, dtype=torch.float32)
    slots = span_slots()
    for sp in range(K // (2 * BLOCKSIZE)):
        for chain in range(2):
            d = torch.zeros(M, N)
            for j in range(8):
                cols = sp * 2 * BLOCKSIZE + slots[chain, j][slots[chain, j] >= 0]  # columns this MMA uses
                pairs = table[packed[:, cols // 2]]  # (N, 8): each column's byte pair
                bits = torch.where(cols % 2 == 0, pairs & 0xFFFF, (pairs >> 16) & 0xFFFF)
                a = bits.to(torch.int16).view(x.dtype).float()  # unscaled NF4 in x's dtype
                d += xs[:, cols] @ a.T
            y[chain if four else 0] += d * absmax[:, 2 * sp + chain][None, :]
    return y.sum(0).to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------

_LOOKUP = "prmt.b32 t, {w}, 0, {sel}; mad.lo.u32 t, t, 128, base; ld.shared.b32 {dst}, [t];"
# the same in two instructions: dp4a adds byte k of the word times 128 (the other bytes times 0) to base
_LOOKUP_DP4A = "dp4a.u32.u32 t, {w}, {mult}, base; ld.shared.b32 {dst}, [t];"
_MMA = ("mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{{d}0, {d}1, {d}2, {d}3}}, {{a0, a1, a2, a3}}, "
        "{{{b0}, {b1}}}, {{{c}}};")


def _byte_tables(dtype: torch.dtype) -> list[int]:
    """The 16 NF4 values in `dtype` split for register lookups: words holding the low bytes of entries
    0-3, 4-7, 8-11, 12-15, then the same for the high bytes (byte i of a word: entry 4 w + i)."""
    bits = [v & 0xFFFF for v in torch.tensor(NF4_VALUES, dtype=torch.float32).to(dtype).view(torch.int16).tolist()]
    return [sum(((bits[4 * w + i] >> shift) & 0xFF) << (8 * i) for i in range(4))
            for shift in (0, 8) for w in range(4)]


def _alu_pair(dtype: torch.dtype, w: str, shift: int, lo: str, hi: str) -> list[str]:
    """PTX that looks up two packed bytes (bits shift .. shift + 15 of word w) in registers instead of
    shared memory: lo / hi get the bf16x2 (fp16x2) pairs of the first / second byte. Why: these 13
    instructions use only the ALUs, which have room while the lookups (one LDS per byte) load the
    shared-memory pipe; 2 of a row tile's 16 pairs gain ~1%, 4 and more lose (NOTES.md, session 9).
    Stage 1 (per table half, per byte half): prmt picks, for each of the 4 nibbles, byte (n & 7) of an
    8-entry half; stage 2 keeps the half that bit 3 of each nibble names (selector 0x3210, + 4 where the
    bit is set); stage 3 interleaves low and high bytes into (even element, odd element) pairs."""
    t = _byte_tables(dtype)
    src = w
    body = []
    if shift:
        body.append(f"shr.b32 q, {w}, {shift};")
        src = "q"
    body += [f"and.b32 sl, {src}, 0x7777;", f"shr.b32 v, {src}, 1;", "and.b32 v, v, 0x4444;", "or.b32 v, v, 0x3210;",
             f"prmt.b32 la, {hex(t[0])}, {hex(t[1])}, sl;", f"prmt.b32 lb, {hex(t[2])}, {hex(t[3])}, sl;",
             f"prmt.b32 ha, {hex(t[4])}, {hex(t[5])}, sl;", f"prmt.b32 hb, {hex(t[6])}, {hex(t[7])}, sl;",
             "prmt.b32 la, la, lb, v;", "prmt.b32 ha, ha, hb, v;",
             # byte 0 holds nibbles 1 (even element) and 0; byte 1 nibbles 3 and 2
             f"prmt.b32 {lo}, la, ha, 0x4051;", f"prmt.b32 {hi}, la, ha, 0x6273;"]
    return body


def alu_units(n: int) -> list[tuple[int, int]]:
    """The (MMA j, row half h) byte pairs of a row tile's 16 that `n` register lookups take: spread
    over the MMAs, even j first (their bytes are the word's low half: no shift)."""
    order = [(j, h) for j in (0, 4, 2, 6) for h in (0, 1)] + [(j, h) for j in (1, 5, 3, 7) for h in (0, 1)]
    if not 0 <= n <= len(order):
        raise ValueError(f"ALU: 0..{len(order)} byte pairs per row tile, got {n}")
    return sorted(order[:n])


def _asm(ty: str, dtype: torch.dtype = torch.bfloat16, alu: int = 0, four: bool = False, dp4a: bool = False) -> str:
    """PTX for one row tile of one span, per thread (pack=8). Operands: $0-$7 accumulators out;
    $8-$15 words (row g: w0..w3, row g + 8W: w0..w3; lanes t < 2 hold group A, t >= 2 group B);
    $16 the address of the thread's 16 x pairs u0..u15 (64 contiguous bytes: elements 32t .. 32t + 31
    of the span for its MMA column), $17 (`four`) the address of 64 zero bytes; $24 / $28 the absmax
    codes of rows g / g + 8W (group A in byte 0, B in byte 1; bytes 2, 3 are ignored: the int16 codes
    come sign-extended); $32 / $36 their absmax2; $40 the offset; $48-$55 accumulators in.
    Accumulator i = 4h + w holds row h, MMA column 2t + w for w < 2 (w = 2, 3 pass through).
    x is loaded here (L1 hits: every warp reads the same span) so that no copy of it waits in
    registers across the loop. MMA j (0..7) takes bytes 2j and 2j + 1 of each row's 16, and x pairs
    u2j, u2j+1 at the same columns. Each MMA mixes the two quant groups (lanes t < 2 hold group A's
    bytes), which are scaled apart:
    - eight columns (default): column g is token g; each MMA runs twice, on x zeroed on group B's
      lanes (selp) for group A's chain and the other way round, and each chain is scaled by its group;
    - `four` (at most 4 tokens): columns 0-3 are tokens 0-3 of group A, columns 4-7 the same tokens of
      group B: a column's lanes of the other group load zeros ($17) instead of x. One MMA per j and one
      chain; lane t < 2 holds group A's sums of tokens 2t, 2t + 1 and lane t + 2 group B's, each
      scaled by its own group: half the MMAs, no selp, half the scaling.
    `alu` byte pairs (`alu_units`) are looked up in registers (`_alu_pair`), the rest in the table."""
    u = [f"u{i}" for i in range(16)]
    units = set(alu_units(alu))
    body = ["{", ".reg .b32 t, gs, base, cb, a0, a1, a2, a3, b0, b1, q, sl, v, la, lb, ha, hb, " + ", ".join(u) + ";",
            ".reg .b64 xa;", ".reg .pred pa;", ".reg .f32 e0, e1, e2, e3, f0, f1, f2, f3, z, s;",
            "mov.u32 base, %laneid;", "and.b32 t, base, 2;"]
    if four:
        # the lane's bytes are group (t >= 2), its column's group (lane >= 16): its x where they agree,
        # else the 64 zero bytes at $17; the byte group also picks its absmax code (byte 0 or 1)
        body += ["shr.b32 t, t, 1;", "shr.b32 q, base, 4;", "setp.eq.u32 pa, t, q;", "selp.b64 xa, $16, $17, pa;",
                 "add.u32 gs, t, 0x4440;"]
    else:
        body += ["setp.eq.u32 pa, t, 0;", "mov.b64 xa, $16;"]
    body += [f"ld.global.nc.v4.b32 {{{', '.join(u[4 * v:4 * v + 4])}}}, [xa+{16 * v}];" for v in range(4)]
    body += ["mov.f32 z, 0f00000000;", "mov.u32 cb, global_smem;", "mad.lo.u32 base, base, 4, cb;",
             f"add.u32 cb, cb, {TABLE_BYTES};"]
    for j in range(8):
        w_g, w_h = f"${8 + j // 2}", f"${12 + j // 2}"
        lo, hi = 2 * (j % 2), 2 * (j % 2) + 1  # bytes 2j, 2j + 1 inside their word
        for h, (w, dst_lo, dst_hi) in enumerate(((w_g, "a0", "a2"), (w_h, "a1", "a3"))):
            if (j, h) in units:
                body += _alu_pair(dtype, w, 8 * lo, dst_lo, dst_hi)
            elif dp4a:
                body += [_LOOKUP_DP4A.format(w=w, mult=hex(0x80 << (8 * lo)), dst=dst_lo),
                         _LOOKUP_DP4A.format(w=w, mult=hex(0x80 << (8 * hi)), dst=dst_hi)]
            else:
                body += [_LOOKUP.format(w=w, sel=hex(0x4440 + lo), dst=dst_lo),
                         _LOOKUP.format(w=w, sel=hex(0x4440 + hi), dst=dst_hi)]
        if four:
            c = "z, z, z, z" if j == 0 else "e0, e1, e2, e3"
            body.append(_MMA.format(ty=ty, d="e", b0=u[2 * j], b1=u[2 * j + 1], c=c))
            continue
        for d, keep in (("e", "{u}, 0"), ("f", "0, {u}")):  # group A's chain, group B's chain
            body += [f"selp.b32 b0, {keep.format(u=u[2 * j])}, pa;", f"selp.b32 b1, {keep.format(u=u[2 * j + 1])}, pa;"]
            c = "z, z, z, z" if j == 0 else f"{d}0, {d}1, {d}2, {d}3"
            body.append(_MMA.format(ty=ty, d=d, b0="b0", b1="b1", c=c))
    chains = (("e", "gs"),) if four else (("e", "0x4440"), ("f", "0x4441"))
    for h, (aq, a2) in enumerate((("$24", "$32"), ("$28", "$36"))):
        for grp, (d, sel) in enumerate(chains):
            # the group's absmax, as the reference rounds it: code2[code] * absmax2, then + offset
            body += [f"prmt.b32 t, {aq}, 0, {sel};", "mad.lo.u32 t, t, 4, cb;", "ld.shared.f32 s, [t];",
                     f"mul.rn.f32 s, s, {a2};", "add.rn.f32 s, s, $40;"]
            for w in (0, 1):
                out = 4 * h + w
                body.append(f"fma.rn.f32 ${out}, s, {d}{2 * h + w}, ${48 + out if grp == 0 else out};")
        body += [f"mov.b32 ${4 * h + 2}, ${48 + 4 * h + 2};", f"mov.b32 ${4 * h + 3}, ${48 + 4 * h + 3};"]
    body.append("}")
    return "\n".join(body)


TABLE_BYTES = 256 * 32 * 4  # the pair table: 256 byte values x 32 lanes, int32
SHARED_BYTES = TABLE_BYTES + 256 * 4  # + code2
DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}  # x dtypes, with their PTX type
ASM = {dtype: _asm(ty, dtype) for dtype, ty in DTYPES.items()}  # eight columns, every byte looked up in shared memory
# Measured (H100, benchmarks/decode_ab.py, one process, session 9): the 32-layer decode step 7.929 ms with
# prmt + mad and no register lookups, 7.838 with dp4a, 7.800 with dp4a and 2 register-looked-up byte pairs
# (4 pairs and more were slower: the ALUs fill up). A config's "ALU" / "DP4A" wins over these.
LOOKUP_ALU = 2  # byte pairs per row tile and span looked up in registers instead (alu_units)
DP4A_LOOKUP = True  # the lookup address by one dp4a instead of prmt + mad
_ASM_VARIANTS: dict = {}  # (dtype, alu, four, dp4a) -> the PTX of that variant
CONSTRAINTS = ",".join(["=f"] * 8 + ["r"] * 8 + ["l"] * 8 + ["r"] * 8 + ["f"] * 24)
_FILL_TABLE = ("{ .reg .b32 b; mov.u32 b, global_smem; add.u32 b, b, $8; st.shared.v4.b32 [b], {$4, $5, $6, $7}; "
               "mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; }")
_FILL_CODE2 = ("{ .reg .b32 b; mov.u32 b, global_smem; add.u32 b, b, $2; st.shared.b32 [b+%d], $1; mov.b32 $0, 0; }"
               % TABLE_BYTES)


def kernel_constexprs(dtype: torch.dtype, alu: int | None = None, four: bool = False,
                      dp4a: bool | None = None) -> dict:
    """The PTX strings a kernel on this core takes as constexprs (its MMA block and table fills), for
    x's dtype, `alu` register-looked-up byte pairs per row tile (default LOOKUP_ALU), the column
    layout (`four`: at most 4 tokens, see _asm) and the lookup address (`dp4a`, default
    DP4A_LOOKUP); the kernels also take FOUR=four, and _nf4_tc_kernel PDL_PTX."""
    alu = LOOKUP_ALU if alu is None else alu
    dp4a = DP4A_LOOKUP if dp4a is None else bool(dp4a)
    if alu or four or dp4a:
        key = (dtype, alu, four, dp4a)
        if key not in _ASM_VARIANTS:
            _ASM_VARIANTS[key] = _asm(DTYPES[dtype], dtype, alu, four, dp4a)
        text = _ASM_VARIANTS[key]
    else:
        text = ASM[dtype]
    return dict(ASM=text, CONSTRAINTS=CONSTRAINTS, FILL_TABLE=_FILL_TABLE, FILL_CODE2=_FILL_CODE2, FOUR=four)


PDL_PTX = dict(GDC_WAIT=pdl.GDC_WAIT, GDC_LAUNCH=pdl.GDC_LAUNCH)
_CHECKED: set = set()  # builds whose shared memory was checked


def check_shared(compiled, what: str) -> None:
    """The PTX owns the first SHARED_BYTES of shared memory: refuse a build (checked once per build;
    Triton specializes M == 1 and alignments) that places anything else there."""
    key = getattr(compiled, "hash", None) or id(compiled)
    if key not in _CHECKED:
        if compiled.metadata.shared != SHARED_BYTES:
            raise RuntimeError(f"{what}: the kernel uses {compiled.metadata.shared} bytes of shared memory, "
                               f"expected only its {SHARED_BYTES} bytes of tables; its PTX would read the "
                               "wrong place")
        _CHECKED.add(key)


if gluon is not None:

    @gluon.jit
    def _next_item(it, tile, s, end, spans):
        """(row tile, span) of item it + 1, or of it itself where it is the last (end - 1): the
        pipeline's last loads re-read their own item. No division per item."""
        s = s + (it + 1 < end).to(gl.int32)
        wrap = (s == spans).to(gl.int32)
        return tile + wrap, s - wrap * spans

    @gluon.jit
    def mma_columns(r2, q1, FOUR: gl.constexpr):
        """(the token, or pair, whose x a lane loads: its MMA column; the token of accumulators 0, 1 of
        each thread's four) for the column layout of _asm. Eight columns: column g is token g, and the
        accumulators hold tokens 2t, 2t + 1. FOUR: columns g and g + 4 are token g, for group A's lanes
        (t < 2) and group B's, and the accumulators hold tokens 2 (t mod 2), 2 (t mod 2) + 1."""
        col = r2 % 8
        tok = 2 * (q1 // 4) + q1 % 4
        if FOUR:
            col = col % 4
            tok = 2 * ((q1 // 4) % 2) + q1 % 4
        return col, tok

    @gluon.jit
    def item_rows(r3, r2, W: gl.constexpr, SPLIT: gl.constexpr):
        """(row in the item's tile (REP, 16W, 1), span offset of the thread's warp) for positions r3, r2
        of the (REP, 16 W, 16) item layout: thread (g, t) of warp w holds positions 8 w + g and
        8 w + g + 8 W. Plain: they are rows of the warp's own 16, every warp on the item's one span.
        SPLIT: they are rows g and g + 8 of a 16-row tile that all warps share, and warp w takes span w
        of the item's W."""
        if SPLIT:
            return r3 * 16 + r2 % 8 + 8 * (r2 // (8 * W)), (r2 // 8) % W
        return r3 * (16 * W) + r2, r2 * 0

    @gluon.jit
    def x_operand(x_at, q1, zeros_ptr, FOUR: gl.constexpr):
        """The x addresses the PTX takes (int64). FOUR: zeros_ptr (64 zero bytes) goes in as the second
        address of each 8-element pack (q1 % 4 == 1: a constant per register), which the other group's
        lanes of a column read instead of x."""
        if FOUR:
            x_at = gl.where(q1 % 4 == 1, zeros_ptr.to(gl.pointer_type(gl.int32)), x_at)
        return x_at.to(gl.int64)

    @gluon.jit
    def _item_operands(tile, s, spans, w_words, w_off, aq_codes, aq_off, row_in_tile, warp_span, N,
                       BN: gl.constexpr, EVEN_N: gl.constexpr):
        """The item (row tile, span s)'s words (REP, 16W, 16) and both groups' absmax codes per row;
        with SPLIT, warp w reads span s + w (warp_span; w_off and aq_off include it)."""
        if EVEN_N:  # every row of the tile exists: a scalar base plus fixed per-thread offsets
            base = (tile * BN).to(gl.int64) * spans + s
            words = gl.load(w_words + base * 16 + w_off)
            aq = gl.load(aq_codes + base + aq_off)
        else:  # rows past N read row N - 1 (in bounds); the output drops them
            rows = gl.minimum(tile * BN + row_in_tile, N - 1).to(gl.int64) * spans + s + warp_span
            words = gl.load(w_words + rows * 16 + (w_off % 16))
            aq = gl.load(aq_codes + rows)
        return words, aq

    @gluon.jit
    def _reserve_tables(W: gl.constexpr):
        """The shared memory the PTX writes and reads itself: bytes 0..TABLE_BYTES-1 the pair table
        replicated per lane, then code2 (fp32). These two allocations reserve the space and must be the
        kernel's only ones (the launcher checks the size), so where Triton places each does not matter."""
        res_table = gl.allocate_shared_memory(gl.int32, [256, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        res_code2 = gl.allocate_shared_memory(gl.int32, [256], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        return res_table, res_code2

    @gluon.jit
    def _fill_pair_table(pairs_ptr, W: gl.constexpr, FILL_TABLE: gl.constexpr):
        """Entry b of lane l at word 32 b + l (a per-device constant: safe before a PDL wait)."""
        TL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [W, 1], [1, 0])  # a warp stores 512 contiguous bytes
        t_row = gl.arange(0, 256, layout=gl.SliceLayout(1, TL))[:, None]
        t_off = (t_row * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, TL))[None, :]) * 4  # (256, 32) bytes
        gl.inline_asm_elementwise(FILL_TABLE, "=r,=r,=r,=r,r,r,r,r,r,r,r,r",
                                  [gl.load(pairs_ptr + t_row) + t_off * 0, t_off], gl.int32, is_pure=False, pack=4)

    @gluon.jit
    def _fill_code2(code2_ptr, W: gl.constexpr, FILL_CODE2: gl.constexpr):
        CL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        c_idx = gl.arange(0, 256, layout=CL)
        gl.inline_asm_elementwise(FILL_CODE2, "=r,r,r", [gl.load(code2_ptr.to(gl.pointer_type(gl.int32)) + c_idx),
                                                        c_idx * 4], gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _keep_reservations(res_table, res_code2, f32_ptr, never, W: gl.constexpr):
        """Uses of the reservations that never write (`never` is false): without a use Triton drops
        them, and with this one at the kernel's end nothing else is placed in their space."""
        KL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [W, 1], [1, 0])
        k_cols = gl.arange(0, 32, layout=gl.SliceLayout(0, KL))[None, :]
        gl.atomic_add(f32_ptr + k_cols, res_table.slice(0, 1, dim=0).load(KL).to(gl.float32),
                      mask=(k_cols >= 0) & never)
        CL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        c_idx = gl.arange(0, 256, layout=CL)
        gl.atomic_add(f32_ptr + c_idx, res_code2.load(CL).to(gl.float32), mask=(c_idx >= 0) & never)

    @gluon.jit
    def _nf4_tc_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, y_ptr, zeros_ptr,
                       M, N, K, ITEMS_PER_PROGRAM,
                       ASM: gl.constexpr, CONSTRAINTS: gl.constexpr, FILL_TABLE: gl.constexpr,
                       FILL_CODE2: gl.constexpr, FOUR: gl.constexpr, GDC_WAIT: gl.constexpr, GDC_LAUNCH: gl.constexpr,
                       W: gl.constexpr, REP: gl.constexpr, EVEN_N: gl.constexpr, PDL: gl.constexpr,
                       EARLY: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
        # Work: items (row tile of BN rows, span of 2 quant groups = 128 columns), tile-major; program p
        # takes items p * ITEMS_PER_PROGRAM ... as one stream (stream-K over one wave of programs), its
        # loads one item ahead across row tiles; at the last item of a tile (or of its stream) it adds
        # that tile's sums into y.
        # SPLIT: the W warps hold the same BN = 16 REP rows and an item is W consecutive spans, warp w
        # taking the w-th: a program reads 64 W contiguous bytes of each row at once (a better DRAM
        # pattern than 64 bytes of 16 W REP rows), and the W warps add into the same rows at a flush.
        BN: gl.constexpr = REP * 16 if SPLIT else REP * 16 * W
        STEP: gl.constexpr = W if SPLIT else 1  # spans per item
        # (REP, 16 W, 16) int32: the words of one item; thread (g, t) of warp w holds words 4t..4t+3
        # (16 bytes) of its rows g and g + 8 (positions 8 w + g and 8 w + g + 8 W), in each row tile
        L: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 8, 4], [1, W, 1], [2, 1, 0])
        spans = K // 128
        steps = spans // STEP  # items per row tile
        r3 = gl.arange(0, REP, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
        r2 = gl.arange(0, 16 * W, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
        q1 = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]
        row_in_tile, warp_span = item_rows(r3, r2, W, SPLIT)
        w_words = w_ptr.to(gl.pointer_type(gl.int32))
        # int32: a tile's words (the launcher: N * K / 64 < 2**31)
        w_off = row_in_tile * (spans * 16) + warp_span * 16 + q1
        aq_codes = absmax_ptr.to(gl.pointer_type(gl.int16))  # both groups' codes of a span, one load
        aq_off = row_in_tile * spans + warp_span
        # x of thread (g, t): the token of its MMA column (mma_columns), elements 32 t .. 32 t + 31 of the
        # span (64 bytes, read by the PTX); tokens >= M read token M - 1, whose columns are dropped at the end
        token, tok = mma_columns(r2, q1, FOUR)
        x_words = (x_ptr.to(gl.pointer_type(gl.int32)) + gl.minimum(token, M - 1) * (K // 2) + 16 * (q1 // 4)
                   + warp_span * 64)
        y_tok = (q1 % 4 < 2) & (tok < M)

        start = gl.program_id(0) * ITEMS_PER_PROGRAM
        end = gl.minimum(start + ITEMS_PER_PROGRAM, gl.cdiv(N, BN) * steps)
        tile = start // steps  # the current item's row tile and step (its first span: STEP * s)
        s = start - tile * steps

        res_table, res_code2 = _reserve_tables(W)
        if PDL:
            # Started while the previous kernel runs: let the next kernel (the cast) launch, fill the pair
            # table, then wait for the previous kernel before reading x, the sums buffer or the weights
            # (any of which it may have written).
            gl.inline_asm_elementwise(GDC_LAUNCH, "=r,r", [gl.program_id(0)], gl.int32, is_pure=False, pack=1)
            _fill_pair_table(pairs_ptr, W, FILL_TABLE)
            # EARLY: the first item's weights are loaded before the wait (their DRAM latency overlaps the
            # previous kernel; 16.77 -> 15.97 us at M=1 on 14336x4096). Safe because this kernel starts
            # early only behind a kernel that lets it (griddepcontrol.launch_dependents), which only this
            # file's GEMV and cast do, and neither writes NF4 weights; any earlier kernel has completed
            # before that one started. A kernel that writes weights and lets dependents start early would
            # have to wait first.
            if EARLY:
                words, aq = _item_operands(tile, s * STEP, spans, w_words, w_off, aq_codes, aq_off, row_in_tile,
                                           warp_span, N, BN, EVEN_N)
            gl.inline_asm_elementwise(GDC_WAIT, "=r,r", [gl.program_id(0)], gl.int32, is_pure=False, pack=1)
            if not EARLY:
                words, aq = _item_operands(tile, s * STEP, spans, w_words, w_off, aq_codes, aq_off, row_in_tile,
                                           warp_span, N, BN, EVEN_N)
        else:  # the first item's loads are issued before the table fill: their DRAM latency overlaps it
            words, aq = _item_operands(tile, s * STEP, spans, w_words, w_off, aq_codes, aq_off, row_in_tile,
                                       warp_span, N, BN, EVEN_N)
            _fill_pair_table(pairs_ptr, W, FILL_TABLE)
        off = gl.load(offset_ptr)
        _fill_code2(code2_ptr, W, FILL_CODE2)
        _cta_barrier()

        acc = gl.zeros([REP, 16 * W, 16], gl.float32, L)
        for it in range(start, end):
            # the next item's words and codes are loaded before this item's math (its own on the last)
            n_tile, n_s = _next_item(it, tile, s, end, steps)
            cur, cur_aq = words, aq
            words, aq = _item_operands(n_tile, n_s * STEP, spans, w_words, w_off, aq_codes, aq_off, row_in_tile,
                                       warp_span, N, BN, EVEN_N)
            rows = tile * BN + row_in_tile  # (REP, 16W, 1)
            # one absmax2 for both groups (even blocks); rows past N read row N - 1's
            if EVEN_N:  # (row * spans + span) >> 7 with the per-thread part (aq_off) kept out of the loop
                a2 = gl.load(absmax2_ptr + ((aq_off + (tile * BN * spans + s * STEP)) >> 7))
            else:
                a2 = gl.load(absmax2_ptr + ((gl.minimum(rows, N - 1) * spans + s * STEP + warp_span) >> 7))
            acc = gl.inline_asm_elementwise(
                ASM, CONSTRAINTS, [cur, x_operand(x_words + s * (64 * STEP), q1, zeros_ptr, FOUR), cur_aq.to(gl.int32),
                                   a2, off, acc],
                gl.float32, is_pure=True, pack=8)
            flush = (s == steps - 1) | (it == end - 1)
            if flush:  # this program's share of the tile is done: fp32 atomics into the zeroed sums
                # (FOUR: both groups' lanes add theirs)
                gl.atomic_add(y_ptr + tok * N + rows, acc, mask=(rows < N) & y_tok, sem="relaxed")
            # restart after a flush (a select, not a multiply by 0: an inf sum must not become NaN in the next tile)
            acc = gl.where(flush, gl.zeros_like(acc), acc)
            tile, s = n_tile, n_s

        _keep_reservations(res_table, res_code2, y_ptr, off != off, W)  # the offset is never NaN


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

# 4 programs per SM with registers capped at 128 (4 x 128 threads x 128 registers = the register file;
# session 5: 20.2 us at M=1 on 14336x4096 against 21.5 for 3 uncapped programs). RESIDENT: the sums
# buffer kept at zero by the cast launch (18.3 vs 19.5 us with a zero-fill and a cast, H100/H200).
# PDL: programmatic dependent launch of the GEMV and the cast (16.65 vs 17.63 us, H100, session 7)
# FOUR: at most 4 tokens take the four-column PTX (half the MMAs, see _asm). ALU / DP4A: register lookups
# (_alu_pair) / dp4a lookup addresses, None = LOOKUP_ALU / DP4A_LOOKUP
# EARLY: the first item's weights loaded before the PDL wait (see the kernel).
# SPLIT: the warps of a program take consecutive spans of the same rows where the spans divide by W (14.57 vs
# 15.70 us at M=1 on 14336x4096, 14.89 vs 16.35 on 4096x14336; H100, session 12; within +-0.3 us elsewhere).
DEFAULT_CONFIG = dict(W=4, REP=2, WAVES=4, MAXNREG=128, RESIDENT=True, PDL=True, FOUR=True, ALU=None, DP4A=None,
                      EARLY=True, SPLIT=True)
_RESIDENT: dict = {}  # (device, stream, elements) -> fp32 sums buffer the cast kernel leaves at zero
_ZEROS: dict = {}  # device -> 64 zero bytes, never written: the x that four-column lanes of the other group read


@triton.jit
def _cast_and_zero_kernel(acc_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """y = acc in y's dtype, and acc = 0 for the next call (one launch instead of a fill and a cast).
    PDL: launched while the GEMV runs; lets the next kernel launch, then waits for the GEMV's sums."""
    pdl.pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(acc_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)
    # Triton lays the zeros out differently from the load (4 vs 8 elements per thread): without the
    # barrier one warp could zero sums another warp has not loaded yet (seen in kernels/moe_tc.py)
    tl.debug_barrier()
    tl.store(acc_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=mask)


def resident_sums(device: torch.device, n: int, tag: str = "gemv") -> torch.Tensor:
    """The zeroed fp32 buffer of n elements the programs add into, kept per (device, stream, n, tag):
    zeroed once, then left at zero by _cast_and_zero_kernel. Kept for good, so that a CUDA graph
    that captured it keeps a valid buffer. Per stream, because two launches running at once
    must not share it (the engine decodes on one stream)."""
    key = (str(device), torch.cuda.current_stream(device).cuda_stream, n, tag)
    if key not in _RESIDENT:
        _RESIDENT[key] = torch.zeros(n, dtype=torch.float32, device=device)
    return _RESIDENT[key]


def zero_words(device: torch.device) -> torch.Tensor:
    """16 int32 zeros on `device`, kept for good (CUDA graphs capture the address) and never written."""
    key = str(device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(16, dtype=torch.int32, device=device)
    return _ZEROS[key]


FOUR_COLUMNS = True  # False: every launch takes the eight-column PTX (A/B runs); a config's "FOUR" too


def takes_four(tokens: int, config: dict | None = None) -> bool:
    """Whether a launch whose segments have at most `tokens` MMA columns' worth of tokens (pairs)
    takes the four-column PTX (_asm)."""
    return FOUR_COLUMNS and bool((config or {}).get("FOUR", True)) and tokens <= 4


def supported(x: torch.Tensor, q: NF4Tensor) -> bool:
    """Whether nf4_gemv_tc takes this call: Gluon, CUDA, bf16/fp16 x of 1..8 rows, K a positive
    multiple of 128, and NF4 fields aligned for the kernel's 4-byte word and 2-byte code loads (a
    checkpoint's tensors can be views at odd offsets)."""
    N, K = q.shape
    return (gluon is not None and x.is_cuda and x.dtype in DTYPES and x.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS
            and N >= 1 and K >= 2 * BLOCKSIZE and K % (2 * BLOCKSIZE) == 0 and N * (K // BLOCKSIZE) < 2**31
            and q.packed.data_ptr() % 4 == 0 and q.absmax.data_ptr() % 2 == 0)


def preferred_shape(M: int, N: int, K: int) -> bool:
    """Where nf4_gemv's default takes this kernel: 1 to 8 rows, K a multiple of 128. Measured
    (CUDA-graph times, benchmarks/RESULTS.md "Session 7"): faster than nf4_gemv's CUDA-core
    kernels on the Mixtral shapes at every row count, e.g. at 1 row 16.65 vs 21.5 us on 14336x4096,
    8.2 vs 9.8 on 4096x4096 and 4.3 vs 6.4 us on 1024x4096 (H100, same call)."""
    return K % (2 * BLOCKSIZE) == 0 and 1 <= M <= MAX_TOKENS


def preferred(x: torch.Tensor, q: NF4Tensor) -> bool:
    """preferred_shape on sm_90 (the architecture it was measured on), for inputs it supports."""
    return (ENABLED and supported(x, q) and preferred_shape(x.shape[0], *q.shape)
            and cuda_capability(x.device) == (9, 0))


def takes_split(K: int, config: dict) -> bool:
    """Whether a launch over K columns takes the SPLIT item layout (config SPLIT, and K's spans divide
    among the config's W warps); the rule of this GEMV and of kernels/moe_tc.py's kernel."""
    return bool(config.get("SPLIT")) and (K // (2 * BLOCKSIZE)) % config["W"] == 0


def plan(N: int, K: int, sms: int, config: dict | None = None) -> tuple[int, int, dict]:
    """(programs, items per program, constexprs): one wave of WAVES programs per SM sharing the
    (row tile, span) items evenly."""
    c = dict(DEFAULT_CONFIG, **(config or {}))
    spans = K // (2 * BLOCKSIZE)
    split = takes_split(K, c)
    bn = c["REP"] * 16 * (1 if split else c["W"])
    items = triton.cdiv(N, bn) * (spans // (c["W"] if split else 1))
    per_program = triton.cdiv(items, min(items, c["WAVES"] * sms))
    meta = dict(W=c["W"], REP=c["REP"], EVEN_N=N % bn == 0, PDL=bool(c["PDL"]), EARLY=bool(c["EARLY"]),
                SPLIT=split, num_warps=c["W"])
    if c.get("MAXNREG"):  # ptxas register cap: more programs per SM, at the price of spills
        meta["maxnreg"] = c["MAXNREG"]
    return triton.cdiv(items, per_program), per_program, meta


def nf4_gemv_tc(x: torch.Tensor, q: NF4Tensor, config: dict | None = None) -> torch.Tensor:
    """Y (M, N) = X (M, K) @ W^T on tensor cores, for 1 <= M <= 8 rows of bf16/fp16 (decoding)."""
    x = _check_2d(x, q.shape[1], q, "nf4_gemv_tc")
    if not supported(x, q):
        raise ValueError(f"nf4_gemv_tc needs CUDA bf16/fp16 x of 1..{MAX_TOKENS} rows, K a positive multiple of "
                         f"128 and 4-byte-aligned NF4 codes; got x {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"W {tuple(q.shape)} (nf4_gemv serves the rest)")
    return launch(x, q, config)


def launch(x: torch.Tensor, q: NF4Tensor, config: dict | None = None) -> torch.Tensor:
    """nf4_gemv_tc after its checks: x 2-D, contiguous, with K columns, and `supported` (nf4_gemv
    has checked all that before it dispatches here)."""
    N, K = q.shape
    M = x.shape[0]
    if x.data_ptr() % 4:  # x is read as pairs (int32 words)
        x = x.clone()
    programs, per_program, meta = plan(N, K, _num_sms(x.device), config)
    meta["PDL"] = meta["PDL"] and pdl.enabled(x)  # griddepcontrol: sm_90+, and not switched off
    c = dict(DEFAULT_CONFIG, **(config or {}))
    resident = c["RESIDENT"]
    acc = resident_sums(x.device, M * N) if resident else torch.zeros(M * N, dtype=torch.float32, device=x.device)
    cast = False
    try:
        compiled = _nf4_tc_kernel[(programs,)](
            x, q.packed, q.absmax, q.absmax2, q.code2, q.offset, nf4_half_pairs(str(x.device), x.dtype), acc,
            zero_words(x.device), M, N, K, per_program,
            **kernel_constexprs(x.dtype, c["ALU"], takes_four(M, c), c["DP4A"]),
            **PDL_PTX, launch_pdl=meta["PDL"], **meta)
        check_shared(compiled, "nf4_gemv_tc")
        if not resident:
            return acc.view(M, N).to(x.dtype)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        _cast_and_zero_kernel[(triton.cdiv(M * N, 1024),)](acc, y, M * N, BLOCK=1024, PDL=meta["PDL"], num_warps=4,
                                                            launch_pdl=meta["PDL"])
        cast = True
        return y
    finally:
        if resident and not cast:  # an error or an interrupt between the launches: leave the buffer at zero
            acc.zero_()
