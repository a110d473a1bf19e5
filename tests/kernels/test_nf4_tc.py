"""The tensor-core NF4 decode GEMV (kernels/nf4_tc.py) against the reference.

Gluon does not run in the Triton interpreter, so on a machine without a GPU:
- `emulate` (the kernel's k order, pair table and group scaling in PyTorch) is compared with
  `nf4_matmul_reference`;
- the kernel's inline PTX is executed for one warp by a small interpreter below (32 lanes in lock
  step, mma.m16n8k16 fragments as the PTX ISA defines them), on operand registers laid out as the
  kernel's Gluon layouts put them, and compared with the reference: this checks the byte-to-slot
  and x-to-slot mapping that the GPU runs, and the absmax epilogue;
- the kernel is built for sm_90 (its shared memory must be exactly the tables the PTX owns; no
  spills).
On a GPU the kernel itself is compared with the reference, and nf4_gemv's dispatch is checked.
"""
import re
import struct

import pytest
import torch

from kernels import nf4 as K
from kernels import nf4_tc as T
from tests.sm90 import run_child

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(n, k, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = K.quantize_nf4(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    return q, x


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,m", [(16, 128, 1), (37, 256, 3), (70, 384, 8), (5, 640, 2)])  # K % 128 == 0
def test_emulation_matches_reference(n, k, m, dtype):
    q, x = _case(n, k, m, dtype)
    # the emulation keeps fp32 products of unscaled NF4 values; the reference rounds the scaled
    # weight to x.dtype first: they differ by about one rounding of x.dtype
    assert _rel(T.emulate(x, q), K.nf4_matmul_reference(x, q)) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_span_slots_cover_each_column_of_each_group_once():
    slots = T.span_slots()
    for chain in range(2):  # group A: columns 0..63 of the span, group B: 64..127
        used = slots[chain][slots[chain] >= 0]
        assert sorted(used.tolist()) == list(range(64 * chain, 64 * chain + 64))
    assert ((slots[0] >= 0) != (slots[1] >= 0)).all()  # each k slot belongs to exactly one chain


def test_pair_table_holds_both_nibbles_of_each_byte():
    for dtype in (torch.bfloat16, torch.float16):
        table = K.nf4_half_pairs("cpu", dtype)
        code = K.nf4_code().to(dtype)
        for b in (0x00, 0x07, 0x70, 0x3C, 0xF1, 0xFF):
            lo = torch.tensor([table[b].item() & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype)
            hi = torch.tensor([(table[b].item() >> 16) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype)
            assert lo.item() == code[b >> 4].item() and hi.item() == code[b & 15].item()


# ----------------------------------------------------------------------------------------------
# The kernel's PTX, run for one warp on CPU
# ----------------------------------------------------------------------------------------------


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _half(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dtype).float().item()


class _Warp:
    """Executes the straight-line PTX of kernels.nf4_tc._asm for 32 lanes in lock step. Registers
    hold Python ints (b32) or floats (f32, rounded to fp32 after each operation)."""

    def __init__(self, regs: list[dict], smem: dict, gmem: dict, dtype: torch.dtype):
        self.r, self.smem, self.gmem, self.dtype = regs, smem, gmem, dtype

    def val(self, lane, tok):
        tok = tok.strip()
        if tok in self.r[lane]:
            return self.r[lane][tok]
        if tok == "%laneid":
            return lane
        if tok == "global_smem":
            return 0
        if tok.startswith("0f"):
            return struct.unpack(">f", bytes.fromhex(tok[2:]))[0]
        return int(tok, 0)

    def run(self, asm: str):
        for stmt in (s.strip() for s in asm.replace("\n", " ").split(";")):
            stmt = stmt[1:].strip() if stmt.startswith("{") else stmt
            if not stmt or stmt == "}" or stmt.startswith(".reg"):
                continue
            op, rest = stmt.split(None, 1)
            if op.startswith("mma.sync"):
                self.mma(rest)
                continue
            if op == "ld.global.nc.v4.b32":  # {d0, d1, d2, d3}, [address+offset]
                dsts, reg, offset = re.fullmatch(r"{([^}]*)},\s*\[(\S+?)\+(\d+)\]", rest).groups()
                for lane in range(32):
                    at = self.val(lane, reg) + int(offset)
                    for i, dst in enumerate(d.strip() for d in dsts.split(",")):
                        self.r[lane][dst] = self.gmem[at + 4 * i]
                continue
            args = [a.strip() for a in re.split(r",(?![^{]*})", rest)]
            for lane in range(32):
                self.step(lane, op, args)

    def step(self, lane, op, args):
        r, v = self.r[lane], lambda a: self.val(lane, a)
        dst = args[0]
        if op in ("mov.f32", "mov.u32", "mov.b32", "mov.b64"):
            r[dst] = v(args[1])
        elif op == "add.u32":
            r[dst] = (v(args[1]) + v(args[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            r[dst] = v(args[1]) & v(args[2])
        elif op == "or.b32":
            r[dst] = v(args[1]) | v(args[2])
        elif op == "shr.b32":
            r[dst] = v(args[1]) >> v(args[2])
        elif op == "setp.eq.u32":
            r[dst] = v(args[1]) == v(args[2])
        elif op in ("selp.b32", "selp.b64"):
            r[dst] = v(args[1]) if v(args[3]) else v(args[2])
        elif op == "dp4a.u32.u32":  # c + the sum of the byte-wise products of a and b (unsigned)
            a, b = v(args[1]), v(args[2])
            dot = sum(((a >> (8 * i)) & 0xFF) * ((b >> (8 * i)) & 0xFF) for i in range(4))
            r[dst] = (v(args[3]) + dot) & 0xFFFFFFFF
        elif op == "mad.lo.u32":
            r[dst] = (v(args[1]) * v(args[2]) + v(args[3])) & 0xFFFFFFFF
        elif op == "prmt.b32":  # generic mode: byte i of d is byte (c >> 4i) & 7 of {b, a}, or its sign (bit 3)
            pool, sel, d = (v(args[2]) << 32) | v(args[1]), v(args[3]), 0
            for i in range(4):
                nib = (sel >> (4 * i)) & 0xF
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                d |= ((0xFF if byte & 0x80 else 0) if nib & 8 else byte) << (8 * i)
            r[dst] = d
        elif op in ("ld.shared.b32", "ld.shared.f32"):
            r[dst] = self.smem[v(args[1].strip("[]"))]
        elif op == "mul.rn.f32":
            r[dst] = _f32(v(args[1]) * v(args[2]))
        elif op == "add.rn.f32":
            r[dst] = _f32(v(args[1]) + v(args[2]))
        elif op == "fma.rn.f32":
            r[dst] = _f32(v(args[1]) * v(args[2]) + v(args[3]))
        else:
            raise AssertionError(f"unexpected PTX {op}")

    def mma(self, rest):
        # D (16x8) = A (16x16) B (16x8) + C; lane 4g + t holds a0: A[g][2t..2t+1], a1: A[g+8][2t..],
        # a2: A[g][2t+8..], a3: A[g+8][2t+8..]; b0: B[2t..2t+1][g], b1: B[2t+8..][g]; c0, c1:
        # C[g][2t], C[g][2t+1]; c2, c3: row g + 8 (PTX ISA, mma.m16n8k16 fragments)
        d, a, b, c = [[x.strip() for x in grp.split(",")] for grp in re.findall(r"{([^}]*)}", rest)]
        A, B, C = torch.zeros(16, 16), torch.zeros(16, 8), torch.zeros(16, 8)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                w = self.val(lane, a[i])
                A[row, col], A[row, col + 1] = _half(w, self.dtype), _half(w >> 16, self.dtype)
            for i, k0 in enumerate((2 * t, 2 * t + 8)):
                w = self.val(lane, b[i])
                B[k0, g], B[k0 + 1, g] = _half(w, self.dtype), _half(w >> 16, self.dtype)
            for i, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                C[row, col] = self.val(lane, c[i])
        D = A.double() @ B.double() + C.double()
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
                self.r[lane][d[i]] = _f32(D[row, col].item())


def _ptx_span(q: K.NF4Tensor, x: torch.Tensor, alu: int = 0, four: bool = False, dp4a: bool = False) -> torch.Tensor:
    """Y (M, 16) of 16 rows over one 128-column span, by the kernel's PTX for one warp (W = 1, one
    row tile): operand registers as the kernel's layouts give them to lane 4g + t; `alu` byte pairs
    looked up in registers; `four`: the four-column PTX (M <= 4), whose lanes of the other group
    read zeros, and whose two groups' sums (lanes t and t + 2) are added as the atomics add them."""
    N, Kc = q.shape
    assert N == 16 and Kc == 128 and (M := x.shape[0]) <= (4 if four else 8)
    dtype = x.dtype
    words = q.packed.view(torch.int32).view(16, 16)  # (row, word) of the span
    x_pairs = x.view(torch.int16).to(torch.int32).view(M, 64, 2)
    x_words = (x_pairs[..., 0] & 0xFFFF) | ((x_pairs[..., 1] & 0xFFFF) << 16)  # (M, 64) pairs of x
    aq = q.absmax.to(torch.int32).view(16, 2)
    a2 = q.absmax2[(torch.arange(16) * 2) // 256]
    smem = {4 * (b * 32 + lane): K.nf4_half_pairs("cpu", dtype)[b].item() for b in range(256) for lane in range(32)}
    smem.update({T.TABLE_BYTES + 4 * c: q.code2[c].item() for c in range(256)})
    x_at, zeros_at = 1 << 20, 1 << 24  # where x (M, 64 pairs) and 64 zero bytes sit in the global memory
    gmem = {x_at + 4 * (64 * m + i): x_words[m, i].item() & 0xFFFFFFFF for m in range(M) for i in range(64)}
    gmem.update({zeros_at + 4 * i: 0 for i in range(16)})
    regs = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        r = {}
        for h, row in enumerate((g, g + 8)):
            for w in range(4):
                r[f"${8 + 4 * h + w}"] = words[row, 4 * t + w].item() & 0xFFFFFFFF
            # as the kernel passes them: an int16 of both codes, sign-extended to 32 bits
            sign = 0xFFFF0000 if aq[row, 1] >= 128 else 0
            r[f"${24 + 4 * h}"] = aq[row, 0].item() | (aq[row, 1].item() << 8) | sign
            r[f"${32 + 4 * h}"] = a2[row].item()
        token = g % 4 if four else g
        r["$16"] = x_at + 4 * (64 * min(token, M - 1) + 16 * t)  # as the kernel: tokens >= M read token M - 1
        r["$17"] = zeros_at  # (read by the four-column PTX only)
        r["$40"] = q.offset.item()
        for i in range(8):
            r[f"${48 + i}"] = 0.0
        regs.append(r)
    _Warp(regs, smem, gmem, dtype).run(T.kernel_constexprs(dtype, alu, four, dp4a)["ASM"])
    y = torch.zeros(M, 16)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for h, row in enumerate((g, g + 8)):
            for w in range(2):
                tok = 2 * (t % 2) + w if four else 2 * t + w
                if tok < M:
                    y[tok, row] += regs[lane][f"${4 * h + w}"]
    return y


@pytest.mark.parametrize("alu,dp4a", [(0, False), (3, False), (16, False), (0, True), (3, True)])
@pytest.mark.parametrize("dtype,m,four", [(torch.bfloat16, 1, False), (torch.bfloat16, 3, False),
                                          (torch.float16, 8, False), (torch.bfloat16, 1, True),
                                          (torch.bfloat16, 3, True), (torch.float16, 4, True)])
def test_kernel_ptx_on_one_warp_matches_reference(dtype, m, four, alu, dp4a):
    q, x = _case(16, 128, m, dtype, seed=m)
    want = K.nf4_matmul_reference(x, q)
    got = _ptx_span(q, x, alu, four, dp4a)
    assert _rel(got, want) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert _rel(got, T.emulate(x, q, torch.float32, four)) < 1e-5  # the same arithmetic, up to summation order


def test_four_column_ptx_halves_the_mmas_and_drops_the_selects():
    eight, four = (T.kernel_constexprs(torch.bfloat16, 0, f)["ASM"] for f in (False, True))
    assert eight.count("mma.sync") == 16 and four.count("mma.sync") == 8
    assert eight.count("selp.b32") == 32 and four.count("selp.b32") == 0
    assert T.takes_four(4) and not T.takes_four(5) and not T.takes_four(1, {"FOUR": False})


def test_four_column_ptx_fails_with_the_other_groups_x_not_zeroed():
    """The zeros matter: lanes of the other group reading real x instead break the result."""
    q, x = _case(16, 128, 2, torch.bfloat16, seed=7)
    want = K.nf4_matmul_reference(x, q)
    assert _rel(_ptx_span(q, x, 0, True), want) < 1e-2
    real = _ptx_span.__globals__["_Warp"]

    class NoZeros(real):  # the zero buffer holds x's first words instead of zeros
        def __init__(self, regs, smem, gmem, dtype):
            for i in range(16):
                gmem[(1 << 24) + 4 * i] = gmem[(1 << 20) + 4 * i]
            super().__init__(regs, smem, gmem, dtype)

    _ptx_span.__globals__["_Warp"] = NoZeros
    try:
        assert _rel(_ptx_span(q, x, 0, True), want) > 0.05
    finally:
        _ptx_span.__globals__["_Warp"] = real


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_register_lookup_gives_the_pair_table_for_every_byte_pair(dtype):
    """_alu_pair's PTX (no shared memory) against the shared table, for all 65536 byte pairs in both
    halves of a word: the same registers bit for bit."""
    table = K.nf4_half_pairs("cpu", dtype).tolist()
    pairs = list(range(1 << 16))
    for shift in (0, 16):
        regs = [{"w": p << shift | (0xA5A5 << (16 - shift))} for p in pairs]  # the other half: noise
        warp = _Warp(regs, {}, {}, dtype)
        for stmt in T._alu_pair(dtype, "w", shift, "lo", "hi"):
            op, rest = stmt.rstrip(";").split(None, 1)
            args = [a.strip() for a in rest.split(",")]
            for lane in range(len(regs)):
                warp.step(lane, op, args)
        for p, r in zip(pairs, regs):
            assert r["lo"] == table[p & 0xFF] & 0xFFFFFFFF and r["hi"] == table[p >> 8] & 0xFFFFFFFF


def test_alu_units_refuse_counts_out_of_range():
    assert len(set(T.alu_units(16))) == 16 and T.alu_units(0) == []
    with pytest.raises(ValueError, match="ALU"):
        T.alu_units(17)


def test_ptx_interpreter_catches_a_wrong_byte_mapping():
    """The one-warp check can fail: swapping the two bytes of each MMA's k slots breaks it."""
    q, x = _case(16, 128, 2, torch.bfloat16, seed=5)
    good = T.ASM[torch.bfloat16]
    T.ASM[torch.bfloat16] = good.replace("0x4440; mad.lo.u32 t, t, 128", "0x4441; mad.lo.u32 t, t, 128X").replace(
        "0x4441; mad.lo.u32 t, t, 128,", "0x4440; mad.lo.u32 t, t, 128,").replace("128X", "128")
    try:
        assert _rel(_ptx_span(q, x), K.nf4_matmul_reference(x, q)) > 0.05
    finally:
        T.ASM[torch.bfloat16] = good


# ----------------------------------------------------------------------------------------------
# Build for sm_90 (CPU) and the kernel itself (GPU)
# ----------------------------------------------------------------------------------------------

_BUILD = r'''
import torch
import kernels.nf4_tc as T
sig = dict(x_ptr="*bf16", w_ptr="*u8", absmax_ptr="*u8", absmax2_ptr="*fp32", code2_ptr="*fp32",
           offset_ptr="*fp32", pairs_ptr="*i32", y_ptr="*fp32", zeros_ptr="*i32", M="i32", N="i32", K="i32",
           ITEMS_PER_PROGRAM="i32")
pointers = [n for n in sig if n.endswith("ptr")]
for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
    # (the last build: no register lookups, prmt + mad addresses)
    for W, REP, cap, even, pdl, four, alu, dp4a, split in (
            (4, 2, 128, True, True, True, None, None, True), (4, 2, 128, True, True, False, None, None, False),
            (4, 2, 128, False, False, True, 3, True, True), (8, 1, None, True, False, False, 0, False, False)):
        consts = dict(T.kernel_constexprs(dtype, alu, four, dp4a), **T.PDL_PTX, W=W, REP=REP, EVEN_N=even, PDL=pdl,
                      EARLY=pdl, SPLIT=split, num_warps=W)
        k, u = sm90_compile(T._nf4_tc_kernel, dict(sig, x_ptr=ty), consts, pointers, num_warps=W, maxnreg=cap)
        print("RESULT", W, REP, int(pdl), int(four), k.metadata.shared, u["REG"], u["STACK"], u["LOCAL"],
              "mma" in k.asm["ptx"], k.asm["ptx"].count("mma.sync"), k.asm["ptx"].count("griddepcontrol."))
'''


def test_kernel_builds_for_sm90_with_only_its_tables_in_shared_memory():
    out = run_child(_BUILD)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 8
    for w, rep, pdl, four, shared, reg, stack, local, has_mma, n_mma, gdc in rows:
        assert int(gdc) == 2 * int(pdl)  # PDL builds: one launch_dependents, one wait
        assert int(shared) == T.SHARED_BYTES  # the PTX reads the tables at offset 0: nothing else there
        assert int(stack) == 0 and int(local) == 0 and int(reg) <= 255  # no spills
        # 16 MMAs per row tile and span (8 with four columns)
        assert has_mma == "True" and int(n_mma) == (8 if four == "1" else 16) * int(rep)


def test_plan_balances_items_in_one_wave():
    for split in (True, False):
        programs, per, meta = T.plan(14336, 4096, 132, dict(SPLIT=split))
        items = (14336 // 128) * 32  # either way an item is 8 KB: 128 rows x 1 span, or 32 rows x 4 spans
        assert programs <= 4 * 132 and programs * per >= items and (programs - 1) * per < items
        assert meta == dict(W=4, REP=2, EVEN_N=True, PDL=T.DEFAULT_CONFIG["PDL"], EARLY=T.DEFAULT_CONFIG["EARLY"],
                            SPLIT=split, num_warps=4, maxnreg=128)
    assert T.plan(14336, 4096, 132)[2]["SPLIT"] == T.DEFAULT_CONFIG["SPLIT"]
    assert not T.plan(14336 - 3, 4096, 132)[2]["EVEN_N"]  # rows past N in the last tile
    assert T.plan(14336 - 32, 4096, 132, dict(SPLIT=True))[2]["EVEN_N"]  # split tiles are 32 rows
    assert not T.plan(14336, 640, 132, dict(SPLIT=True))[2]["SPLIT"]  # 5 spans do not split over 4 warps
    assert "maxnreg" not in T.plan(14336, 4096, 132, dict(MAXNREG=None))[2]
    programs, per, _ = T.plan(16, 128, 132)  # fewer items than programs: one item each
    assert (programs, per) == (1, 1)


@pytest.mark.parametrize("n", [1, 1000, 3 * 14336])
def test_cast_and_zero_kernel(n):
    """The launch after the GEMV (Triton interpreter): y gets the sums in its dtype, the sums
    buffer is left at zero for the next call."""
    acc = torch.randn(n, device=DEV)
    want = acc.to(torch.float16)
    y = torch.empty(n, dtype=torch.float16, device=DEV)
    T._cast_and_zero_kernel[(-(-n // 1024),)](acc, y, n, BLOCK=1024)
    assert torch.equal(y, want) and not acc.any()


def test_a_failed_launch_leaves_the_resident_sums_at_zero(monkeypatch):
    """If the GEMV launch (or anything before the cast launch) fails or is interrupted, the
    resident buffer must not keep partial sums that the next call would add onto."""
    q, x = _case(16, 128, 1, torch.bfloat16)
    dirty = torch.ones(16)

    class FailingLaunch:
        def __getitem__(self, grid):
            raise RuntimeError("launch failed")

    monkeypatch.setattr(T, "resident_sums", lambda device, n: dirty)
    monkeypatch.setattr(T, "_num_sms", lambda device: 4)
    monkeypatch.setattr(T, "_nf4_tc_kernel", FailingLaunch())
    with pytest.raises(RuntimeError, match="launch failed"):
        T.launch(x, q)
    assert not dirty.any()


def test_dispatch_rule():
    assert T.preferred_shape(1, 4096, 4096) and T.preferred_shape(1, 1024, 4096)
    assert T.preferred_shape(1, 4096, 14336) and T.preferred_shape(1, 14336, 4096)
    assert all(T.preferred_shape(m, 1024, 4096) for m in range(2, 9))
    assert not T.preferred_shape(9, 4096, 4096) and not T.preferred_shape(3, 4096, 4160)  # K % 128


def test_cpu_input_is_refused_with_a_clear_error():
    q, x = _case(16, 128, 1, torch.bfloat16)
    with pytest.raises(ValueError, match="nf4_gemv_tc needs CUDA"):
        T.nf4_gemv_tc(x, q)
    assert not T.supported(x, q)
    with pytest.raises(ValueError, match="expected a 2-D input with 128 columns"):  # the wrong K
        T.nf4_gemv_tc(x[:, :64], q)


if torch.cuda.is_available():  # the kernel itself: GPU only (Gluon has no interpreter)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("n,k", [(48, 128), (33, 256), (1000, 640), (200, 384), (4096, 4096), (1000, 2048),
                                     (37, 512)])
    def test_kernel_matches_reference(n, k, dtype):
        for m in (1, 2, 3, 5, 8):
            q, x = _case(n, k, m, dtype, seed=m)
            q, x = q.to("cuda"), x.to("cuda")
            want = K.nf4_matmul_reference(x, q)
            for config in (None, dict(WAVES=1), dict(W=8, REP=1), dict(WAVES=16), dict(W=4, REP=1, MAXNREG=96),
                           dict(RESIDENT=False), dict(PDL=not T.DEFAULT_CONFIG["PDL"]),
                           dict(SPLIT=not T.DEFAULT_CONFIG["SPLIT"]), dict(SPLIT=True, W=8, REP=1, MAXNREG=None),
                           dict(SPLIT=True, W=2, WAVES=1)):
                got = T.nf4_gemv_tc(x, q, config)
                assert got.dtype == dtype and got.shape == (m, n)
                assert _rel(got, want) < 2e-2, config

    def test_graph_replays_give_the_eager_result():
        q, x = _case(1000, 4096, 3, torch.bfloat16)
        q, x = q.to("cuda"), x.to("cuda")
        first = T.nf4_gemv_tc(x, q)
        assert _rel(first, K.nf4_matmul_reference(x, q)) < 2e-2
        for _ in range(3):  # the resident sums buffer is left at zero: no call sees another's sums
            assert _rel(T.nf4_gemv_tc(x, q), first) < 1e-2
        assert not T.resident_sums(x.device, x.shape[0] * q.shape[0]).any()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            y = T.nf4_gemv_tc(x, q)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(y, first) < 1e-2

    @pytest.mark.parametrize("pdl", [True, False])
    def test_chained_calls_read_the_previous_call_output(pdl):
        """Each call's x is the previous call's output, as in a decode step: with programmatic dependent
        launch the next kernel starts early and must still wait for it, eagerly and in a graph."""
        qs = [_case(512, 512, 3, torch.bfloat16, seed=i)[0].to("cuda") for i in range(4)]
        x = _case(512, 512, 3, torch.bfloat16, seed=9)[1].to("cuda")

        def chain(fn):
            y = x
            for q in qs:
                y = fn(y, q)  # W ~ 0.05 N(0, 1) over 512 columns: y stays ~N(0, 1)
            return y

        want = chain(lambda y, q: K.nf4_matmul_reference(y, q))
        assert _rel(chain(lambda y, q: T.nf4_gemv_tc(y, q, dict(PDL=pdl))), want) < 5e-2
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            got = chain(lambda y, q: T.nf4_gemv_tc(y, q, dict(PDL=pdl)))
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(got, want) < 5e-2

    def test_nf4_gemv_dispatches_to_the_tensor_cores_where_measured_faster():
        q, x = _case(256, 1024, 3, torch.bfloat16)
        q, x = q.to("cuda"), x.to("cuda")
        calls = []
        real = T.launch
        T.launch = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        try:
            y = K.nf4_gemv(x, q)
        finally:
            T.launch = real
        assert _rel(y, K.nf4_matmul_reference(x, q)) < 2e-2
        assert calls == ([1] if torch.cuda.get_device_capability() == (9, 0) else [])

    def test_misaligned_x_is_copied_and_misaligned_codes_are_refused():
        q, x = _case(256, 1024, 3, torch.bfloat16)
        q, x = q.to("cuda"), x.to("cuda")
        buf = torch.empty(x.numel() + 1, device="cuda", dtype=x.dtype)
        odd = buf[1:].view_as(x).copy_(x)  # contiguous, 2 bytes past a 4-byte boundary
        assert odd.data_ptr() % 4
        assert _rel(T.nf4_gemv_tc(odd, q), K.nf4_matmul_reference(x, q)) < 2e-2
        raw = torch.empty(q.packed.numel() + 1, device="cuda", dtype=torch.uint8)
        shifted = K.NF4Tensor(raw[1:].copy_(q.packed), *q.fields()[1:], shape=q.shape, dtype=q.dtype)
        assert not T.supported(x, shifted)  # the kernel's word loads need 4-byte alignment
