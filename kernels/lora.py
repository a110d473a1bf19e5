"""LoRA linear layers on CUDA: y = base(x) + scale * (dropout(x) A^T) B^T, the base frozen.

Two paths (`lora_forward(backend=...)`):
  "cublas"  the GEMM path (the default on CUDA, `_GemmLoRAFunction`): the base GEMMs on cuBLAS
            over a transient dense copy of W (NF4 dequantized by kernels.nf4), the adapter in x's
            dtype through two small Triton passes over x (`_adapter_down_kernel`,
            `_adapter_dx_kernel`: dropout mask hashed in both, never stored) and cuBLAS beta=1
            epilogues that add its share into Y and dX without another pass over them.
  "triton"  the fused kernels below: the adapter inside a Triton NF4 GEMM's epilogue.

The base is a dense weight W (N, K) (bf16/fp16/fp32, an `nn.Linear`) or an NF4 weight (in the fused
kernels dequantized tile by tile in registers, `kernels.nf4.nf4_dequant_tile`: W is never
materialized). A (r, K) and B (N, r) are the trainable adapter (fp32 masters); their gradients come
back in fp32 on both paths.

Fused kernels (one to three projections that share the input x: q, k and v read x in one launch):

  _lora_down_kernel  xa (M, S*r) = scale_s * dropout_s(x) A_s^T         one pass over x
  _lora_fwd_kernel   y_s = x W_s^T + xa_s B_s^T (+ bias): the base GEMM adds the low-rank product in
                     its epilogue, before the single store of y (y is never written and re-read)
  _lora_dy_kernel    g (M, S*r) = scale_s * dY_s B_s and dB_s = dY_s^T xa_s: one pass over dY
  _lora_dx_kernel    dX = sum_s dY_s W_s + mask_s/(1-p) * (g_s A_s): the base dX GEMM with the
                     adapter's input gradient added in its epilogue, which also reads its x tile
                     once and adds dA_s += g_s^T dropout_s(x) (so no separate pass over x)
  _lora_da_kernel    dA_s = g_s^T dropout_s(x) alone, for inputs that need no gradient

Dropout is regenerated, never stored: element (m, k) of projection s is kept when a counter-based
hash of (m, k, key_s) clears a threshold. The hash (`lowbias32`, two rounds per row, one per
element) costs ~10 integer ops per element against ~100 for Philox, which matters because the dX
GEMM regenerates the mask in its epilogue. `dropout_keep_reference` reproduces it bit for bit in
PyTorch, so the reference path and the tests see the same mask. The keys are drawn per call from
torch's CPU generator (torch.manual_seed and activation checkpointing replay them): the GEMM
path's kernels take them as arguments, so drawing them costs no launch and no sync; the fused
kernels read a copy on x's device.

Entry points: `lora_linear(x, layer)` (what models/lora.py's LoRALinear calls on CUDA),
`lora_qkv(x, q, k, v)` (three LoRALinear layers over one x), and the functional
`lora_forward(x, bases, As, Bs, scales, p, ...)`. CUDA tensors take CUDA_BACKEND ("cublas"), CPU
tensors the PyTorch reference (`lora_reference`); an explicit backend runs anywhere (tests run the
Triton kernels on CPU through TRITON_INTERPRET=1, and torch.mm stands in for cuBLAS there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import cdiv, launch, next_power_of_2
from kernels.nf4 import (GEMV_ROWS, NF4Tensor, _num_sms, dequant_launch, dx_config, gemm_config, nf4_dequant_blocks,
                         nf4_dequant_tile, nf4_matmul)

MAX_SEGMENTS = 3
SMALL_M = GEMV_ROWS  # backend None: at most this many rows (decoding) take the NF4 GEMV + PyTorch adapter
_MASK32 = 0xFFFFFFFF
_KEEP_BITS = 16  # the mask compares 16 bits of a pair's hash with round(p * 2^16) (see _keep)


# ----------------------------------------------------------------------------------------------
# Dropout mask: a counter-based hash, in Triton and in PyTorch (bit-identical)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lowbias32(h):
    """C. Wellons' lowbias32 integer hash on uint32 (good avalanche, 2 multiplies)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _row_keys_of(k1, k2, offs_m):
    """(BLOCK_M,) uint32 per-row keys of the key pair (k1, k2): two hash rounds over (row, k1, k2)."""
    return _lowbias32(_lowbias32(offs_m.to(tl.uint32) ^ k1.to(tl.uint32)) ^ k2.to(tl.uint32))


@triton.jit
def _row_keys(keys_ptr, seg, offs_m):
    """`_row_keys_of` with projection `seg`'s key pair read from the (S, 2) keys tensor."""
    return _row_keys_of(tl.load(keys_ptr + 2 * seg), tl.load(keys_ptr + 2 * seg + 1), offs_m)


@triton.jit
def _keep(row_keys, offs_k, keep_thr):
    """(BLOCK_M, BLOCK_K) keep-mask of elements (m, k), any columns offs_k: the hash of column pair
    k // 2 (one round on row key + k // 2), its low 16 bits for even k and its high 16 for odd k.
    Element by element (the fused kernels); `_keep_tile` gives the same mask at half the hashes."""
    h = _lowbias32(row_keys[:, None] + (offs_k >> 1).to(tl.uint32)[None, :])
    bits = tl.where((offs_k & 1)[None, :] == 1, h >> 16, h & 0xFFFF)
    return bits.to(tl.int32) >= keep_thr


@triton.jit
def _keep_tile(row_keys, k_start, keep_thr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_keep` of columns k_start .. k_start + BLOCK_K - 1 (k_start even): one hash per column pair,
    its two 16-bit halves interleaved into the tile. The GEMM path's passes are bound by this
    integer work, not by memory: on the H200 the T + dA pass took 50.4 us with a hash per
    element and 38.0 with one per pair (session 11)."""
    pairs = k_start // 2 + tl.arange(0, BLOCK_K // 2)
    h = _lowbias32(row_keys[:, None] + pairs.to(tl.uint32)[None, :])  # (BM, BK / 2)
    lo = (h & 0xFFFF).to(tl.int32)
    hi = (h >> 16).to(tl.int32)
    return tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K)) >= keep_thr  # columns 2j, 2j + 1 <- lo[j], hi[j]


def _lowbias32_reference(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap; the low 32 bits are exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


def keep_threshold(p: float) -> int:
    return int(round(p * (1 << _KEEP_BITS)))


def key_pair(keys) -> tuple[int, int]:
    """One projection's dropout keys as two Python ints, from a (2,) or (1, 2) tensor (a host read:
    a sync for CUDA keys) or a pair of ints."""
    if isinstance(keys, torch.Tensor):
        keys = keys.reshape(-1).tolist()
    k1, k2 = keys
    return int(k1), int(k2)


def dropout_keep_reference(keys, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """(M, K) bool keep-mask for one key pair (`key_pair`'s forms) on `device` (default: the keys'
    device, or the CPU for ints): equals the kernels' mask."""
    if device is None:
        device = keys.device if isinstance(keys, torch.Tensor) else "cpu"
    k1, k2 = (v & _MASK32 for v in key_pair(keys))
    rows = torch.arange(M, dtype=torch.int64, device=device)
    row_keys = _lowbias32_reference(_lowbias32_reference(rows ^ k1) ^ k2)  # (M,)
    cols = torch.arange(K, dtype=torch.int64, device=device)
    h = _lowbias32_reference((row_keys[:, None] + (cols >> 1)[None, :]) & _MASK32)  # (M, K): column pairs
    bits = torch.where((cols & 1).bool()[None, :], h >> 16, h & 0xFFFF)
    return bits >= keep_threshold(p)


def new_dropout_keys(n: int, device) -> torch.Tensor:
    """(n, 2) int32 keys from torch's generator on `device` (no host sync on CUDA). `lora_forward`
    draws them on the CPU: the GEMM path's kernels take them as arguments (no launch, no sync)."""
    return torch.randint(0, 2**31 - 1, (n, 2), dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pick(seg, v0, v1, v2):
    """v0, v1 or v2 by segment (a runtime scalar or a constexpr); used for pointers."""
    v = v0
    if seg == 1:
        v = v1
    if seg == 2:
        v = v2
    return v


@triton.jit
def _pick_weight(seg, w0, am0, am20, c20, off0, qm0, w1, am1, am21, c21, off1, qm1,
                 w2, am2, am22, c22, off2, qm2):
    """Segment seg's six weight pointers (packed, absmax, absmax2, code2, offset, qmap)."""
    return (_pick(seg, w0, w1, w2), _pick(seg, am0, am1, am2), _pick(seg, am20, am21, am22),
            _pick(seg, c20, c21, c22), _pick(seg, off0, off1, off2), _pick(seg, qm0, qm1, qm2))


@triton.jit
def _segment(pid_n, N0, N1, BLOCK_N: tl.constexpr):
    """Global n-tile -> (segment, its n-tile, first row of the segment in the concatenated B)."""
    t0 = tl.cdiv(N0, BLOCK_N)
    t1 = tl.cdiv(N1, BLOCK_N)
    seg = (pid_n >= t0).to(tl.int32) + (pid_n >= t0 + t1).to(tl.int32)
    tile = pid_n - tl.where(seg >= 1, t0, 0) - tl.where(seg == 2, t1, 0)
    n_base = tl.where(seg >= 1, N0, 0) + tl.where(seg == 2, N1, 0)
    return seg, tile, n_base


@triton.jit
def _grouped(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row tiles sharing each sweep over n, so weight tiles stay in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def _w_tile(w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, qm_ptr, offs_n, k_start, N, K,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NF4: tl.constexpr, K_ALIGNED: tl.constexpr,
            EVEN: tl.constexpr):
    """W[offs_n, k_start : k_start + BLOCK_K] (BLOCK_N, BLOCK_K), zero outside W.

    NF4: dequantized in registers (fp32). Dense: loaded from the contiguous (N, K) weight; the
    five NF4 statistics pointers are then unused. EVEN: every tile lies inside W (no masks).
    """
    if NF4:
        w = nf4_dequant_tile(w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, qm_ptr,
                             offs_n, k_start, N, K, BLOCK_N, BLOCK_K, K_ALIGNED, EVEN)
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        w_tile = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        if EVEN:
            w = tl.load(w_tile)
        else:
            w = tl.load(w_tile, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
    return w


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, keys_ptr, xa_ptr, M, K, R, stride_xm, sc0, sc1, sc2, keep_thr, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NSEG: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (seg, pid_m): xa[offs_m, seg*R : seg*R + R] = scale * dropout(x) @ A_seg^T.
    # The segment is the fastest grid axis, so q/k/v programs of one row tile share x in L2.
    seg = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_rows = a_ptr + (seg * R + offs_r).to(tl.int64)[:, None] * K  # A_cat (NSEG*R, K)
    if DROPOUT:
        row_keys = _row_keys(keys_ptr, seg, offs_m)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)  # (BM, BK)
        if DROPOUT:
            x = tl.where(_keep(row_keys, offs_k, keep_thr), x * inv_keep, 0.0)
        a = tl.load(a_rows + offs_k[None, :], mask=(offs_r[:, None] < R) & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)  # (BR, BK)
        acc = tl.dot(x, tl.trans(a), acc=acc, input_precision=PRECISION)  # (BM, BR)
    scale = tl.where(seg == 0, sc0, tl.where(seg == 1, sc1, sc2))
    out = xa_ptr + offs_m.to(tl.int64)[:, None] * (NSEG * R) + seg * R + offs_r[None, :]
    tl.store(out, acc * scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _lora_fwd_kernel(
    x_ptr, xa_ptr, b_ptr, bias_ptr,
    w0, am0, am20, c20, off0, qm0, y0,
    w1, am1, am21, c21, off1, qm1, y1,
    w2, am2, am22, c22, off2, qm2, y2,
    M, K, N0, N1, N2, R, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NSEG: tl.constexpr, NF4: tl.constexpr, K_ALIGNED: tl.constexpr,
    EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    # One launch over the n-tiles of all segments (q, k, v side by side): every program reads its
    # x row tile, so one launch reads x from HBM about once. Y^T tile = W X^T (W is the MMA's A
    # operand, straight from registers after the dequant), then + B xa^T, + bias, one store.
    num_n = tl.cdiv(N0, BLOCK_N) + tl.cdiv(N1, BLOCK_N) + tl.cdiv(N2, BLOCK_N)
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), num_n, GROUP_M)
    seg, tile, n_base = _segment(pid_n, N0, N1, BLOCK_N)
    N = tl.where(seg == 0, N0, tl.where(seg == 1, N1, N2))
    w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, qm_ptr = _pick_weight(
        seg, w0, am0, am20, c20, off0, qm0, w1, am1, am21, c21, off1, qm1, w2, am2, am22, c22, off2, qm2)
    y_ptr = _pick(seg, y0, y1, y2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _w_tile(w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, qm_ptr, offs_n, k_start, N, K,
                    BLOCK_N, BLOCK_K, NF4, K_ALIGNED, EVEN).to(x.dtype)  # (BN, BK)
        acc = tl.dot(w, tl.trans(x), acc=acc, input_precision=PRECISION)  # (BN, BM)

    # Epilogue: the low-rank update B_seg xa_seg^T (fp32 operands: tf32 on 16-bit runs).
    offs_r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + (n_base + offs_n).to(tl.int64)[:, None] * R + offs_r[None, :],
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(tl.float32)  # (BN, BR)
    xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * (NSEG * R) + seg * R + offs_r[None, :],
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)  # (BM, BR) fp32
    acc = tl.dot(b, tl.trans(xa), acc=acc, input_precision=PRECISION)  # (BN, BM)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_base + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_tile = y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]  # y_seg (M, N) contiguous
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_dy_kernel(
    dy0, dy1, dy2, b_ptr, xa_ptr, g_ptr, db_ptr, M, N0, N1, N2, R, rows_per_prog, sc0, sc1, sc2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NSEG: tl.constexpr,
    PRECISION: tl.constexpr, NATIVE: tl.constexpr = False,
):
    # Program (n-tile over all segments, row range): one read of its dY tiles gives both
    #   g[m, seg] += scale * dY[m, n-tile] B[n-tile]      (reduced over n-tiles: atomics)
    #   dB[n-tile] += dY[rows, n-tile]^T xa[rows, seg]    (reduced over row ranges: atomics)
    # NATIVE: the MMAs take dY's own dtype (B and xa cast to it), else fp32 operands (tf32).
    if NATIVE:
        op_dtype: tl.constexpr = dy0.dtype.element_ty
    else:
        op_dtype: tl.constexpr = tl.float32
    seg, tile, n_base = _segment(tl.program_id(0), N0, N1, BLOCK_N)
    N = tl.where(seg == 0, N0, tl.where(seg == 1, N1, N2))
    scale = tl.where(seg == 0, sc0, tl.where(seg == 1, sc1, sc2))
    dy_ptr = _pick(seg, dy0, dy1, dy2)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < N
    r_mask = offs_r < R
    b = tl.load(b_ptr + (n_base + offs_n).to(tl.int64)[:, None] * R + offs_r[None, :],
                mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(op_dtype)  # (BN, BR)
    db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    m_lo = tl.program_id(1) * rows_per_prog
    for m_start in range(m_lo, tl.minimum(m_lo + rows_per_prog, M), BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(op_dtype)  # (BM, BN)
        xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * (NSEG * R) + seg * R + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(op_dtype)  # (BM, BR)
        g = tl.dot(dy, b, input_precision=PRECISION) * scale  # (BM, BR)
        tl.atomic_add(g_ptr + offs_m.to(tl.int64)[:, None] * (NSEG * R) + seg * R + offs_r[None, :], g,
                      mask=m_mask[:, None] & r_mask[None, :], sem="relaxed")
        db = tl.dot(tl.trans(dy), xa, acc=db, input_precision=PRECISION)  # (BN, BR)
    tl.atomic_add(db_ptr + (n_base + offs_n).to(tl.int64)[:, None] * R + offs_r[None, :], db,
                  mask=n_mask[:, None] & r_mask[None, :], sem="relaxed")


@triton.jit
def _lora_dx_kernel(
    dy0, w0, am0, am20, c20, off0, qm0,
    dy1, w1, am1, am21, c21, off1, qm1,
    dy2, w2, am2, am22, c22, off2, qm2,
    g_ptr, a_ptr, keys_ptr, dx_ptr, x_ptr, da_ptr, M, K, N0, N1, N2, R, stride_xm, keep_thr, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NSEG: tl.constexpr, NF4: tl.constexpr, K_ALIGNED: tl.constexpr,
    EVEN: tl.constexpr, DROPOUT: tl.constexpr, FUSE_DA: tl.constexpr, PRECISION: tl.constexpr,
):
    # dX^T tile (BK, BM) = sum_seg W_seg^T dY_seg^T over each segment's N (W never materialized),
    # then the adapter term mask/(1-p) * (A_seg^T g_seg^T) in the epilogue, then one store.
    # FUSE_DA: the epilogue also reads this program's x tile (each x element is read once over the
    # grid) and adds dropout(x)^T g into dA (atomics over row tiles): no separate pass over x.
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = pid_k * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for seg in tl.static_range(NSEG):
        dy_ptr = _pick(seg, dy0, dy1, dy2)
        w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, qm_ptr = _pick_weight(
            seg, w0, am0, am20, c20, off0, qm0, w1, am1, am21, c21, off1, qm1, w2, am2, am22, c22, off2, qm2)
        N = _pick(seg, N0, N1, N2)
        dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * N
        for n_start in range(0, N, BLOCK_N):
            offs_n = n_start + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_rows + offs_n[None, :], mask=m_mask[:, None] & (offs_n[None, :] < N), other=0.0)
            w = _w_tile(w_ptr, am_ptr, am2_ptr, c2_ptr, off_ptr, qm_ptr, offs_n, k_start, N, K,
                        BLOCK_N, BLOCK_K, NF4, K_ALIGNED, EVEN).to(dy.dtype)  # (BN, BK)
            acc = tl.dot(tl.trans(w), tl.trans(dy), acc=acc, input_precision=PRECISION)  # (BK, BM)

    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    for seg in tl.static_range(NSEG):
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * (NSEG * R) + seg * R + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (BM, BR) fp32
        a = tl.load(a_ptr + (seg * R + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=r_mask[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)  # (BR, BK)
        if DROPOUT:
            lora = tl.dot(tl.trans(a), tl.trans(g), input_precision=PRECISION)  # (BK, BM)
            keep = tl.trans(_keep(_row_keys(keys_ptr, seg, offs_m), offs_k, keep_thr))  # (BK, BM)
            acc += tl.where(keep, lora * inv_keep, 0.0)
        else:
            acc = tl.dot(tl.trans(a), tl.trans(g), acc=acc, input_precision=PRECISION)
        if FUSE_DA:
            xt = tl.load(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None],
                         mask=(offs_k[:, None] < K) & m_mask[None, :], other=0.0).to(tl.float32)  # (BK, BM)
            if DROPOUT:
                xt = tl.where(keep, xt * inv_keep, 0.0)
            da = tl.dot(xt, g, input_precision=PRECISION)  # (BK, BR) = dA_seg^T tile
            tl.atomic_add(da_ptr + (seg * R + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None], da,
                          mask=(offs_k[:, None] < K) & r_mask[None, :], sem="relaxed")
    dx_tile = dx_ptr + offs_m.to(tl.int64)[None, :] * K + offs_k[:, None]
    tl.store(dx_tile, acc.to(dx_ptr.dtype.element_ty), mask=(offs_k[:, None] < K) & m_mask[None, :])


@triton.jit
def _lora_da_kernel(
    x_ptr, g_ptr, keys_ptr, da_ptr, M, K, R, stride_xm, rows_per_prog, keep_thr, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NSEG: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (seg, k-tile, row range): dA_seg^T[k-tile] += dropout(x)[rows, k-tile]^T g[rows, seg].
    seg = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    m_lo = tl.program_id(2) * rows_per_prog
    for m_start in range(m_lo, tl.minimum(m_lo + rows_per_prog, M), BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # (BM, BK)
        if DROPOUT:
            x = tl.where(_keep(_row_keys(keys_ptr, seg, offs_m), offs_k, keep_thr), x * inv_keep, 0.0)
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * (NSEG * R) + seg * R + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (BM, BR)
        acc = tl.dot(tl.trans(x), g, acc=acc, input_precision=PRECISION)  # (BK, BR)
    out = da_ptr + (seg * R + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None]  # dA_cat (NSEG*R, K)
    tl.atomic_add(out, acc, mask=k_mask[:, None] & r_mask[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# The GEMM path's adapter kernels (one projection; the base GEMMs are cuBLAS, see _GemmLoRAFunction)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cast_and_zero(src_ptr, dst_ptr, n_cast, zero_ptr, n_zero, CHUNK: tl.constexpr):
    """Side jobs of a launch, spread over all its programs: dst[:n_cast] = src cast to dst's dtype,
    and zero_ptr[:n_zero] = 0 (fp32). Each saves a launch of its own (host time, not GPU time)."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    first = (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * CHUNK
    offs = tl.arange(0, CHUNK)
    for start in range(first, n_cast, programs * CHUNK):
        mask = start + offs < n_cast
        v = tl.load(src_ptr + start + offs, mask=mask, other=0.0)
        tl.store(dst_ptr + start + offs, v.to(dst_ptr.dtype.element_ty), mask=mask)
    for start in range(first, n_zero, programs * CHUNK):
        tl.store(zero_ptr + start + offs, tl.zeros((CHUNK,), tl.float32), mask=start + offs < n_zero)


@triton.jit
def _adapter_up_rows(xa, offs_m, m_mask, b_ptr, bias_ptr, y_ptr, N, R, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """y[rows] = xa[rows] B^T (+ bias) over all N columns, from a row tile's finished xa (BM, BR)
    in y's dtype; B (N, R) in any dtype (its fp32 master: cast in registers, rounded as the
    launch's own cast of B rounds it), fp32 accumulation, one rounding to y's dtype. The GEMM path's
    forward then adds x W^T into y with cuBLAS (beta = 1)."""
    offs_r = tl.arange(0, BLOCK_R)
    y_rows = y_ptr + offs_m.to(tl.int64)[:, None] * N
    for n_start in tl.range(0, N, BLOCK_N, num_stages=1):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=n_mask[:, None] & (offs_r < R)[None, :], other=0.0).to(xa.dtype)  # (BN, BR)
        y = tl.dot(xa, tl.trans(b), input_precision=PRECISION)  # (BM, BN) fp32
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _adapter_down_rows(
    x_ptr, a_ptr, xa_ptr, M, K, R, stride_xm, k_per_split, scale, key1, key2, keep_thr,
    b_ptr, bias_ptr, y_ptr, N,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    WRITE_Y: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Program (row tile, K split): xa[rows] (+)= scale * (keep * x[rows, split]) A[:, split]^T.
    x keeps its dtype (16-bit MMAs, fp32 accumulation); A (fp32 master) is cast to it in
    registers. The mask only selects elements; 1/(1-p) is folded into `scale`. With WRITE_Y (one
    K split), the row tile then writes its rows of y = xa B^T (+ bias) (`_adapter_up_rows`)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_rows = a_ptr + offs_r.to(tl.int64)[:, None] * K
    if DROPOUT:
        row_keys = _row_keys_of(key1, key2, offs_m)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = tl.program_id(1) * k_per_split
    for k_start in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        if DROPOUT:
            x = tl.where(_keep_tile(row_keys, k_start, keep_thr, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
        a = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(a.to(x.dtype)), acc=acc, input_precision=PRECISION)  # (BM, BR)
    out = xa_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc * scale, mask=m_mask[:, None] & r_mask[None, :], sem="relaxed")
    else:
        xa = (acc * scale).to(xa_ptr.dtype.element_ty)
        tl.store(out, xa, mask=m_mask[:, None] & r_mask[None, :])
        if WRITE_Y:
            _adapter_up_rows(xa, offs_m, m_mask, b_ptr, bias_ptr, y_ptr, N, R, BLOCK_N, BLOCK_R, HAS_BIAS, PRECISION)


@triton.jit(do_not_specialize=["key1", "key2"])
def _adapter_down_kernel(
    x_ptr, a_ptr, xa_ptr, b_ptr, b_out_ptr, acc_ptr, M, K, R, stride_xm, k_per_split, scale,
    key1, key2, keep_thr, n_b, n_acc,
    q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, w_out_ptr, n_w, n_w_bytes, n_w_blocks,
    bias_ptr, y_ptr, N,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr, DEQ_BLOCKS: tl.constexpr, DEQ_EVEN: tl.constexpr,
    WRITE_Y: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # The forward's Triton work in one launch (each launch costs the host tens of us, the GPU
    # almost nothing here): programs below cdiv(M, BLOCK_M) run `_adapter_down_rows` (the dropout
    # keys are arguments, not a tensor), and with WRITE_Y each row tile then writes its rows of
    # y = xa B^T (+ bias) from B's master b_ptr (the forward's small GEMM, formerly a cuBLAS call);
    # with DEQUANT, the programs after them dequantize the NF4 base into w_out
    # (`nf4_dequant_blocks`, the dequant kernel's body; both passes only stream memory, so they
    # share the GPU well). All programs share the side jobs: B (n_b elements) cast to x's dtype
    # into b_out, and the backward's fp32 accumulators (n_acc elements) zeroed.
    _cast_and_zero(b_ptr, b_out_ptr, n_b, acc_ptr, n_acc, 1024)
    row_tiles = tl.cdiv(M, BLOCK_M)
    if DEQUANT:
        if tl.program_id(0) >= row_tiles:
            nf4_dequant_blocks(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, w_out_ptr,
                               tl.program_id(0) - row_tiles, n_w, n_w_bytes, n_w_blocks, DEQ_BLOCKS, DEQ_EVEN)
        else:
            _adapter_down_rows(x_ptr, a_ptr, xa_ptr, M, K, R, stride_xm, k_per_split, scale, key1, key2, keep_thr,
                               b_ptr, bias_ptr, y_ptr, N, BLOCK_M, BLOCK_K, BLOCK_R, DROPOUT, ATOMIC, PRECISION,
                               WRITE_Y, BLOCK_N, HAS_BIAS)
    else:
        _adapter_down_rows(x_ptr, a_ptr, xa_ptr, M, K, R, stride_xm, k_per_split, scale, key1, key2, keep_thr,
                           b_ptr, bias_ptr, y_ptr, N, BLOCK_M, BLOCK_K, BLOCK_R, DROPOUT, ATOMIC, PRECISION,
                           WRITE_Y, BLOCK_N, HAS_BIAS)


@triton.jit(do_not_specialize=["key1", "key2"])
def _adapter_dx_kernel(
    x_ptr, g_ptr, a_ptr, t_ptr, da_ptr, M, K, R, stride_xm, rows_per_prog, g_scale, key1, key2, keep_thr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
    NEED_DX: tl.constexpr, ACCUM: tl.constexpr, NEED_DA: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (k-tile, row range); per row tile, with the mask hashed once for both:
    #   T[rows, k-tile] (+)= g_scale * keep * (g[rows] A[:, k-tile])   the adapter's share of dX
    #   dA[:, k-tile]    += g_scale * g[rows]^T (keep * x[rows, k-tile]) in registers, one atomic
    #                                                                    add per program at the end
    # g (M, R) any dtype (cast to x's); A fp32 (cast to x's dtype); T (M, K) in x's dtype.
    dtype = x_ptr.dtype.element_ty
    k_start = tl.program_id(0) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :],
                mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(dtype)  # (BR, BK)
    da = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    m_lo = tl.program_id(1) * rows_per_prog
    for m_start in range(m_lo, tl.minimum(m_lo + rows_per_prog, M), BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        mk_mask = m_mask[:, None] & k_mask[None, :]
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(dtype)  # (BM, BR)
        if DROPOUT:
            keep = _keep_tile(_row_keys_of(key1, key2, offs_m), k_start, keep_thr, BLOCK_M, BLOCK_K)  # (BM, BK)
        if NEED_DX:
            t = tl.dot(g, a, input_precision=PRECISION) * g_scale  # (BM, BK) fp32
            if DROPOUT:
                t = tl.where(keep, t, 0.0)
            t_tile = t_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
            if ACCUM:
                t += tl.load(t_tile, mask=mk_mask, other=0.0).to(tl.float32)
            tl.store(t_tile, t.to(t_ptr.dtype.element_ty), mask=mk_mask)
        if NEED_DA:
            x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :], mask=mk_mask, other=0.0)
            if DROPOUT:
                x = tl.where(keep, x, tl.zeros_like(x))
            da = tl.dot(tl.trans(x), g, acc=da, input_precision=PRECISION)  # (BK, BR)
    if NEED_DA:
        out = da_ptr + offs_r.to(tl.int64)[None, :] * K + offs_k[:, None]  # dA (R, K) fp32
        tl.atomic_add(out, da * g_scale, mask=k_mask[:, None] & r_mask[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Host side: the frozen bases, launchers
# ----------------------------------------------------------------------------------------------


@dataclass
class Base:
    """A frozen projection: `weight` is a dense (N, K) tensor or an NF4Tensor; `compute_dtype` the
    dtype the matmul runs in (None: x's dtype for NF4, the weight's for dense)."""

    weight: torch.Tensor | NF4Tensor
    bias: torch.Tensor | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def is_nf4(self) -> bool:
        return isinstance(self.weight, NF4Tensor)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return x.dtype if self.is_nf4 else self.weight.dtype

    def matmul(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """x W^T + bias in x's dtype, differentiable in x (NF4: `nf4_matmul`, GEMV for few rows)."""
        if self.is_nf4:
            y = nf4_matmul(x, self.weight, backend)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """W as a dense (N, K) tensor in `dtype`: NF4 dequantized into a new tensor (Triton on
        CUDA), a dense weight cast (no copy when it already has that dtype)."""
        return self.weight.dequantize(dtype) if self.is_nf4 else self.weight.to(dtype)

    def kernel_args(self) -> tuple:
        """(w, absmax, absmax2, code2, offset, qmap) pointers; a dense weight fills all six."""
        if self.is_nf4:
            return self.weight.tensors()
        return (self.weight.contiguous(),) * 6  # the kernels assume rows of stride K


def base_of(module) -> Base:
    """The frozen base of an `nn.Linear` or an `NF4Linear` (duck-typed: kernels/ imports no models/)."""
    nf4 = getattr(module, "nf4", None)  # a property that builds the NF4Tensor: evaluated once
    if nf4 is not None:
        return Base(nf4, module.bias, getattr(module, "compute_dtype", None))
    return Base(module.weight, module.bias)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(r: int) -> int:
    return max(16, next_power_of_2(r))


def _rows_per_prog(M: int, programs: int, block_m: int, device, waves: int = 2) -> int:
    """Rows each program of a reduction-over-M kernel takes, for about `waves` waves of programs."""
    splits = max(1, min(cdiv(M, block_m), cdiv(waves * _num_sms(device), max(programs, 1))))
    return cdiv(cdiv(M, splits), block_m) * block_m


def _pad3(items: list) -> list:
    return items + [items[0]] * (MAX_SEGMENTS - len(items))


DOWN_CONFIG = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=3)
DY_CONFIG = dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3)
DA_CONFIG = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)
DY_NATIVE_WIDE = dict(BLOCK_M=64, BLOCK_N=256, num_warps=8)  # the GEMM path's dY pass, N >= 2048 (H100 sweep)


def dy_native_config(N: int) -> dict | None:
    """Tiles of the GEMM path's one-pass dY kernel for N output features (None: DY_CONFIG). On the
    H100, q/o (N = 4096) takes 33 us at 64 x 256 and 68 at DY_CONFIG's 32 x 128; k/v (1024) is
    fastest at 32 x 128."""
    return DY_NATIVE_WIDE if N >= 2048 else None


def _launch_down(x2, a_cat, keys, scales, p, r, config=None):
    M, K = x2.shape
    S = len(scales)
    c = dict(DOWN_CONFIG, **(config or {}))
    xa = torch.empty((M, S * r), dtype=torch.float32, device=x2.device)
    sc = _pad3(list(scales))
    _lora_down_kernel[(S, cdiv(M, c["BLOCK_M"]))](
        x2, a_cat, keys, xa, M, K, r, x2.stride(0), sc[0], sc[1], sc[2],
        keep_threshold(p), 1.0 / (1.0 - p),
        BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_R=_block_r(r), NSEG=S, DROPOUT=p > 0,
        PRECISION=_precision(x2.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return xa


def _config(default: dict, nf4: bool, K: int, config: dict | None) -> dict:
    c = dict(default, **(config or {}))
    if nf4 and K % 64:  # the per-element NF4 gather needs ~100 KB of shared memory per stage
        c["num_stages"] = min(c["num_stages"], 2)
    return c


def _even(Ns: list, K: int, c: dict) -> bool:
    """Every weight tile lies inside its weight: the GEMMs may load W without masks."""
    return K % 64 == 0 and K % c["BLOCK_K"] == 0 and all(n % c["BLOCK_N"] == 0 for n in Ns)


def _launch_fwd(x2, xa, b_cat, bias_cat, bases, r, config=None):
    M, K = x2.shape
    Ns = [b.out_features for b in bases]
    ys = [torch.empty((M, n), dtype=x2.dtype, device=x2.device) for n in Ns]
    c = _config(gemm_config(M, sum(Ns), K), bases[0].is_nf4, K, config)
    num_n = sum(cdiv(n, c["BLOCK_N"]) for n in Ns)
    args = []
    for base, y in zip(_pad3(list(bases)), _pad3(ys)):
        args += [*base.kernel_args(), y]
    N3 = Ns + [0] * (MAX_SEGMENTS - len(Ns))
    _lora_fwd_kernel[(cdiv(M, c["BLOCK_M"]) * num_n,)](
        x2, xa, b_cat, bias_cat if bias_cat is not None else xa, *args,
        M, K, N3[0], N3[1], N3[2], r, x2.stride(0),
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_R=_block_r(r),
        GROUP_M=c["GROUP_M"], NSEG=len(bases), NF4=bases[0].is_nf4, K_ALIGNED=K % 64 == 0,
        EVEN=_even(Ns, K, c), HAS_BIAS=bias_cat is not None, PRECISION=_precision(x2.dtype),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return ys


def _launch_dy(dys, b_cat, xa, scales, r, config=None, native=False, g=None, db=None):
    """g (M, S*r) = scale_s * dY_s B_s and dB_cat (sum N, r) = dY_s^T xa_s, fp32, added by atomics
    into g and db when given (zeroed buffers), else into new zeroed ones."""
    M = xa.shape[0]
    S = len(dys)
    Ns = [dy.shape[1] for dy in dys]
    c = dict(DY_CONFIG, **(config or {}))
    if g is None:
        g = torch.zeros((M, S * r), dtype=torch.float32, device=xa.device)
    if db is None:
        db = torch.zeros((sum(Ns), r), dtype=torch.float32, device=xa.device)
    num_n = sum(cdiv(n, c["BLOCK_N"]) for n in Ns)
    rows = _rows_per_prog(M, num_n, c["BLOCK_M"], xa.device)
    N3 = Ns + [0] * (MAX_SEGMENTS - S)
    sc = _pad3(list(scales))
    launch(
        _lora_dy_kernel, (num_n, cdiv(M, rows)),
        *_pad3(list(dys)), b_cat, xa, g, db, M, N3[0], N3[1], N3[2], r, rows, sc[0], sc[1], sc[2],
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_R=_block_r(r), NSEG=S,
        PRECISION=_precision(dys[0].dtype), NATIVE=native, num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return g, db


def _launch_dx(dys, bases, g, a_cat, keys, p, r, x2=None, config=None):
    """dX (M, K); with x2 given, also dA_cat (S*r, K) fp32 from the same launch (else None)."""
    M = g.shape[0]
    K = a_cat.shape[1]
    Ns = [b.out_features for b in bases]
    dx = torch.empty((M, K), dtype=dys[0].dtype, device=g.device)
    da = None if x2 is None else torch.zeros((len(bases) * r, K), dtype=torch.float32, device=g.device)
    c = _config(dx_config(M, sum(Ns), K), bases[0].is_nf4, K, config)
    args = []
    for dy, base in zip(_pad3(list(dys)), _pad3(list(bases))):
        args += [dy, *base.kernel_args()]
    N3 = Ns + [0] * (MAX_SEGMENTS - len(Ns))
    _lora_dx_kernel[(cdiv(M, c["BLOCK_M"]) * cdiv(K, c["BLOCK_K"]),)](
        *args, g, a_cat, keys, dx, dx if x2 is None else x2, dx if da is None else da,
        M, K, N3[0], N3[1], N3[2], r, K if x2 is None else x2.stride(0), keep_threshold(p), 1.0 / (1.0 - p),
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_R=_block_r(r),
        GROUP_M=c["GROUP_M"], NSEG=len(bases), NF4=bases[0].is_nf4, K_ALIGNED=K % 64 == 0,
        EVEN=_even(Ns, K, c), DROPOUT=p > 0, FUSE_DA=x2 is not None, PRECISION=_precision(dys[0].dtype),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return dx, da


def _launch_da(x2, g, keys, p, r, S, config=None):
    M, K = x2.shape
    c = dict(DA_CONFIG, **(config or {}))
    da = torch.zeros((S * r, K), dtype=torch.float32, device=x2.device)
    k_tiles = cdiv(K, c["BLOCK_K"])
    rows = _rows_per_prog(M, S * k_tiles, c["BLOCK_M"], x2.device)
    _lora_da_kernel[(S, k_tiles, cdiv(M, rows))](
        x2, g, keys, da, M, K, r, x2.stride(0), rows, keep_threshold(p), 1.0 / (1.0 - p),
        BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_R=_block_r(r), NSEG=S, DROPOUT=p > 0,
        PRECISION=_precision(x2.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return da


# Tiles from sweeps at q/o, 5120 tokens. Down: H100, session 10, 37.9 us (BLOCK_M 32 x BLOCK_K 128:
# 42.6). T + dA: H200, session 11, with one hash per column pair (`_keep_tile`): 16 x 256 38.0 us,
# 16 x 128 43.7, 32 x 128 50.9, 64 x 128 (2 waves) 67.9.
ADAPTER_DOWN_CONFIG = dict(BLOCK_M=16, BLOCK_K=256, SPLIT_K=1, BLOCK_N=256, num_warps=4, num_stages=3)
ADAPTER_DX_CONFIG = dict(BLOCK_M=16, BLOCK_K=256, WAVES=4, num_warps=4, num_stages=3)


def _inv_keep(p: float) -> float:
    return 1.0 / (1.0 - p)


def _scratch(shape, dtype, device) -> torch.Tensor:
    """An uninitialized buffer that a kernel fills completely (tests fill these with NaN to check)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_adapter_down(x2, a, keys, p, scale, config=None, b=None, workspace=0, nf4=None, y=None, bias=None):
    """xa (M, r) in x2's dtype = scale * (keep * x2) A^T (the caller folds 1/(1-p) into scale).

    keys: one projection's key pair (`key_pair`'s forms; unused when p == 0). Other work of the
    same launch (`_adapter_down_kernel`), each saving a launch of its own: with `b` (N, r) given,
    B in x2's dtype (b itself when it already has it); with `y` (M, N) given too (contiguous, x2's
    dtype; one K split), y = xa B^T (+ bias), written by the row tiles as soon as their xa is done;
    a zeroed fp32 workspace of `workspace` elements (the backward's atomic accumulators: dA, and g
    and dB for the one-pass dY kernel); with `nf4` (an NF4Tensor), W dequantized to x2's dtype.
    Returns (xa, B in x2's dtype or None, the workspace or None, W or None)."""
    M, K = x2.shape
    r = a.shape[0]
    c = dict(ADAPTER_DOWN_CONFIG, **(config or {}))
    split = max(1, min(c["SPLIT_K"], cdiv(K, c["BLOCK_K"])))
    if y is not None and (b is None or split > 1):
        raise ValueError(f"y = xa B^T needs b and one K split; got b={'given' if b is not None else None} and "
                         f"{split} K splits: pass b, and SPLIT_K=1 in config (or compute y yourself after xa)")
    k_per_split = cdiv(cdiv(K, split), c["BLOCK_K"]) * c["BLOCK_K"]
    atomic = split > 1
    dev = x2.device
    xa = (torch.zeros if atomic else _scratch)((M, r), dtype=torch.float32 if atomic else x2.dtype, device=dev)
    b_out = b if b is None or b.dtype == x2.dtype else _scratch(b.shape, x2.dtype, dev)
    n_b = 0 if b_out is b else b.numel()
    acc = _scratch((workspace,), torch.float32, dev) if workspace else None
    k1, k2 = key_pair(keys) if p > 0 else (0, 0)
    grid0 = cdiv(M, c["BLOCK_M"])
    w = None
    q_args, deq = (xa,) * 7 + (0, 0, 0), dict(DEQUANT=False, DEQ_BLOCKS=1, DEQ_EVEN=True)
    if nf4 is not None and nf4.numel() and split == 1:  # the dequant's programs follow the row tiles
        w = _scratch(nf4.shape, x2.dtype, dev)
        programs, n_blocks, meta = dequant_launch(nf4.numel())
        q_args = (*nf4.tensors(), w, nf4.numel(), nf4.packed.numel(), n_blocks)
        deq = dict(DEQUANT=True, DEQ_BLOCKS=meta["BLOCKS"], DEQ_EVEN=meta["EVEN"], enable_fp_fusion=False)
        grid0 += programs
    elif nf4 is not None:
        w = nf4.dequantize(x2.dtype)
    launch(
        _adapter_down_kernel, (grid0, split),
        x2, a, xa, xa if b is None else b, xa if n_b == 0 else b_out, xa if acc is None else acc, M, K, r,
        x2.stride(0), k_per_split, float(scale), k1, k2, keep_threshold(p), n_b, workspace, *q_args,
        xa if bias is None else bias, xa if y is None else y, 0 if y is None else y.shape[1],
        BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_R=_block_r(r), DROPOUT=p > 0, ATOMIC=atomic,
        PRECISION=_precision(x2.dtype), WRITE_Y=y is not None, BLOCK_N=c["BLOCK_N"], HAS_BIAS=bias is not None,
        num_warps=c["num_warps"], num_stages=c["num_stages"], **deq,
    )
    return xa.to(x2.dtype), b_out, acc, w


def _launch_adapter_dx(x2, g, a, keys, p, g_scale, t=None, accum=False, need_da=True, config=None, da=None):
    """T (+)= g_scale * keep * (g A) into t (M, K) when t is given; returns dA (r, K) fp32 =
    g_scale * g^T (keep * x2) when need_da (else None), added into `da` when given (a zeroed
    accumulator from `_launch_adapter_down`), else into a new zeroed one. One pass over x2 and t."""
    M, K = x2.shape
    r = a.shape[0]
    c = dict(ADAPTER_DX_CONFIG, **(config or {}))
    if need_da and da is None:
        da = torch.zeros((r, K), dtype=torch.float32, device=x2.device)
    k_tiles = cdiv(K, c["BLOCK_K"])
    rows = _rows_per_prog(M, k_tiles, c["BLOCK_M"], x2.device, c["WAVES"])
    k1, k2 = key_pair(keys) if p > 0 else (0, 0)
    launch(
        _adapter_dx_kernel, (k_tiles, cdiv(M, rows)),
        x2, g.contiguous(), a, x2 if t is None else t, x2 if not need_da else da, M, K, r, x2.stride(0), rows,
        float(g_scale), k1, k2, keep_threshold(p),
        BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_R=_block_r(r), DROPOUT=p > 0, NEED_DX=t is not None,
        ACCUM=accum, NEED_DA=need_da, PRECISION=_precision(x2.dtype),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    return da if need_da else None


def _adapter_down_torch(x2, a, keys, p, scale):
    """`_launch_adapter_down` in PyTorch (fp32 math on the same 16-bit operands, the hash mask)."""
    xk = x2
    if p > 0:
        xk = torch.where(dropout_keep_reference(keys, *x2.shape, p, x2.device), x2, torch.zeros((), dtype=x2.dtype))
    return ((xk.float() @ a.to(x2.dtype).float().t()) * scale).to(x2.dtype)


def _adapter_dx_torch(x2, g, a, keys, p, g_scale, t=None, accum=False, need_da=True):
    """`_launch_adapter_dx` in PyTorch."""
    dtype = x2.dtype
    keep = dropout_keep_reference(keys, *x2.shape, p, x2.device) if p > 0 else None
    gf = g.to(dtype).float()
    if t is not None:
        term = (gf @ a.to(dtype).float()) * g_scale
        if keep is not None:
            term = torch.where(keep, term, 0.0)
        t.copy_(term + t.float() if accum else term)
    if not need_da:
        return None
    xk = x2.float() if keep is None else torch.where(keep, x2.float(), 0.0)
    return (gf.t() @ xk) * g_scale


_MM_OUT_DTYPE: dict = {}  # device type -> whether torch.mm(..., out_dtype=float32) works there


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: 16-bit cuBLAS with fp32 output where torch offers it (mm.dtype),
    else the product in fp32 (CPU) or a cast of the 16-bit product (older torch on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if not a.is_cuda:
        return a.float() @ b.float()
    if _MM_OUT_DTYPE.get("cuda", True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE["cuda"] = True
            return out
        except Exception:  # noqa: BLE001  (no mm.dtype in this torch, or not for these operands)
            _MM_OUT_DTYPE["cuda"] = False
    return (a @ b).float()


@dataclass(frozen=True)
class GemmOptions:
    """Variants of the GEMM path (`backend="cublas"`); benchmarks/lora.py times each.

    adapter        "triton" (the two adapter kernels above), "torch" (the same math in PyTorch,
                   the hash mask from `dropout_keep_reference`: slow on a GPU, for tests), None
                   (Triton on CUDA, "torch" elsewhere), or "torch_mask": PyTorch ops and cuBLAS
                   only (no Triton launch: the host cost of each Triton launch is the point), the
                   dropout mask drawn by torch (bernoulli_) and kept as bool, M x K bytes per
                   layer, until the backward; about twice the adapter's HBM traffic of "triton".
    dy             "triton": g = dY B and dB = dY^T xa from one pass over dY (`_lora_dy_kernel`,
                   16-bit MMAs, fp32 atomics into accumulators the forward's launch zeroed): one
                   launch instead of two, and on the H100 33 us instead of 52 for q/o (session
                   10). "cublas": two matmuls (cuBLAS; dY read twice; deterministic g and dB).
                   None (default): "triton" on CUDA, "cublas" elsewhere.
    adapter_first  forward: Y = xa B^T (+ bias) first, then the base GEMM accumulates into it
                   (cuBLAS beta = 1); backward: the adapter kernel writes its dX share T first and
                   the dX GEMM accumulates into T. False: base GEMM first, then Y += xa B^T (one
                   more pass over Y) and dX += T (the adapter kernel reads and rewrites dX).
    y_in_down      adapter "triton" with adapter_first: the forward's Triton launch writes
                   Y = xa B^T (+ bias) from each row tile as soon as its xa is done, instead of a
                   cuBLAS call after it (one call fewer; Y's write overlaps the other tiles' hashing).
                   False: Y = xa B^T by cuBLAS.
    save_weight    True: keep the forward's dequantized W for the backward (one dequant per step
                   instead of two) for N x K x 2 bytes per layer held until its backward (under
                   activation checkpointing only from the recomputed forward to that layer's
                   backward; without it 2.7 GB for all of Mixtral's q/k/v/o, still less than the
                   plain path's fp32 copies of x). False: dequantize again in the backward. None
                   (default): keep W when it has no more elements than x (attention projections
                   at training sizes; not a 14336 x 4096 expert over a few hundred tokens).
    """

    adapter: str | None = None
    dy: str | None = None
    adapter_first: bool = True
    y_in_down: bool = True
    save_weight: bool | None = None


GEMM_OPTIONS = GemmOptions()  # the default variant (change it, or pass options=, to pick another)


@dataclass
class _GemmSpec:
    base: "Base"
    scale: float
    p: float
    keys: tuple[int, int]  # the dropout key pair (0, 0 when p == 0)
    options: GemmOptions


ADAPTERS = (None, "triton", "torch", "torch_mask")


def _dy_impl(opt: GemmOptions, t: torch.Tensor) -> str:
    if opt.dy not in (None, "triton", "cublas"):
        raise ValueError(f"GemmOptions.dy must be None, 'triton' or 'cublas', got {opt.dy!r}")
    return opt.dy or ("triton" if t.is_cuda else "cublas")


def _adapter_impl(opt: GemmOptions, t: torch.Tensor) -> str:
    if opt.adapter not in ADAPTERS:
        raise ValueError(f"GemmOptions.adapter must be one of {ADAPTERS}, got {opt.adapter!r}")
    return opt.adapter or ("triton" if t.is_cuda else "torch")


class _GemmLoRAFunction(torch.autograd.Function):
    """y = x W^T + bias + scale * dropout(x) A^T B^T for one projection, its GEMMs on cuBLAS.

    Numerics are QLoRA's under bf16 autocast: the adapter runs in x's dtype (the fp32 master A
    and B cast once per call; 16-bit MMAs with fp32 accumulation), its output is rounded to x's
    dtype once (xa, (M, r)), and dA / dB come back in fp32 (fp32 accumulators, never rounded to
    16 bits). In fp32 everything is fp32.

    Forward, one Triton launch and one cuBLAS call: xa = scale/(1-p) (keep*x) A^T (one pass over
    x, the mask hashed, never stored) and Y = xa B^T (+ bias) by each row tile once its xa is done;
    in the same launch W dequantized to a dense copy (NF4), B cast to x's dtype and the backward's
    fp32 accumulators zeroed -> Y += x W^T (cuBLAS with beta = 1: the adapter's share rides in the
    base GEMM's epilogue).
    Saved: x, xa (M, r), B in x's dtype, the accumulators, the dropout keys (two ints), and W
    (see save_weight; else it is dequantized again).
    Backward, two Triton launches and one cuBLAS call: g = dY B (M, r) and dB = dY^T xa (fp32) in
    one pass over dY -> one pass over x writes T = scale/(1-p) keep * (g A) and accumulates
    dA = scale/(1-p) g^T (keep*x) -> dX = T + dY W (cuBLAS, beta = 1). On this path the host, not
    the GPU, sets the pace of a lone layer (tens of us per launch), hence the folded launches.
    GemmOptions names the variants.
    """

    @staticmethod
    def forward(ctx, x, a, b, spec: _GemmSpec):
        # x (..., K) is flattened here rather than by the caller: views made inside the Function
        # add no autograd nodes (each costs the backward's host time).
        ctx.x_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
        opt = spec.options
        dtype = x2.dtype
        impl = _adapter_impl(opt, x2)
        down_scale = spec.scale * _inv_keep(spec.p)
        keep = None
        da_acc = g_acc = db_acc = None  # the backward's zeroed fp32 accumulators: dA (r, K), g (M, r), dB (N, r)
        bias = None if spec.base.bias is None else spec.base.bias.to(dtype)
        # y in x's leading shape, filled through a 2-D view: the output is not itself a view (an
        # autograd.Function's view outputs refuse in-place ops downstream).
        y = x2.new_empty((*ctx.x_shape[:-1], b.shape[0]))
        y2 = y.view(-1, b.shape[0])  # (M, N)
        y_done = False  # y = xa B^T (+ bias) already written by the Triton launch
        if impl == "triton":  # one launch: xa, y = xa B^T, B cast, the accumulators zeroed, W dequantized
            nf4 = spec.base.weight if spec.base.is_nf4 else None
            r, (M, K), N = a.shape[0], x2.shape, b.shape[0]
            shapes = [(r, K), (M, r), (N, r)] if _dy_impl(opt, x2) == "triton" else [(r, K)]
            sizes = [rows * cols for rows, cols in shapes]
            y_done = opt.adapter_first and opt.y_in_down
            xa, b_c, acc, w = _launch_adapter_down(x2, a.contiguous(), spec.keys, spec.p, down_scale, b=b.contiguous(),
                                                   workspace=sum(sizes), nf4=nf4, y=y2 if y_done else None,
                                                   bias=bias if y_done else None)  # (M, r), (N, r)
            views = [t.view(shape) for t, shape in zip(acc.split(sizes), shapes)]
            if len(views) == 3:
                da_acc, g_acc, db_acc = views
            else:
                (da_acc,) = views
            if w is None:
                w = spec.base.dense(dtype)  # (N, K)
        else:
            w = spec.base.dense(dtype)  # (N, K)
            if impl == "torch":
                xa = _adapter_down_torch(x2, a, spec.keys, spec.p, down_scale)
            else:  # torch_mask: torch's own dropout, its mask kept (M x K bytes) for the backward
                xk = x2
                if spec.p > 0:
                    keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - spec.p)
                    xk = x2 * keep
                xa = torch.mm(xk, (a * down_scale).to(dtype).t())
            b_c = b.to(dtype)  # (N, r)
        if y_done:  # the launch wrote xa B^T (+ bias): only the base GEMM is left
            y2.addmm_(x2, w.t())
        else:
            b_t = b_c.t()
            first, second = ((xa, b_t), (x2, w.t())) if opt.adapter_first else ((x2, w.t()), (xa, b_t))
            if bias is None:
                torch.mm(*first, out=y2)
            else:
                torch.addmm(bias, *first, out=y2)
            y2.addmm_(*second)
        ctx.spec = spec
        ctx.acc_fresh = True  # the zeroed accumulators serve one backward (retain_graph: later ones re-zero them)
        save_w = opt.save_weight
        if save_w is None:  # free for a dense base already in x's dtype (w is the weight itself)
            save_w = w.numel() <= x2.numel() or w is spec.base.weight
        ctx.save_for_backward(x2, xa, a, b, b_c, w if save_w else None, keep, da_acc, g_acc, db_acc)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a, b, b_c, w, keep, da_acc, g_acc, db_acc = ctx.saved_tensors
        spec = ctx.spec
        opt = spec.options
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()  # (M, N)
        dtype = x2.dtype
        impl = _adapter_impl(opt, x2)
        g = db = None
        if not ctx.acc_fresh:  # a second backward through this graph (retain_graph=True)
            for t in (da_acc, g_acc, db_acc):
                if t is not None:
                    t.zero_()
        ctx.acc_fresh = False
        if _dy_impl(opt, x2) == "triton":  # g (fp32) and dB from one pass over dY
            g, db = _launch_dy([dy], b.contiguous(), xa, [1.0], a.shape[0], dy_native_config(dy.shape[1]),
                               native=True, g=g_acc, db=db_acc)
        else:
            if need_x or need_a:
                g = torch.mm(dy, b_c)  # (M, r)
            if need_b:
                db = _mm_f32(dy.t(), xa)  # (N, r) fp32
        g_scale = spec.scale * _inv_keep(spec.p)
        if impl == "torch_mask":
            adapter_dx = _adapter_dx_mask
            a_arg = keep  # the stored mask instead of the keys
        else:
            adapter_dx = _launch_adapter_dx if impl == "triton" else _adapter_dx_torch
            a_arg = spec.keys
        extra = {"da": da_acc} if need_a and da_acc is not None else {}
        dx = da = None
        if need_x:
            if w is None:
                w = spec.base.dense(dtype)
            dx = x2.new_empty(ctx.x_shape)  # filled through a 2-D view, as y
            dx2 = dx.view(x2.shape)
            if opt.adapter_first:
                da = adapter_dx(x2, g, a.contiguous(), a_arg, spec.p, g_scale, dx2, False, need_a, **extra)
                dx2.addmm_(dy, w)
            else:
                torch.mm(dy, w, out=dx2)
                da = adapter_dx(x2, g, a.contiguous(), a_arg, spec.p, g_scale, dx2, True, need_a, **extra)
        elif need_a:
            da = adapter_dx(x2, g, a.contiguous(), a_arg, spec.p, g_scale, None, False, True, **extra)
        return (dx, da.to(a.dtype) if need_a else None, db.to(b.dtype) if need_b else None, None)


def _adapter_dx_mask(x2, g, a, keep, p, g_scale, t=None, accum=False, need_da=True):
    """`_launch_adapter_dx` in PyTorch ops with a stored bool mask `keep` (None: no dropout)."""
    gs = (g * g_scale).to(x2.dtype)  # (M, r)
    if t is not None:
        term = torch.mm(gs, a.to(x2.dtype)) if accum else torch.mm(gs, a.to(x2.dtype), out=t)  # (M, K)
        if keep is not None:
            term.mul_(keep)
        if accum:
            t.add_(term)
    if not need_da:
        return None
    return _mm_f32(gs.t(), x2 if keep is None else x2 * keep)


def lora_gemm(x: torch.Tensor, base: "Base", a: torch.Tensor, b: torch.Tensor, scale: float, p: float,
              keys, options: GemmOptions | None = None) -> torch.Tensor:
    """The GEMM path for one projection: x (..., K) in the compute dtype -> (..., N).
    keys: the projection's dropout key pair (`key_pair`'s forms; CPU keys cost no sync)."""
    pair = key_pair(keys) if p > 0 else (0, 0)
    spec = _GemmSpec(base, float(scale), float(p), pair, options or GEMM_OPTIONS)
    return _GemmLoRAFunction.apply(x, a, b, spec)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


@dataclass
class _Spec:
    bases: list
    scales: list
    p: float
    keys: torch.Tensor  # (S, 2) int32 dropout keys (unused when p == 0)
    r: int


class _LoRAFunction(torch.autograd.Function):
    """ys = [x W_s^T + b_s + scale_s * dropout_s(x) A_s^T B_s^T]; gradients for x, A_s, B_s only."""

    @staticmethod
    def forward(ctx, x2, spec: _Spec, *ab):
        a_list, b_list = ab[0::2], ab[1::2]
        a_cat = torch.cat(a_list) if len(a_list) > 1 else a_list[0].contiguous()  # (S*r, K)
        b_cat = torch.cat(b_list) if len(b_list) > 1 else b_list[0].contiguous()  # (sum N, r)
        biases = [b.bias for b in spec.bases]
        bias_cat = None
        if any(bias is not None for bias in biases):
            bias_cat = torch.cat([bias if bias is not None else x2.new_zeros(b.out_features)
                                  for bias, b in zip(biases, spec.bases)])
        xa = _launch_down(x2, a_cat, spec.keys, spec.scales, spec.p, spec.r)
        ys = _launch_fwd(x2, xa, b_cat, bias_cat, spec.bases, spec.r)
        ctx.spec = spec
        ctx.ab_dtypes = [t.dtype for t in ab]
        ctx.save_for_backward(x2, xa, a_cat, b_cat)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa, a_cat, b_cat = ctx.saved_tensors
        spec = ctx.spec
        S, r = len(spec.bases), spec.r
        dys = [dy.contiguous() for dy in dys]
        g, db_cat = _launch_dy(dys, b_cat, xa, spec.scales, r)
        if ctx.needs_input_grad[0]:  # dX, with dA from the same launch's epilogue
            dx, da_cat = _launch_dx(dys, spec.bases, g, a_cat, spec.keys, spec.p, r, x2)
        else:  # no dX (the first layer's input): dA from its own pass over x
            dx, da_cat = None, _launch_da(x2, g, spec.keys, spec.p, r, S)
        grads = []
        for s, (da, db) in enumerate(zip(da_cat.split(r), db_cat.split([b.out_features for b in spec.bases]))):
            grads += [da.to(ctx.ab_dtypes[2 * s]), db.to(ctx.ab_dtypes[2 * s + 1])]
        grads = [gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[2:])]
        return (dx, None, *grads)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def lora_reference(x: torch.Tensor, bases: list, As: list, Bs: list, scales: list, p: float = 0.0,
                   keys: torch.Tensor | None = None, base_backend: str = "reference") -> list[torch.Tensor]:
    """The PyTorch reference of `lora_forward` (same dropout mask), differentiable by autograd.

    x (..., K) in the compute dtype; the adapter branch runs in fp32 (as PEFT does with fp32
    adapters) and is added to the base output in the compute dtype. base_backend None lets an NF4
    base take its Triton GEMV on CUDA (the few-row path of `lora_forward`).
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    ys = []
    for s, (base, a, b, scale) in enumerate(zip(bases, As, Bs, scales)):
        y = base.matmul(x2, base_backend)
        xd = x2.float()
        if p > 0:
            keep = dropout_keep_reference(keys[s], x2.shape[0], K, p, x2.device)
            xd = torch.where(keep, xd / (1.0 - p), 0.0)
        lora = F.linear(F.linear(xd, a.float()), b.float()) * scale
        ys.append((y + lora.to(y.dtype)).reshape(*x.shape[:-1], -1))
    return ys


BACKENDS = ("cublas", "triton", "reference")
CUDA_BACKEND = "cublas"  # what backend=None runs on CUDA tensors (CPU tensors: "reference")


def _decoding(x: torch.Tensor, backend: str | None) -> bool:
    """backend None and at most SMALL_M rows: the call takes the NF4 GEMV and the PyTorch adapter."""
    return backend is None and x.numel() // x.shape[-1] <= SMALL_M


def _resolve_backend(x: torch.Tensor, backend: str | None) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend or (CUDA_BACKEND if x.is_cuda else "reference")


def lora_forward(x: torch.Tensor, bases: list, As: list, Bs: list, scales: list, p: float = 0.0,
                 keys: torch.Tensor | None = None, backend: str | None = None,
                 options: GemmOptions | None = None) -> list[torch.Tensor]:
    """[base_s(x) + scale_s * (dropout_s(x) A_s^T) B_s^T] for 1 to 3 projections sharing x.

    x (..., K); bases: `Base` list (all NF4 or all dense); As (r, K), Bs (N_s, r), one rank r.
    p: dropout probability (0 in eval); keys: (S, 2) int32 dropout keys, drawn from torch's CPU
    generator when None. The GEMM path reads them on the host (CUDA keys cost it a sync), the fused
    kernels from x's device (CPU keys are copied there).
    Outputs are (..., N_s) in x's dtype; the kernels run in the bases' compute dtype.

    backend: "cublas" (the GEMM path, `_GemmLoRAFunction`: one projection at a time, variant
    `options` or GEMM_OPTIONS), "triton" (the fused kernels, `_LoRAFunction`: all projections in
    one launch per step), "reference" (`lora_reference`), or None: CUDA_BACKEND on CUDA tensors,
    except that at most SMALL_M rows (decoding) take the reference with the NF4 GEMV for the base;
    "reference" on CPU tensors. Explicit backends run on CPU too (Triton through the interpreter).
    """
    S = len(bases)
    if not 1 <= S <= MAX_SEGMENTS or not len(As) == len(Bs) == len(scales) == S:
        raise ValueError(f"lora_forward takes 1 to {MAX_SEGMENTS} projections with one A, B and scale each")
    K = x.shape[-1]
    r = As[0].shape[0]
    for base, a, b in zip(bases, As, Bs):
        if base.in_features != K or tuple(a.shape) != (r, K) or tuple(b.shape) != (base.out_features, r):
            raise ValueError(f"lora_forward: x has {K} features, base {tuple(base.weight.shape)}, "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}: shapes disagree (one rank for all)")
    if len({b.is_nf4 for b in bases}) > 1:
        raise ValueError("lora_forward: the projections must all be NF4 or all dense")
    path = _resolve_backend(x, backend)
    dtype = bases[0].dtype_for(x)
    xc = x.to(dtype)
    if p > 0 and keys is None:  # on the CPU on every path, so one seed gives one mask on all of them
        keys = new_dropout_keys(S, "cpu")
    if keys is None:
        keys = torch.zeros((S, 2), dtype=torch.int32)
    if path == "reference" or x.numel() == 0:
        ys = lora_reference(xc, bases, As, Bs, scales, p, keys)
    elif _decoding(x, backend):
        # Decoding: a few rows. The NF4 GEMV reads W faster than a GEMM tile can; the adapter's two
        # skinny matmuls are negligible there.
        ys = lora_reference(xc, bases, As, Bs, scales, p, keys, base_backend=None)
    elif path == "cublas":
        ys = [lora_gemm(xc, base, a, b, scale, p, keys[s], options)
              for s, (base, a, b, scale) in enumerate(zip(bases, As, Bs, scales))]
    else:
        x2 = xc.reshape(-1, K).contiguous()
        spec = _Spec(list(bases), [float(s) for s in scales], float(p), keys.to(x.device), r)
        ab = [t for pair in zip(As, Bs) for t in pair]
        ys = _LoRAFunction.apply(x2, spec, *ab)
        ys = [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]
    return [y.to(x.dtype) for y in ys]


def _layer_args(layer):
    p = layer.dropout_p if layer.training else 0.0
    return base_of(layer.base), layer.lora_A.weight, layer.lora_B.weight, layer.scale, p


def lora_linear(x: torch.Tensor, layer, backend: str | None = None, keys: torch.Tensor | None = None,
                options: GemmOptions | None = None) -> torch.Tensor:
    """y = layer(x) for a LoRALinear `layer` (base nn.Linear or NF4Linear), x (..., K).

    Dropout applies in training mode (layer.training); its mask comes from `keys` (1, 2) or fresh
    keys. The entry point LoRALinear's forward calls on CUDA tensors (backend: see lora_forward).
    """
    base, a, b, scale, p = _layer_args(layer)
    if _resolve_backend(x, backend) == "cublas" and x.numel() and not _decoding(x, backend):
        # One projection on the GEMM path: straight to its autograd Function. lora_forward's list
        # handling and checks cost host time on every call, and a layer's shapes are fixed.
        if x.shape[-1] != base.in_features:
            raise ValueError(f"lora_linear: x has {x.shape[-1]} features in its last dimension, the layer takes "
                             f"{base.in_features}: pass inputs of shape (..., {base.in_features})")
        if p > 0 and keys is None:
            keys = new_dropout_keys(1, "cpu")
        return lora_gemm(x.to(base.dtype_for(x)), base, a, b, scale, p, keys, options).to(x.dtype)
    return lora_forward(x, [base], [a], [b], [scale], p, keys, backend, options)[0]


def lora_qkv(x: torch.Tensor, q_layer, k_layer, v_layer, backend: str | None = None,
             keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_layer(x), k_layer(x), v_layer(x)); with backend "triton", one fused launch per step
    that reads x once (the "cublas" backend runs the three projections one after the other).

    Each projection keeps its own dropout mask (keys (3, 2)). Layers that cannot share a launch
    (merged, different ranks or dropout, NF4 mixed with dense) run one by one.
    """
    layers = (q_layer, k_layer, v_layer)
    args = [_layer_args(layer) for layer in layers]
    same = (not any(layer.merged for layer in layers)
            and len({a.shape[0] for _, a, _, _, _ in args}) == 1
            and len({p for *_, p in args}) == 1
            and len({base.is_nf4 for base, *_ in args}) == 1
            and len({base.dtype_for(x) for base, *_ in args}) == 1)
    if not same:
        return tuple(layer(x) for layer in layers)
    bases, As, Bs, scales, ps = zip(*args)
    return tuple(lora_forward(x, list(bases), list(As), list(Bs), list(scales), ps[0], keys, backend))
