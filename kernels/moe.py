"""Fused Mixtral MoE decode over NF4 experts: a few tokens, every touched expert read once, no sync.

Decoding pushes T <= 64 / top_k tokens through a sparse MoE block: P = T * top_k (token, slot)
pairs, each routed to one of E experts. The PyTorch loop (models/moe.py) needs the routing on the
host (a sync) and three launches per expert; here two launches serve all experts, with a grid
that covers every expert and programs whose expert nobody picked exit at once:

  kernel A  _moe_gate_up_kernel  grid (E, cdiv(I, BLOCK_N))
            h[p] = silu(x[p // top_k] w1_e^T) * (x[p // top_k] w3_e^T)    for the pairs p routed to e
            The w1 and w3 tiles of expert e are dequantized in registers and read once for all of
            its pairs; x rows are gathered by token, never copied per pair.         -> h (P, I)
  kernel B  _moe_down_kernel     grid (E, cdiv(C, BLOCK_N), SPLIT_K)
            y[s, p] = weight[p] * h[p, K-slice s] w2_e[:, K-slice s]^T (fp32)        -> y (S, P, C)
  combine   out[t] = sum over s and k of y[s, t * top_k + k]       (one static-shape torch sum)

Choices, and why:
  - Experts are addressed through per-expert pointer tables, not stacked copies: a (5, E) int64
    table of data_ptrs per projection, rows packed, absmax, absmax2, code2, offset (the
    per-tensor NF4 fields), so each expert keeps its own double-quant offset and nothing is duplicated
    (Mixtral's experts are ~24 GB in NF4; a stacked copy would not fit beside training). The
    table is built once per layer (`NF4Experts.build`) and holds references to the tensors, so the
    pointers stay valid. Kernels turn an entry into a pointer with `.to(tl.pointer_type(...))` and
    tell the compiler packed rows are 16-byte aligned (checked on the host) so loads vectorize.
  - The routing weight is applied in kernel B's epilogue; the sum over top_k slots (and split-K
    slices) is a plain torch reduction of fp32 partials, not atomics: the result is
    deterministic, so a CUDA-graph replay and an eager step give the same bits.
  - Pairs are padded to BLOCK_P = 16, 32 or 64 rows of the MMA's N side; rows of pairs routed
    elsewhere load as zeros and are never stored. The weight tile is the A operand (BLOCK_N rows).
  - Dequantization, chosen per launch (constexpr DEQUANT):
      0  `kernels.nf4.nf4_dequant_tile`: fp32 tile, any K, any dtype (fp32 x; K % 64 != 0); its
         lookup table is the one `NF4Tensor.tensors()` hands to kernels.
      1  byte-pair table (256 x int32, both values of a byte in x's dtype): one gather per byte;
         the absmax scales each 64-column partial product (nf4_gemv's decode path does the same).
      2  nibble table: 16 NF4 values in x's dtype, one gather per element from a 32-byte table
         (one L1 sector, where the 1 KB pair table spreads a warp's gather over 8 lines).
    1 and 2 round the weight as NF4 value -> x.dtype, then scale in fp32 (error of the same size
    as rounding the dequantized weight); they need 16-bit x and K % 64 == 0.

For T <= 4 tokens `moe_decode` takes two CUDA-core "row kernels" instead (see their section), and
`moe_route` replaces the router's ~7 launches (gate GEMV, softmax, top-k, renormalization) with one.
While decoding, `add_rms_norm_route` also folds the RMSNorm before the block (kernels.norm's row)
and kernels/moe_tc.py's plan into that launch (models.moe.SparseMoE.add_norm_route).

Each launcher has a pure-PyTorch reference (`moe_gate_up_reference`, `moe_down_reference`,
`moe_decode_reference`; `models.moe.route` for `moe_route`). Entry point:
`moe_decode(x, weights, experts, nf4_experts)`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import moe_tc
from kernels.norm import add_rms_norm_row, norm_fits
from kernels.nf4 import (BLOCKSIZE, NF4_VALUES, NF4Tensor, _dot_precision, _nf4_nibble_table, _num_sms,
                         dequantize_nf4_reference, nf4_absmax, nf4_dequant_tile, nf4_half_pairs, nf4_rows_loop)

MAX_PAIRS = 64  # (token, slot) pairs one launch serves: BLOCK_P <= 64 rows of the MMA
_FIELDS = {"packed": torch.uint8, "absmax": torch.uint8, "absmax2": torch.float32, "code2": torch.float32,
           "offset": torch.float32}  # pointer-table rows (the per-tensor NF4 fields) and their dtypes


# ----------------------------------------------------------------------------------------------
# Expert weights as pointer tables
# ----------------------------------------------------------------------------------------------


@dataclass
class NF4Experts:
    """E SwiGLU experts in NF4: w1, w3 (I, C) and w2 (C, I), addressed by pointer tables.

    table13 (2, 5, E) int64 holds the data_ptrs of w1's and w3's per-tensor fields (packed, absmax,
    absmax2, code2, offset), table2 (5, E) those of w2; the NF4Tensor lists keep that memory alive
    for as long as the tables are used.
    """

    w1: list[NF4Tensor]
    w3: list[NF4Tensor]
    w2: list[NF4Tensor]
    table13: torch.Tensor
    table2: torch.Tensor
    packed_aligned: bool  # every packed buffer starts on 16 bytes (the kernels' load hint)
    code2_shared: bool = True  # every expert has w1[0]'s code2 (kernels/moe_tc.py keeps one copy)
    absmax_aligned: bool = True  # every absmax buffer starts on 2 bytes (moe_tc reads codes in pairs)

    @property
    def num_experts(self) -> int:
        return len(self.w1)

    @property
    def hidden(self) -> int:
        return self.w1[0].shape[1]

    @property
    def intermediate(self) -> int:
        return self.w1[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.table2.device

    def expert_nbytes(self) -> int:
        """NF4 bytes one expert's three weights occupy (codes, absmax codes, nested absmax)."""
        q = (self.w1[0], self.w3[0], self.w2[0])
        return sum(t.packed.numel() + t.absmax.numel() + 4 * t.absmax2.numel() for t in q)

    @classmethod
    def build(cls, w1: list[NF4Tensor], w3: list[NF4Tensor], w2: list[NF4Tensor]) -> "NF4Experts":
        """Pointer tables over the experts' own buffers (host work only, one small copy)."""
        E = len(w1)
        if E == 0 or len(w3) != E or len(w2) != E:
            raise ValueError(f"NF4Experts: need the same number (> 0) of w1, w3, w2, got {len(w1)}, {len(w3)}, {len(w2)}")
        I, C = w1[0].shape
        device = w1[0].device
        for name, qs, shape in (("w1", w1, (I, C)), ("w3", w3, (I, C)), ("w2", w2, (C, I))):
            for e, q in enumerate(qs):
                if tuple(q.shape) != shape:
                    raise ValueError(f"NF4Experts: {name} of expert {e} has shape {tuple(q.shape)}, expected {shape}")
                for field, dtype in _FIELDS.items():
                    t = getattr(q, field)
                    if t.device != device or t.dtype != dtype or not t.is_contiguous():
                        raise ValueError(f"NF4Experts: {name}.{field} of expert {e} is {t.dtype} on {t.device}"
                                         f"{'' if t.is_contiguous() else ', strided'}; the kernels need "
                                         f"contiguous {dtype} on {device}")
                if q.packed.data_ptr() % 4:  # the row kernels read the codes as int32 words
                    raise ValueError(f"NF4Experts: {name}.packed of expert {e} does not start on a 4-byte boundary "
                                     "(a view at an odd offset?); store each expert's codes in its own tensor "
                                     "(.clone())")

        def table(qs):  # (5, E)
            return [[getattr(q, field).data_ptr() for q in qs] for field in _FIELDS]

        ptrs13 = torch.tensor([table(w1), table(w3)], dtype=torch.int64)
        ptrs2 = torch.tensor(table(w2), dtype=torch.int64)
        aligned = all(q.packed.data_ptr() % 16 == 0 for q in (*w1, *w3, *w2))
        shared = bool(torch.stack([q.code2 for q in (*w1, *w3, *w2)]).eq(w1[0].code2).all())  # one sync
        absmax_aligned = all(q.absmax.data_ptr() % 2 == 0 for q in (*w1, *w3, *w2))
        return cls(list(w1), list(w3), list(w2), ptrs13.to(device), ptrs2.to(device), aligned, shared,
                   absmax_aligned)


@triton.jit
def _expert_fields(table_ptr, e, E, PACKED_ALIGNED: tl.constexpr):
    """Expert e's NF4 pointers (packed, absmax, absmax2, code2, offset) from a (5, E) table."""
    packed = tl.load(table_ptr + e).to(tl.pointer_type(tl.uint8))
    if PACKED_ALIGNED:
        packed = tl.multiple_of(packed, 16)
    absmax = tl.load(table_ptr + E + e).to(tl.pointer_type(tl.uint8))
    absmax2 = tl.load(table_ptr + 2 * E + e).to(tl.pointer_type(tl.float32))
    code2 = tl.load(table_ptr + 3 * E + e).to(tl.pointer_type(tl.float32))
    offset = tl.load(table_ptr + 4 * E + e).to(tl.pointer_type(tl.float32))
    return packed, absmax, absmax2, code2, offset


# ----------------------------------------------------------------------------------------------
# Shared device helper: one expert's weight tile times the gathered activations
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_dot(acc, at, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, lut_ptr, offs_n, k0, N, K,
               BLOCK_N: tl.constexpr, DEQUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_N, BLOCK_P) += W[offs_n, k0:k0+64] @ at for one expert; at (64, BLOCK_P) holds the
    routed pairs' activations of those 64 columns (zeros elsewhere). lut_ptr: the DEQUANT mode's
    table (nf4_dequant_tile's, the byte-pair or the nibble table)."""
    if DEQUANT == 0:
        w = nf4_dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, lut_ptr,
                             offs_n, k0, N, K, BLOCK_N, 64, K % 64 == 0)  # (BN, 64) fp32
        acc = tl.dot(w.to(at.dtype), at, acc=acc, input_precision=DOT_PRECISION)
    else:  # (an if/else, not an early return: Triton would still compile the code after it)
        # K % 64 == 0: one whole quant block per row, so no mask along K and one absmax per row.
        rows = offs_n.to(tl.int64)
        n_mask = offs_n < N
        offs_b = k0 // 2 + tl.arange(0, 32)
        packed = tl.load(w_ptr + rows[:, None] * (K // 2) + offs_b[None, :], mask=n_mask[:, None],
                         other=0x77)  # (BN, 32) uint8, two codes each
        if DEQUANT == 1:
            pairs = tl.load(lut_ptr + packed.to(tl.int32))  # (BN, 32) int32 = (second << 16) | first
            first = pairs.to(tl.int16).to(at.dtype, bitcast=True)
            second = (pairs >> 16).to(tl.int16).to(at.dtype, bitcast=True)
        else:
            first = tl.load(lut_ptr + (packed >> 4).to(tl.int32))  # (BN, 32) in at.dtype
            second = tl.load(lut_ptr + (packed & 0xF).to(tl.int32))
        codes = tl.reshape(tl.join(first, second), (BLOCK_N, 64))  # element 2j is the high nibble
        scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows * (K // 64) + k0 // 64, n_mask)
        acc += tl.dot(codes, at, input_precision=DOT_PRECISION) * scale[:, None]
    return acc


@triton.jit
def _activations(rows_ptr, routed, k0, K):
    """(64, BLOCK_P) columns k0:k0+64 of each routed pair's activation row (zeros for the others)."""
    offs_k = k0 + tl.arange(0, 64)
    return tl.load(rows_ptr[None, :] + offs_k[:, None], mask=routed[None, :] & (offs_k[:, None] < K), other=0.0)


@triton.jit
def _routed_pairs(expert_ptr, e, P, BLOCK_P: tl.constexpr):
    """(BLOCK_P,) pair indices, which of them expert e serves, and how many."""
    offs_p = tl.arange(0, BLOCK_P)
    ex = tl.load(expert_ptr + offs_p, mask=offs_p < P, other=-1)
    routed = ex == e
    return offs_p, routed, tl.sum(routed.to(tl.int32), axis=0)


# ----------------------------------------------------------------------------------------------
# Kernel A: h = silu(x w1^T) * (x w3^T) per pair
# ----------------------------------------------------------------------------------------------


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, expert_ptr, table_ptr, lut_ptr, h_ptr, P, E, stride_x,
    N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DEQUANT: tl.constexpr, PACKED_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # N = I (output features), K = C (hidden). Program (e, n-tile): expert e's rows offs_n of w1, w3.
    e = tl.program_id(0)
    offs_p, routed, n_routed = _routed_pairs(expert_ptr, e, P, BLOCK_P)
    if n_routed > 0:  # the experts nobody picked cost one tiny load
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        x_rows = x_ptr + (offs_p // TOP_K).to(tl.int64) * stride_x  # (BP,) each pair's token row
        w1p, w1a, w1a2, w1c2, w1o = _expert_fields(table_ptr, e, E, PACKED_ALIGNED)
        w3p, w3a, w3a2, w3c2, w3o = _expert_fields(table_ptr + 5 * E, e, E, PACKED_ALIGNED)
        acc1 = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            for g in tl.static_range(BLOCK_K // 64):
                k0 = k_start + g * 64
                xt = _activations(x_rows, routed, k0, K)  # (64, BP), shared by w1 and w3
                acc1 = _group_dot(acc1, xt, w1p, w1a, w1a2, w1c2, w1o, lut_ptr, offs_n, k0, N, K,
                                  BLOCK_N, DEQUANT, DOT_PRECISION)
                acc3 = _group_dot(acc3, xt, w3p, w3a, w3a2, w3c2, w3o, lut_ptr, offs_n, k0, N, K,
                                  BLOCK_N, DEQUANT, DOT_PRECISION)
        h = acc1 * tl.sigmoid(acc1) * acc3  # (BN, BP) fp32: silu(gate) * up
        h_tile = h_ptr + offs_p.to(tl.int64)[None, :] * N + offs_n[:, None]  # h is (P, N), transposed view
        tl.store(h_tile, h.to(h_ptr.dtype.element_ty), mask=routed[None, :] & (offs_n[:, None] < N))


# ----------------------------------------------------------------------------------------------
# Kernel B: y = weight * h w2^T per pair, split over K
# ----------------------------------------------------------------------------------------------


@triton.jit
def _moe_down_kernel(
    h_ptr, expert_ptr, weight_ptr, table_ptr, lut_ptr, y_ptr, P, E,
    N: tl.constexpr, K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DEQUANT: tl.constexpr, PACKED_ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # N = C (hidden), K = I. Program (e, n-tile, s): expert e's rows offs_n of w2 over K slice s.
    e = tl.program_id(0)
    offs_p, routed, n_routed = _routed_pairs(expert_ptr, e, P, BLOCK_P)
    if n_routed > 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        h_rows = h_ptr + offs_p.to(tl.int64) * K  # (BP,) each pair's own row of h
        wp, wa, wa2, wc2, wo = _expert_fields(table_ptr, e, E, PACKED_ALIGNED)
        acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        k_lo = split * K_PER_SPLIT
        for k_start in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
            for g in tl.static_range(BLOCK_K // 64):
                k0 = k_start + g * 64
                ht = _activations(h_rows, routed, k0, K)  # (64, BP)
                acc = _group_dot(acc, ht, wp, wa, wa2, wc2, wo, lut_ptr, offs_n, k0, N, K,
                                 BLOCK_N, DEQUANT, DOT_PRECISION)
        wgt = tl.load(weight_ptr + offs_p, mask=routed, other=0.0).to(tl.float32)  # (BP,) routing weights
        y_tile = y_ptr + (split * P + offs_p).to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(y_tile, acc * wgt[None, :], mask=routed[None, :] & (offs_n[:, None] < N))


# ----------------------------------------------------------------------------------------------
# Few tokens (T <= 4): the CUDA-core decode loop of kernels.nf4 (nf4_gemv's "fma" kernel) per expert
# ----------------------------------------------------------------------------------------------
# A token's top_k experts are distinct, so an expert serves at most T pairs. For T <= 4 each
# program streams row tiles of one expert's weights once and multiplies them with the 1-4 activation
# rows of its pairs on the CUDA cores (a shift, a mask, a shared-memory lookup and one FMA per
# weight element and row), instead of padding the pairs to 16 MMA columns with a wgmma wait per
# 64-column group. The number of rows is a runtime branch, so an expert with one pair pays for one.
#
#   kernel A' _moe_gate_up_rows_kernel  grid (E, cdiv(I, BLOCK_N)): the same rows of w1 and w3
#             h[p, n] = silu(x_t w1_e[n]^T) * (x_t w3_e[n]^T), rounded to x.dtype, stored as fp32
#   kernel B' _moe_down_rows_kernel     grid (E, cdiv(C, BLOCK_N))
#             y[p] = weight[p] * h[p] w2_e^T  -> y (1, P, C) fp32
# h is rounded to x.dtype as the MMA path stores it, but kept in fp32 words: kernel B' then loads
# its activations with no conversion (every program of B' re-reads them from L2).


@triton.jit
def _pair_index(offs_p, routed, rank, i):
    """Index of the i-th pair routed to this expert (0 if there is none)."""
    return tl.sum(tl.where(routed & (rank == i), offs_p, 0), axis=0)


@triton.jit
def _row_sums(wp, wa, wa2, wc2, wo, table, src0, src1, src2, src3, offs_n, n_mask, K,
              M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
              X_AHEAD: tl.constexpr):
    """(BN,) fp32 products of rows offs_n of one NF4 weight (K columns) with the M source rows."""
    acc0, acc1, acc2, acc3 = nf4_rows_loop(wp, wa, wa2, wc2, wo, table, src0, src1, src2, src3, offs_n, n_mask,
                                           0, K, K, M, BLOCK_N, BLOCK_K, EVEN_N, True, 4, X_AHEAD)
    return tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1)


@triton.jit
def _swiglu(g, u, DTYPE: tl.constexpr):
    """silu(g) * u rounded to DTYPE, as fp32."""
    return (g * tl.sigmoid(g) * u).to(DTYPE).to(tl.float32)


@triton.jit
def _pair_rows(base, p0, p1, p2, p3, div, stride):
    """Row pointers base + (p_i // div) * stride of the four pairs (div = top_k: their tokens' rows)."""
    return (base + (p0 // div).to(tl.int64) * stride, base + (p1 // div).to(tl.int64) * stride,
            base + (p2 // div).to(tl.int64) * stride, base + (p3 // div).to(tl.int64) * stride)


@triton.jit
def _store_pairs(out_ptr, stride_p, offs_n, n_mask, v0, v1, v2, v3, p0, p1, p2, p3, M: tl.constexpr):
    """out[p_i, offs_n] = v_i (BN,) for the first M of the four pairs."""
    tl.store(out_ptr + p0.to(tl.int64) * stride_p + offs_n, v0, mask=n_mask)
    if M > 1:
        tl.store(out_ptr + p1.to(tl.int64) * stride_p + offs_n, v1, mask=n_mask)
    if M > 2:
        tl.store(out_ptr + p2.to(tl.int64) * stride_p + offs_n, v2, mask=n_mask)
    if M > 3:
        tl.store(out_ptr + p3.to(tl.int64) * stride_p + offs_n, v3, mask=n_mask)


@triton.jit
def _first_pairs(expert_ptr, e, P, BLOCK_P: tl.constexpr):
    """How many pairs are routed to expert e, and the indices of the first four (0 past the count)."""
    offs_p = tl.arange(0, BLOCK_P)
    routed = tl.load(expert_ptr + offs_p, mask=offs_p < P, other=-1) == e
    rank = tl.cumsum(routed.to(tl.int32), axis=0) - 1
    return (tl.sum(routed.to(tl.int32), axis=0), _pair_index(offs_p, routed, rank, 0),
            _pair_index(offs_p, routed, rank, 1), _pair_index(offs_p, routed, rank, 2),
            _pair_index(offs_p, routed, rank, 3))


@triton.jit
def _moe_gate_up_rows_kernel(
    x_ptr, expert_ptr, table_ptr, pairs_ptr, h_ptr, P, E, stride_x,
    I: tl.constexpr, C: tl.constexpr, TOP_K: tl.constexpr, MAX_ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_ALIGNED: tl.constexpr, DTYPE: tl.constexpr,
    X_AHEAD: tl.constexpr,
):
    # Program (e, n-tile): rows offs_n of w1_e and of w3_e for the pairs routed to e; pair p's
    # activations are token p // TOP_K.
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    n, p0, p1, p2, p3 = _first_pairs(expert_ptr, e, P, BLOCK_P)
    if n > 0:
        w1p, w1a, w1a2, w1c2, w1o = _expert_fields(table_ptr, e, E, PACKED_ALIGNED)
        w3p, w3a, w3a2, w3c2, w3o = _expert_fields(table_ptr + 5 * E, e, E, PACKED_ALIGNED)
        table = _nf4_nibble_table(pairs_ptr)
        x0, x1, x2, x3 = _pair_rows(x_ptr, p0, p1, p2, p3, TOP_K, stride_x)
        for m in tl.static_range(1, MAX_ROWS + 1):  # one compiled pair of loops per pair count
            if n == m:
                g0, g1, g2, g3 = _row_sums(w1p, w1a, w1a2, w1c2, w1o, table, x0, x1, x2, x3, offs_n, n_mask, C,
                                           m, BLOCK_N, BLOCK_K, I % BLOCK_N == 0, X_AHEAD)
                u0, u1, u2, u3 = _row_sums(w3p, w3a, w3a2, w3c2, w3o, table, x0, x1, x2, x3, offs_n, n_mask, C,
                                           m, BLOCK_N, BLOCK_K, I % BLOCK_N == 0, X_AHEAD)
                _store_pairs(h_ptr, I, offs_n, n_mask, _swiglu(g0, u0, DTYPE), _swiglu(g1, u1, DTYPE),
                             _swiglu(g2, u2, DTYPE), _swiglu(g3, u3, DTYPE), p0, p1, p2, p3, m)


@triton.jit
def _moe_down_rows_kernel(
    h_ptr, expert_ptr, weight_ptr, table_ptr, pairs_ptr, y_ptr, P, E,
    I: tl.constexpr, C: tl.constexpr, MAX_ROWS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PACKED_ALIGNED: tl.constexpr, X_AHEAD: tl.constexpr,
):
    # Program (e, n-tile): rows offs_n of w2_e (C x I) for the pairs routed to e, weighted.
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    n, p0, p1, p2, p3 = _first_pairs(expert_ptr, e, P, BLOCK_P)
    if n > 0:
        wp, wa, wa2, wc2, wo = _expert_fields(table_ptr, e, E, PACKED_ALIGNED)
        table = _nf4_nibble_table(pairs_ptr)
        h0, h1, h2, h3 = _pair_rows(h_ptr, p0, p1, p2, p3, 1, I)
        for m in tl.static_range(1, MAX_ROWS + 1):
            if n == m:
                y0, y1, y2, y3 = _row_sums(wp, wa, wa2, wc2, wo, table, h0, h1, h2, h3, offs_n, n_mask, I,
                                           m, BLOCK_N, BLOCK_K, C % BLOCK_N == 0, X_AHEAD)
                # routing weights (pairs past m read pair 0's weight; those rows are not stored)
                s0, s1, s2, s3 = (tl.load(weight_ptr + p0).to(tl.float32), tl.load(weight_ptr + p1).to(tl.float32),
                                  tl.load(weight_ptr + p2).to(tl.float32), tl.load(weight_ptr + p3).to(tl.float32))
                _store_pairs(y_ptr, C, offs_n, n_mask, y0 * s0, y1 * s1, y2 * s2, y3 * s3, p0, p1, p2, p3, m)


ROWS_MAX_TOKENS = 4  # moe_decode takes the row kernels up to this many tokens (16-bit x, K % BLOCK_K == 0)


def rows_config() -> dict:
    """Tiles of the row kernels: 16 rows x 512 columns per step, 4 warps (nf4_gemv's fma default).
    X_AHEAD (kernels.nf4.nf4_rows_loop) only for the down projection: ahead of time the w1/w3
    programs would hold more registers (241 vs 168 on sm_90) and lose occupancy. On an H100 at 3
    tokens (6 experts) the pair takes 364 us, against 404 us for the session-2 kernels (separate
    gate and up programs, silu computed by every down program) and 424 us with 8-row down tiles;
    casting x to fp32 first (fewer instructions per element, twice the activation bytes per
    program) measured slower, 378 us (benchmarks/results/ab_session3.json)."""
    return dict(gate_up=dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, X_AHEAD=False),
                down=dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, X_AHEAD=True))


def _rows_ok(x: torch.Tensor, w: "NF4Experts") -> bool:
    """The row kernels' default tiles fit: 16-bit activations, K of both projections % BLOCK_K == 0."""
    c = rows_config()
    return (0 < x.shape[0] <= ROWS_MAX_TOKENS and x.dtype in (torch.float16, torch.bfloat16)
            and w.hidden % c["gate_up"]["BLOCK_K"] == 0 and w.intermediate % c["down"]["BLOCK_K"] == 0)


def moe_decode_rows(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w: "NF4Experts",
                    config: dict | None = None) -> torch.Tensor:
    """moe_decode for T <= 4 tokens through the row kernels: out (T, C) in x.dtype."""
    _check(x, experts, w, "moe_decode_rows")
    T, C = x.shape
    top_k = experts.shape[-1]
    P, I, E = experts.numel(), w.intermediate, w.num_experts
    if C != w.hidden or not 0 < T <= ROWS_MAX_TOKENS or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"moe_decode_rows: x {tuple(x.shape)} must hold 1..{ROWS_MAX_TOKENS} tokens of {w.hidden} "
                         f"features in fp16/bf16 (got {x.dtype})")
    config = config or {}
    ca = dict(rows_config()["gate_up"], **(config.get("gate_up") or {}))
    cb = dict(rows_config()["down"], **(config.get("down") or {}))
    x = x.contiguous()
    ids = experts.reshape(-1).contiguous()
    pairs = w.w1[0].tensors()[5]
    h = torch.empty((P, I), dtype=torch.float32, device=x.device)  # values rounded to x.dtype
    dtype = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
    _moe_gate_up_rows_kernel[(E, triton.cdiv(I, ca["BLOCK_N"]))](
        x, ids, w.table13, pairs, h, P, E, x.stride(0), I=I, C=C, TOP_K=top_k, MAX_ROWS=min(T, 4),
        BLOCK_P=max(2, triton.next_power_of_2(P)), BLOCK_N=ca["BLOCK_N"], BLOCK_K=ca["BLOCK_K"],
        PACKED_ALIGNED=w.packed_aligned, DTYPE=dtype, X_AHEAD=ca["X_AHEAD"], num_warps=ca["num_warps"],
        num_stages=1)
    y = torch.empty((1, P, C), dtype=torch.float32, device=x.device)
    _moe_down_rows_kernel[(E, triton.cdiv(C, cb["BLOCK_N"]))](
        h, ids, weights.reshape(-1).contiguous(), w.table2, pairs, y, P, E, I=I, C=C, MAX_ROWS=min(T, 4),
        BLOCK_P=max(2, triton.next_power_of_2(P)), BLOCK_N=cb["BLOCK_N"], BLOCK_K=cb["BLOCK_K"],
        PACKED_ALIGNED=w.packed_aligned, X_AHEAD=cb["X_AHEAD"], num_warps=cb["num_warps"], num_stages=1)
    return moe_combine(y, top_k, x.dtype)


# ----------------------------------------------------------------------------------------------
# The router for few tokens: logits, softmax, top-k and renormalization in one launch
# ----------------------------------------------------------------------------------------------
# models.moe.route(gate(x)) costs ~7 launches per layer (a split-K cuBLAS GEMV and its reduction,
# softmax, topk's two kernels, the sum, the division, the cast): ~20 us of a decode step's layer.


@triton.jit
def _route_kernel(x_ptr, g_ptr, w_ptr, id_ptr, C, stride_x, E: tl.constexpr, TOP_K: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, DTYPE: tl.constexpr):
    # Program t: token t's E logits (fp32 dot products rounded to DTYPE, as nn.Linear returns them),
    # fp32 softmax, the TOP_K largest in descending order (ties: the lower expert id), weights
    # renormalized over the chosen ones, rounded to DTYPE.
    t = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        xv = tl.load(x_ptr + t * stride_x + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
        gv = tl.load(g_ptr + offs_e[:, None] * C + offs_c[None, :], mask=(offs_e[:, None] < E) & (offs_c[None, :] < C),
                     other=0.0).to(tl.float32)
        acc += gv * xv[None, :]
    _route_top_k(tl.sum(acc, axis=1), offs_e, t, w_ptr, id_ptr, E, TOP_K, DTYPE)


@triton.jit
def _route_top_k(logits, offs_e, t, w_ptr, id_ptr, E: tl.constexpr, TOP_K: tl.constexpr, DTYPE: tl.constexpr):
    """Token t's fp32 router logits (BLOCK_E,) -> rounded to DTYPE, fp32 softmax, the TOP_K largest
    in descending order (ties: the lower expert id) and their weights renormalized, rounded to DTYPE."""
    logits = logits.to(DTYPE).to(tl.float32)
    logits = tl.where(offs_e < E, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    total = 0.0
    left = p
    for i in tl.static_range(TOP_K):  # the chosen probabilities' sum
        total += tl.max(left, axis=0)
        left = tl.where(offs_e == tl.argmax(left, axis=0, tie_break_left=True), -1.0, left)
    left = p
    for i in tl.static_range(TOP_K):
        j = tl.argmax(left, axis=0, tie_break_left=True)
        tl.store(id_ptr + t * TOP_K + i, j.to(tl.int64))
        tl.store(w_ptr + t * TOP_K + i, (tl.max(left, axis=0) / total).to(DTYPE))
        left = tl.where(offs_e == j, -1.0, left)


ROUTE_MAX_TOKENS = 64  # one program per token, each reading the whole gate weight (E x C)
ROUTE_BLOCK_C = 1024  # columns per step: few serial steps (a 256-column step took 9 us for C = 4096)


def moe_route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """models.moe.route(x @ gate_weight^T, top_k, x.dtype) in one launch, for few tokens:
    (T, top_k) weights in x.dtype and (T, top_k) int64 expert ids, largest first. x (T, C) and
    gate_weight (E, C) in fp16/bf16/fp32 (the same dtype)."""
    T, C = x.shape
    E = gate_weight.shape[0]
    if gate_weight.shape != (E, C) or gate_weight.dtype != x.dtype or not 0 < top_k <= E or T > ROUTE_MAX_TOKENS:
        raise ValueError(f"moe_route: x {tuple(x.shape)} {x.dtype}, gate {tuple(gate_weight.shape)} "
                         f"{gate_weight.dtype}, top_k {top_k}: want the same dtype, (E, C) gate, 0 < top_k <= E, "
                         f"T <= {ROUTE_MAX_TOKENS}")
    x = x.contiguous()
    g = gate_weight.contiguous()
    weights = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    if T:
        _route_kernel[(T,)](x, g, weights, ids, C, x.stride(0), E=E, TOP_K=top_k,
                            BLOCK_E=max(2, triton.next_power_of_2(E)), BLOCK_C=ROUTE_BLOCK_C,
                            DTYPE={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(x.dtype, tl.float32),
                            num_warps=8)
    return weights, ids


@triton.jit
def _add_rms_norm_route_kernel(x_ptr, r_ptr, nw_ptr, y_ptr, s_ptr, g_ptr, w_ptr, id_ptr, plan_ptr, count_ptr, T, C,
                               eps, stride_x, stride_r, stride_y, stride_s,
                               E: tl.constexpr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr,
                               DTYPE: tl.constexpr, PLAN: tl.constexpr, BLOCK_P: tl.constexpr, COLS: tl.constexpr):
    # Program t: kernels.norm's row (y = norm(x + residual), s = x + residual), then the router on
    # y as stored: the gate is loaded first, so its memory latency overlaps the norm's. With PLAN,
    # the last program to finish (a counter, acq_rel) also writes moe_tc's plan from every token's ids
    # and puts the counter back to zero.
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    cols = tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs_e[:, None] * C + cols[None, :], mask=(offs_e[:, None] < E) & (cols[None, :] < C),
                other=0.0)  # (BLOCK_E, BLOCK) in the gate's dtype
    y = add_rms_norm_row(x_ptr, r_ptr, nw_ptr, y_ptr, s_ptr, t, C, eps, stride_x, stride_r, stride_y, stride_s,
                         True, BLOCK)  # (BLOCK,) fp32
    _route_top_k(tl.sum(g.to(tl.float32) * y[None, :], axis=1), offs_e, t, w_ptr, id_ptr, E, TOP_K, DTYPE)
    if PLAN:
        tl.debug_barrier()  # this program's ids are stored before its release below
        if tl.atomic_add(count_ptr, 1, sem="acq_rel") == T - 1:
            moe_tc.plan_body(id_ptr, plan_ptr, T * TOP_K, E, BLOCK_P, BLOCK_E, COLS)
            tl.store(count_ptr, 0)


_COUNTERS: dict = {}  # device -> an int32 counter kept at zero between launches


def _counter(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def add_rms_norm_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       gate_weight: torch.Tensor, top_k: int, plan: bool = False):
    """kernels.norm.add_rms_norm(x, residual, norm_weight, eps) followed by moe_route(y, gate_weight,
    top_k) in one launch (decoding: the MoE block's norm and its router) -> (y, x + residual,
    weights, ids, plan), or None where one kernel does not take the inputs (then call the two).
    plan: also write kernels/moe_tc.py's plan of the routed experts (int32 (moe_tc.plan_size(E),));
    else plan is None."""
    T, C = x.shape if x.dim() == 2 else (0, 0)
    E = gate_weight.shape[0]
    y_dtype = torch.promote_types(x.dtype, norm_weight.dtype)
    if (x.dim() != 2 or not norm_fits(x, residual, norm_weight) or residual is None or not 0 < T <= ROUTE_MAX_TOKENS
            or y_dtype != x.dtype or gate_weight.shape != (E, C) or gate_weight.dtype != x.dtype
            or not gate_weight.is_contiguous() or not 0 < top_k <= E or E > 16 or C > 8192
            or x.dtype not in (torch.float16, torch.bfloat16) or (plan and T > moe_tc.MAX_TOKENS)):
        return None
    y, s = torch.empty_like(x), torch.empty_like(x)  # (T, C)
    weights = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    plan_t = torch.empty(moe_tc.plan_size(E), dtype=torch.int32, device=x.device) if plan else None
    BLOCK = triton.next_power_of_2(C)
    _add_rms_norm_route_kernel[(T,)](
        x, residual, norm_weight, y, s, gate_weight, weights, ids, plan_t if plan else ids,
        _counter(x.device) if plan else ids, T, C, eps, x.stride(0), residual.stride(0), y.stride(0), s.stride(0),
        E=E, TOP_K=top_k, BLOCK_E=max(2, triton.next_power_of_2(E)), BLOCK=BLOCK,
        DTYPE=tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16, PLAN=plan,
        BLOCK_P=max(2, triton.next_power_of_2(T * top_k)), COLS=moe_tc.MAX_TOKENS,
        num_warps=16 if BLOCK >= 4096 else max(1, BLOCK // 256), enable_fp_fusion=False)
    return y, s, weights, ids, plan_t


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _nibble_lut(device: str, dtype: torch.dtype) -> torch.Tensor:
    """(16,) the NF4 values in `dtype` (rounded once, as the byte-pair table rounds them)."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32).to(dtype).to(device)


def _block_p(P: int) -> int:
    return max(16, triton.next_power_of_2(P))


def _dequant_mode(dtype: torch.dtype, K: int, requested: int | None) -> int:
    """The fastest decode the inputs allow: tables need 16-bit activations and whole 64-blocks."""
    fast_ok = dtype in (torch.float16, torch.bfloat16) and K % BLOCKSIZE == 0
    if requested is None:
        return 2 if fast_ok else 0
    return requested if fast_ok else 0


def _block_k(K: int, mode: int, want: int) -> int:
    """BLOCK_K (a multiple of 64: the kernels step through it in 64-column groups); with the
    tables, the largest <= want that divides K (their weight loads have no mask along K)."""
    bk = max(64, triton.next_power_of_2(want))
    if mode == 0:
        return bk
    while bk > 64 and K % bk:
        bk //= 2
    return bk


def moe_config(P: int, dtype: torch.dtype) -> dict:
    """Default tiles for both kernels (benchmarks/moe.py sweeps alternatives).

    Sized with ptxas for sm_90 (no spills): BLOCK_N = 64 rows per program (one warpgroup's MMA
    height); wider pair blocks take 8 warps, and 64 pairs a shorter K step, so the two
    (BLOCK_N, BLOCK_P) fp32 accumulators of kernel A stay in registers. fp32 (the generic
    decode) steps 64 columns at a time with 8 warps, and 32 rows at 64 pairs.
    """
    bp = _block_p(P)
    fp32 = dtype == torch.float32
    tile = dict(BLOCK_N=32 if bp > 32 and fp32 else 64, BLOCK_K=64 if fp32 else 128 if bp > 32 else 256,
                DEQUANT=None, num_warps=8 if bp > 16 or fp32 else 4, num_stages=3)
    if fp32:  # fp32 MMA operands staged 3 deep needed 606 KB of shared memory on the H100 (227 KB max)
        tile.update(BLOCK_N=32, BLOCK_K=32, num_stages=1)
    return dict(gate_up=dict(tile), down=dict(tile, SPLIT_K=None))


def _lut(mode: int, w: NF4Experts, dtype: torch.dtype) -> torch.Tensor:
    if mode == 1:
        return nf4_half_pairs(str(w.device), dtype)
    if mode == 2:
        return _nibble_lut(str(w.device), dtype)
    return w.w1[0].tensors()[5]  # the table nf4_dequant_tile reads (kernels.nf4's contract)


def _check(x: torch.Tensor, experts: torch.Tensor, w: NF4Experts, what: str):
    P = experts.numel()
    if P > MAX_PAIRS:
        raise ValueError(f"{what}: at most {MAX_PAIRS} (token, slot) pairs, got {P}; use the expert loop")
    if x.device != w.device or experts.device != w.device:
        raise ValueError(f"{what}: inputs on {x.device}/{experts.device} but the experts on {w.device}")


def moe_gate_up(x: torch.Tensor, experts: torch.Tensor, w: NF4Experts, config: dict | None = None) -> torch.Tensor:
    """h (P, I) in x.dtype: silu(x_t w1_e^T) * (x_t w3_e^T) for pair p = t * top_k + k.

    x (T, C); experts (T, top_k) expert ids (any int dtype).
    """
    _check(x, experts, w, "moe_gate_up")
    T, C = x.shape
    top_k = experts.shape[-1]
    P, I, E = experts.numel(), w.intermediate, w.num_experts
    if C != w.hidden:
        raise ValueError(f"moe_gate_up: x has {C} features, the experts expect {w.hidden}")
    x = x.contiguous()
    h = torch.empty((P, I), dtype=x.dtype, device=x.device)
    if P == 0:
        return h
    c = dict(moe_config(P, x.dtype)["gate_up"], **(config or {}))
    mode = _dequant_mode(x.dtype, C, c["DEQUANT"])
    grid = (E, triton.cdiv(I, c["BLOCK_N"]))
    _moe_gate_up_kernel[grid](
        x, experts.reshape(-1).contiguous(), w.table13, _lut(mode, w, x.dtype), h, P, E, x.stride(0),
        N=I, K=C, TOP_K=top_k, BLOCK_P=_block_p(P), BLOCK_N=c["BLOCK_N"], BLOCK_K=_block_k(C, mode, c["BLOCK_K"]),
        DEQUANT=mode, PACKED_ALIGNED=w.packed_aligned, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=c["num_warps"], num_stages=_stages(mode, c),
    )
    return h


def _stages(mode: int, c: dict) -> int:
    """Mode 0 dequantizes fp32 tiles: staged 3 deep they overflowed the H100's shared memory
    (426 KB asked, 227 KB there, with fp16 activations and K % 64 != 0), so it is not pipelined."""
    return 1 if mode == 0 else c["num_stages"]


def _split_k(P: int, E: int, n_tiles: int, k_tiles: int, device) -> int:
    """Enough K slices that the programs of the experts in use fill the GPU about twice."""
    active = min(E, P)
    return max(1, min(k_tiles, triton.cdiv(2 * _num_sms(device), active * n_tiles)))


def moe_down(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w: NF4Experts,
             config: dict | None = None) -> torch.Tensor:
    """y (S, P, C) fp32: S split-K partials of weight[p] * h[p] w2_e^T (sum over S and slots later).

    h (P, I); experts, weights (T, top_k) (weights in any float dtype).
    """
    _check(h, experts, w, "moe_down")
    P, I = h.shape
    C, E = w.hidden, w.num_experts
    if I != w.intermediate or P != experts.numel() or weights.numel() != P:
        raise ValueError(f"moe_down: h {tuple(h.shape)}, {experts.numel()} expert ids and {weights.numel()} "
                         f"weights do not match {P} pairs of {w.intermediate} features")
    if P == 0:
        return torch.zeros((1, 0, C), dtype=torch.float32, device=h.device)
    h = h.contiguous()
    c = dict(moe_config(P, h.dtype)["down"], **(config or {}))
    mode = _dequant_mode(h.dtype, I, c["DEQUANT"])
    bk = _block_k(I, mode, c["BLOCK_K"])
    n_tiles, k_tiles = triton.cdiv(C, c["BLOCK_N"]), triton.cdiv(I, bk)
    split = c["SPLIT_K"] or _split_k(P, E, n_tiles, k_tiles, h.device)
    k_per_split = triton.cdiv(k_tiles, split) * bk
    split = triton.cdiv(I, k_per_split)
    y = torch.empty((split, P, C), dtype=torch.float32, device=h.device)
    _moe_down_kernel[(E, n_tiles, split)](
        h, experts.reshape(-1).contiguous(), weights.reshape(-1).contiguous(), w.table2,
        _lut(mode, w, h.dtype), y, P, E,
        N=C, K=I, K_PER_SPLIT=k_per_split, BLOCK_P=_block_p(P), BLOCK_N=c["BLOCK_N"], BLOCK_K=bk,
        DEQUANT=mode, PACKED_ALIGNED=w.packed_aligned, DOT_PRECISION=_dot_precision(h.dtype),
        num_warps=c["num_warps"], num_stages=_stages(mode, c),
    )
    return y


def moe_combine(y: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, P, C) fp32 partials -> out (T, C) in dtype: sum over split-K slices and top-k slots."""
    S, P, C = y.shape
    return y.view(S, P // top_k, top_k, C).sum(dim=(0, 2)).to(dtype)


TC_DEFAULT = True  # moe_decode takes kernels/moe_tc.py where it supports the call


def takes_tc(x: torch.Tensor, w: NF4Experts) -> bool:
    """Whether moe_decode(x, ...) with the default config runs kernels/moe_tc.py (whose plan the fused
    router can write: add_rms_norm_route(plan=True))."""
    return TC_DEFAULT and moe_tc.supported(x, x, w)


def moe_decode(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w: NF4Experts,
               config: dict | None = None, plan: torch.Tensor | None = None, combine: bool = True):
    """The MoE block's expert part for few tokens: out (T, C) = sum_k weight[t, k] * expert(x_t).

    x (T, C) in the compute dtype; weights (T, top_k) routing weights; experts (T, top_k) ids.
    Two launches and one reduction, static shapes, no host sync (CUDA-graph safe).
    config: optional {"gate_up": {...}, "down": {...}} overrides of `moe_config`, or with
    "kernels": "rows" of `rows_config` (the row kernels) or "tc" (kernels/moe_tc.py, the tensor-core
    core); plan: moe_tc's plan when the router wrote it, and combine=False: the output as a
    kernels.norm.SlotSums for the next norm to combine (both on that path only; the others return
    a tensor); by default kernels/moe_tc.py where it supports the call (TC_DEFAULT, 1-8 tokens on sm_90),
    else T <= ROWS_MAX_TOKENS tokens take the row kernels when their tiles fit, more tokens the two
    MMA kernels.
    """
    config = config or {}
    kernels = config.get("kernels")
    if kernels == "tc" or (kernels is None and not config and takes_tc(x, w)):
        return moe_tc.moe_decode_tc(x, weights, experts, w, plan=plan, combine=combine)
    if kernels == "rows" or (kernels is None and not config and _rows_ok(x, w)):
        return moe_decode_rows(x, weights, experts, w, config)
    h = moe_gate_up(x, experts, w, config.get("gate_up"))
    y = moe_down(h, experts, weights, w, config.get("down"))
    return moe_combine(y, experts.shape[-1], x.dtype)


# ----------------------------------------------------------------------------------------------
# References (pure PyTorch; they sync on the routing, which is fine for checking)
# ----------------------------------------------------------------------------------------------


def _dense(qs: list[NF4Tensor], e: int, cache: dict, key: str) -> torch.Tensor:
    if (key, e) not in cache:
        cache[key, e] = dequantize_nf4_reference(qs[e], torch.float32)
    return cache[key, e]


def moe_gate_up_reference(x: torch.Tensor, experts: torch.Tensor, w: NF4Experts) -> torch.Tensor:
    """h (P, I) in x.dtype, computed in fp32 from the dequantized weights."""
    top_k = experts.shape[-1]
    cache: dict = {}
    rows = []
    for p, e in enumerate(experts.reshape(-1).tolist()):
        xt = x[p // top_k].float()
        g = xt @ _dense(w.w1, e, cache, "w1").t()
        u = xt @ _dense(w.w3, e, cache, "w3").t()
        rows.append(F.silu(g) * u)
    return torch.stack(rows).to(x.dtype) if rows else x.new_empty((0, w.intermediate))


def moe_down_reference(h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, w: NF4Experts) -> torch.Tensor:
    """y (1, P, C) fp32: weight[p] * h[p] w2_e^T (one 'split')."""
    cache: dict = {}
    flat_w = weights.reshape(-1).float()
    rows = [flat_w[p] * (h[p].float() @ _dense(w.w2, e, cache, "w2").t())
            for p, e in enumerate(experts.reshape(-1).tolist())]
    if not rows:
        return torch.zeros((1, 0, w.hidden), dtype=torch.float32, device=h.device)
    return torch.stack(rows)[None]


def moe_decode_reference(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w: NF4Experts) -> torch.Tensor:
    """out (T, C) in x.dtype: the same math as moe_decode, in PyTorch."""
    h = moe_gate_up_reference(x, experts, w)
    return moe_combine(moe_down_reference(h, experts, weights, w), experts.shape[-1], x.dtype)
