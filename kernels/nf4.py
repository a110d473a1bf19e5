"""NF4 4-bit weights, bitsandbytes-compatible, and the Triton kernels that compute with them.

Format (equal byte for byte to `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4",
blocksize=64, compress_statistics=True)`): the weight W (N, K) = (out, in) is flattened row-major
into blocks of 64 elements. Each element is scaled by 1/absmax of its block and stored as the
index of the nearest of 16 NF4 values (ties to the lower code), two per byte, element 2j in the
high nibble. The fp32 absmax values are themselves quantized ("double quant"): offset = mean(absmax),
(absmax - offset) in blocks of 256 with the signed dynamic 8-bit map, one fp32 absmax2 per 256 blocks.
Dequantized, element e of W is

    W[e] = QMAP[code(e)] * (CODE2[absmax_q[e // 64]] * absmax2[e // 16384] + offset)

computed in fp32 (two roundings, no fused multiply-add) and then cast to the compute dtype.
Sizes that are not multiples of 64 end in a partial block; an odd element count pads one nibble.

Kernels (each beside a pure-PyTorch reference; CUDA tensors take Triton, CPU tensors the reference):
  dequantize_nf4   one launch, double quant included              (`dequantize_nf4_reference`)
  nf4_gemv         Y = X W^T for M <= 64 rows (decoding), W read once, split-K over fp32 atomics
                   when N alone gives too few programs. Two kernels: "fma" (1-4 rows, CUDA cores:
                   per weight a shift, a mask, a shared-memory gather and one FMA per row) and "mma"
                   (rows padded to 16-64 for the tensor cores). Both round the NF4 value, not
                   NF4 value * absmax, to the compute dtype and scale each 64-column group's partial
                   sum by its absmax: an error of the same size as rounding the dequantized weight.
                   The fma kernel's loop, `nf4_rows_loop`, also serves kernels/moe.py's row kernels.
  nf4_gemm         Y = X W^T, W dequantized tile by tile in registers (the fused GEMM)
  nf4_gemm_dx      dX = dY W, the backward of the same family (the base is frozen: no dW)
  nf4_matmul       autograd entry point (`nf4_matmul_reference`) with a measured policy by rows M:
                   M <= GEMV_ROWS (64): nf4_gemv; M >= DENSE_MIN_ROWS (65): dequantize W into a
                   transient bf16 copy of this one weight (freed after the call) and call cuBLAS,
                   forward and dX alike; in between (none by default): the fused GEMM. The fused
                   kernel re-dequantizes each weight element once per BLOCK_M rows of X; on Hopper
                   that ALU work costs more than the HBM traffic of one dense copy saves (see the
                   policy's comment below and benchmarks/NOTES.md).

Lookups: the 16 NF4 values sit in shared memory (`tl.gather` from a 16-entry fp32 table: one
wavefront per warp, no bank conflicts, 32-bit addresses); codes come from int32 words of the
packed bytes (`_nf4_word_codes`: shifts and masks, eight codes per word). The first kernels
gathered both values of a byte from a 2 KB table in global memory: a warp's gather touched ~14
cache lines, and that L1 traffic, not HBM, bounded every kernel.

Contract of the tile-dequant helper `nf4_dequant_tile`, for other kernels' fused GEMMs
(kernels/lora.py, the MoE kernels):

    w = nf4_dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr,
                         offs_n, k_start, N, K, BLOCK_N, BLOCK_K, K_ALIGNED)

  - returns W[offs_n, k_start : k_start + BLOCK_K] as fp32, shape (BLOCK_N, BLOCK_K); cast it to the
    dot dtype yourself. Elements outside the (N, K) weight come out exactly 0.0 (masked loads read
    NF4 code 7, which is zero), so the tile can go straight into tl.dot.
  - the six pointers are `NF4Tensor.tensors()` in order: packed, absmax, absmax2, code2, offset (a
    0-d fp32 tensor, read in-kernel so no host sync) and the byte table `nf4_pairs` (256 int64:
    the fp32 bits of NF4[b >> 4] in the low and of NF4[b & 15] in the high word of entry b; the
    helpers read NF4[c] from the high words of entries 0..15, `nf4_nibble`).
  - offs_n: (BLOCK_N,) int row indices (output features); k_start: a multiple of BLOCK_K.
  - K_ALIGNED (constexpr) = K % 64 == 0: each row then starts on a word and block boundary and the
    helper loads BLOCK_K // 8 contiguous int32 words per row (so w_ptr must be 4-byte aligned, as
    every torch allocation is) and one absmax per 64 columns; BLOCK_K must be a power of 2 >= 16.
    Otherwise it gathers per element (correct for any K, slower). It uses a 64-byte shared-memory
    scratch for the lookup table (tl.gather) in the aligned case.
  - for bit-parity with bitsandbytes launch the kernel with enable_fp_fusion=False; with fusion
    the absmax dequant may become an FMA and differ by one ulp.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv, next_power_of_2

BLOCKSIZE = 64  # elements per absmax
NESTED_BLOCKSIZE = 256  # absmax values per absmax2

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalized to [-1, 1].
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values, fp32, sorted ascending (code 7 is exactly 0)."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): 256 fp32 values.

    For exponent i = 0..6 the values +-10^(i-6) * m, where m runs over the 2^i midpoints of
    linspace(0.1, 1, 2^i + 1); then 0 and 1.0. All arithmetic in fp32, as bnb does it.
    """
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10 ** (i - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _pair_table(device: str) -> torch.Tensor:
    """(256,) int64: entry b holds the fp32 bits of NF4[b >> 4] (low half) and NF4[b & 15] (high)."""
    bits = nf4_code().view(torch.int32)
    b = torch.arange(256)
    return torch.stack([bits[b >> 4], bits[b & 15]], dim=1).view(torch.int64).view(-1).to(device)


def nf4_pairs(device) -> torch.Tensor:
    """(256,) int64: the two exact fp32 NF4 values of each byte, the table the kernels take. Its
    first 16 entries (bytes 0x00..0x0f, one 128-byte line) hold NF4[c] in their high halves: the
    kernels read only those (`nf4_nibble`)."""
    return _pair_table(str(device))


@functools.lru_cache(maxsize=None)
def nf4_half_pairs(device: str, dtype: torch.dtype) -> torch.Tensor:
    """(256,) int32: entry b holds NF4[b >> 4] (the even element) in its low and NF4[b & 15] in its
    high half, each as a 16-bit `dtype` (bf16/fp16): one register of both values of a packed byte,
    the table of the MoE decode kernels and of kernels/nf4_tc.py's MMA operands."""
    bits = torch.tensor(NF4_VALUES, dtype=torch.float32).to(dtype).view(torch.int16)
    b = torch.arange(256)
    return torch.stack([bits[b >> 4], bits[b & 15]], dim=1).view(torch.int32).view(-1).to(device)


@dataclass
class NF4Tensor:
    """A weight in NF4 with double quant, laid out as bitsandbytes lays it out.

    packed (ceil(n/2),) uint8; absmax (ceil(n/64),) uint8 codes into code2; absmax2
    (ceil(n/64/256),) fp32; code2 (256,) fp32; offset () fp32; qmap (16,) fp32. shape and dtype
    are the original weight's (the dtype bnb's dequantize returns by default).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor
    code2: torch.Tensor
    offset: torch.Tensor
    qmap: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.qmap)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The six kernel arguments: packed, absmax, absmax2, code2, offset, nf4_pairs(device).

        The kernels read the codes as int32 words: codes that do not start on a 4-byte boundary
        (a view at an odd offset into a larger buffer) are copied for the call, with a warning."""
        packed = self.packed
        if packed.data_ptr() % 4:
            warnings.warn("NF4 codes not 4-byte aligned (a view at an odd offset?): copying them for every kernel "
                          "call; store them in their own tensor (.clone()) to avoid the copy", stacklevel=2)
            packed = packed.clone()
        return (packed, self.absmax, self.absmax2, self.code2, self.offset, nf4_pairs(self.device))

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(*(t.to(device) for t in self.fields()), shape=self.shape, dtype=self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)


# ----------------------------------------------------------------------------------------------
# Quantization (torch code: runs on CPU or CUDA, the same bytes on both)
# ----------------------------------------------------------------------------------------------

_CHUNK = 1 << 22  # elements quantized at a time: bounds the temporaries for 14336x4096 weights


def _quantize_4bit_chunk(a: torch.Tensor, qmid: torch.Tensor, tail: bool):
    """Codes (int32) and absmax (fp32) of a flat fp32 chunk, as bnb's default quantize_4bit op.

    Full blocks scale by a reciprocal, the partial tail block divides; a zero block scales by
    1/1e-38 (its stored absmax stays 0, a zero tail stores 1e-38). Both as bnb does.
    """
    n = a.numel()
    full = n - n % BLOCKSIZE if tail else n
    blocks = a[:full].view(-1, BLOCKSIZE)  # (B, 64)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).view(-1)
    if full < n:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    # Nearest code, ties to the lower one: bucketize puts x == midpoint in the lower bucket.
    return torch.bucketize(scaled, qmid, out_int32=True), absmax


@functools.lru_cache(maxsize=None)
def _absmax_lut(device: str) -> torch.Tensor:
    """bnb's CPU quantize_blockwise table: 65536 bins over [-1, 1] -> nearest code2 index.

    Bin i stands for -1 + 2i/65535 (fp32); its code is the number of code2 midpoints below it.
    """
    code2 = dynamic_map(device)
    mid = 0.5 * (code2[:-1] + code2[1:])
    centers = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535
    return torch.searchsorted(mid, centers, side="left").to(torch.uint8)


def _quantize_absmax(x: torch.Tensor):
    """Blockwise (256) 8-bit quantization of fp32 values, as bnb 0.50's CPU quantize_blockwise.

    Scale by the fp32 reciprocal of the block absmax, then look the value up in a 65536-bin table
    (nearest code of the bin, not of the value: that is bnb's choice, kept for byte parity).
    A block of zeros stores code 0.
    """
    n = x.numel()
    nblk = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(x, (0, nblk * NESTED_BLOCKSIZE - n)).view(nblk, -1)  # (B2, 256)
    absmax2 = padded.abs().amax(dim=1)  # (B2,)
    inv = 1.0 / absmax2
    v = torch.clamp(padded * inv.view(-1, 1), -1, 1)
    bins = ((v + 1.0) * 0.5 * 65535 + 0.5).to(torch.int32)  # truncation, as the C cast
    codes = _absmax_lut(str(x.device))[torch.where(absmax2.view(-1, 1) == 0, 0, bins).long()]
    return codes.view(-1)[:n], absmax2


@torch.no_grad()
def quantize_nf4(w: torch.Tensor) -> NF4Tensor:
    """Quantize a float tensor (fp32/fp16/bf16, any shape) to NF4 with double quant.

    Equals bitsandbytes' quantize_4bit(w, quant_type="nf4", blocksize=64,
    compress_statistics=True) on CPU byte for byte. Works chunk by chunk on w's device, so a
    large weight needs little more than its own memory.
    """
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quantize_nf4 takes fp32/fp16/bf16 weights, got {w.dtype}")
    device = w.device
    flat = w.detach().reshape(-1)
    n = flat.numel()
    qmap = nf4_code(device)
    qmid = (qmap[:-1] + qmap[1:]) / 2
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // BLOCKSIZE), dtype=torch.float32, device=device)
    for start in range(0, n, _CHUNK):  # _CHUNK is a multiple of 64: chunks hold whole blocks
        stop = min(start + _CHUNK, n)
        codes, am = _quantize_4bit_chunk(flat[start:stop].float(), qmid, tail=stop == n)
        if codes.numel() % 2:
            codes = torch.nn.functional.pad(codes, (0, 1), value=7)  # pads 0.0 -> code 7, as bnb
        pairs = codes.to(torch.uint8).view(-1, 2)
        packed[start // 2 : start // 2 + pairs.shape[0]] = (pairs[:, 0] << 4) | pairs[:, 1]
        absmax[start // BLOCKSIZE : start // BLOCKSIZE + am.numel()] = am
    offset = absmax.mean()
    code2 = dynamic_map(device)
    absmax_q, absmax2 = _quantize_absmax(absmax - offset)
    return NF4Tensor(packed, absmax_q, absmax2, code2, offset, qmap, w.shape, w.dtype)


# ----------------------------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------------------------


def _absmax_reference(q: NF4Tensor) -> torch.Tensor:
    """fp32 absmax per 64-block: code2[absmax_q] * absmax2, then + offset (two roundings)."""
    nblk = q.absmax.numel()
    scaled = q.code2[q.absmax.long()]
    nested = torch.nn.functional.pad(scaled, (0, q.absmax2.numel() * NESTED_BLOCKSIZE - nblk))
    absmax = (nested.view(-1, NESTED_BLOCKSIZE) * q.absmax2.view(-1, 1)).view(-1)[:nblk]
    return absmax + q.offset


def dequantize_nf4_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W in `dtype` (default: q.dtype); equals bitsandbytes' dequantize_4bit."""
    n = q.numel()
    nblk = q.absmax.numel()
    vals = nf4_pairs(q.device)[q.packed.long()].view(torch.float32)  # (2 * bytes,) in element order
    if vals.numel() != nblk * BLOCKSIZE:  # a partial last block
        vals = torch.nn.functional.pad(vals, (0, nblk * BLOCKSIZE - vals.numel()))
    vals = vals.view(nblk, BLOCKSIZE) * _absmax_reference(q).view(-1, 1)  # fp32, as bnb
    return vals.view(-1)[:n].to(dtype or q.dtype).view(q.shape)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W (q.shape) in `dtype` (default q.dtype): Triton on CUDA, the reference elsewhere."""
    if q.packed.is_cuda:
        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4_reference(q, dtype)


# ----------------------------------------------------------------------------------------------
# Triton: shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask):
    """fp32 absmax of 64-blocks `blk` (any shape): code2[absmax_q] * absmax2 + offset."""
    a_q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
    a2 = tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
    return tl.load(code2_ptr + a_q) * a2 + tl.load(offset_ptr)


@triton.jit
def nf4_nibble(pairs_ptr, code):
    """fp32 NF4[code] for 4-bit codes (any shape, any int type), from the pair table's first line.

    Entry c < 16 of the pair table is byte 0x0c, so its high word is NF4[c]: those 16 words lie in
    one 128-byte line (the table is 512-byte aligned), so a warp's gather is one L1 wavefront. A
    gather over all 256 entries touches ~14 lines of the 2 KB table, which made it the kernels'
    bottleneck.
    """
    words = pairs_ptr.to(tl.pointer_type(tl.float32))
    return tl.load(words + 2 * code.to(tl.int32) + 1)


@triton.jit
def nf4_byte_values(pairs_ptr, packed):
    """Both fp32 values of each packed byte, (..., 2): NF4[high nibble] (the even element) first."""
    return tl.join(nf4_nibble(pairs_ptr, packed >> 4), nf4_nibble(pairs_ptr, packed & 0xF))


@triton.jit
def nf4_dequant_tile(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr,
    offs_n, k_start, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_ALIGNED: tl.constexpr, EVEN: tl.constexpr = False,
):
    """W[offs_n, k_start:k_start+BLOCK_K] as fp32 (BLOCK_N, BLOCK_K); see the module docstring.

    EVEN (optional): the caller guarantees the tile lies inside W (N % BLOCK_N == 0, K_ALIGNED and
    K % BLOCK_K == 0), so the weight loads go unmasked (a third fewer instructions per element).
    """
    rows = offs_n.to(tl.int64)
    n_mask = offs_n < N
    if K_ALIGNED:
        # Row n holds K // 8 int32 words (4-byte aligned, as K % 64 == 0) and K // 64 blocks; the
        # tile's words are contiguous per row. Codes go through a shared-memory gather from the
        # 16 NF4 values (one wavefront per warp, no bank conflicts, no 64-bit address math).
        row_words = (K // 64) * 8
        offs_w = (k_start // BLOCK_K) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)  # aligned
        w_tile = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * row_words + offs_w[None, :]
        if EVEN:
            words = tl.load(w_tile)
        else:
            words = tl.load(w_tile, mask=n_mask[:, None] & (offs_w[None, :] < row_words), other=0x77777777)
        vals = _nf4_row_values(_nf4_nibble_table(pairs_ptr), words, BLOCK_N, BLOCK_K)  # element order
        # (if/else, never an early return: Triton compiles the code after a return too)
        if BLOCK_K <= 64:  # the tile lies in one quant block per row
            blk = rows * (K // 64) + k_start // 64
            scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, n_mask)  # (BN,)
            tile = vals * scale[:, None]
        else:
            offs_g = k_start // 64 + tl.arange(0, BLOCK_K // 64)
            g_mask = n_mask[:, None] & (offs_g[None, :] < K // 64)
            scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                               rows[:, None] * (K // 64) + offs_g[None, :], g_mask)  # (BN, BK // 64)
            tile = tl.reshape(tl.reshape(vals, (BLOCK_N, BLOCK_K // 64, 64)) * scale[:, :, None],
                              (BLOCK_N, BLOCK_K))
    else:
        # Any K: element e = n * K + k; its byte e // 2 (high nibble if e is even), block e // 64.
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k[None, :] < K)
        e = rows[:, None] * K + offs_k[None, :]
        packed = tl.load(w_ptr + e // 2, mask=mask, other=0x77)
        code = tl.where(e % 2 == 0, packed >> 4, packed & 0xF)
        tile = nf4_nibble(pairs_ptr, code) * nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, e // 64, mask)
    return tile


# ----------------------------------------------------------------------------------------------
# Kernel 1: dequantize (double quant included, one launch)
# ----------------------------------------------------------------------------------------------


@triton.jit
def nf4_dequant_blocks(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, out_ptr, pid,
    n_elements, n_bytes, n_blocks, BLOCKS: tl.constexpr, EVEN: tl.constexpr,
):
    """Program pid's share of a dequant: BLOCKS quant blocks = BLOCKS x 32 bytes in, BLOCKS x 64
    values out (one NF4 tensor of n_elements; `out_ptr` in its element order).

    4-byte loads: a thread's 4 bytes become 8 values = one 16-byte store, so the loaded and the
    stored layout are the same one (16-byte loads made Triton convert layouts through shared
    memory). The lookups read the table's first 128-byte line (nf4_nibble): L1 hits, one wavefront
    a warp. EVEN: every block of the launch is whole and inside the tensor (no masks).
    """
    blk = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (R,)
    offs_b = blk[:, None] * 32 + tl.max_contiguous(tl.arange(0, 32), 4)[None, :]  # (R, 32)
    offs_e = blk[:, None] * 64 + tl.arange(0, 64)[None, :]  # (R, 64)
    if EVEN:
        packed = tl.load(w_ptr + offs_b)
        scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk >= 0)
    else:
        packed = tl.load(w_ptr + offs_b, mask=offs_b < n_bytes, other=0x77)
        scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, blk < n_blocks)
    hi = nf4_nibble(pairs_ptr, packed >> 4) * scale[:, None]  # (R, 32) fp32, elements 2j
    lo = nf4_nibble(pairs_ptr, packed & 0xF) * scale[:, None]  # elements 2j + 1
    vals = tl.reshape(tl.join(hi, lo), (BLOCKS, 64)).to(out_ptr.dtype.element_ty)
    if EVEN:
        tl.store(out_ptr + offs_e, vals)
    else:
        tl.store(out_ptr + offs_e, vals, mask=offs_e < n_elements)


@triton.jit
def _nf4_dequant_kernel(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, out_ptr,
    n_elements, n_bytes, n_blocks,
    BLOCKS: tl.constexpr, EVEN: tl.constexpr,
):
    nf4_dequant_blocks(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, out_ptr, tl.program_id(0),
                       n_elements, n_bytes, n_blocks, BLOCKS, EVEN)


def dequant_config(n: int) -> dict:
    """Blocks per program and warps of the dequant kernel (benchmarks/nf4.py sweeps these)."""
    return dict(blocks=64, num_warps=4)


def dequant_launch(n: int, blocks: int | None = None, num_warps: int | None = None) -> tuple[int, int, dict]:
    """(programs, quant blocks, launch options) of a dequant of n elements over `nf4_dequant_blocks`
    (defaults from `dequant_config`); shared by the single-tensor and the stacked-experts launchers."""
    c = dequant_config(n)
    blocks = blocks or c["blocks"]
    n_blocks = cdiv(n, BLOCKSIZE)
    meta = dict(BLOCKS=blocks, EVEN=n % (blocks * BLOCKSIZE) == 0, num_warps=num_warps or c["num_warps"],
                enable_fp_fusion=False)
    return cdiv(n_blocks, blocks), n_blocks, meta


def dequantize_nf4_triton(q: NF4Tensor, dtype: torch.dtype | None = None, *, blocks: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor:
    """Triton dequant: equal to dequantize_nf4_reference bit for bit."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    n = q.numel()
    if n:
        programs, n_blocks, meta = dequant_launch(n, blocks, num_warps)
        _nf4_dequant_kernel[(programs,)](*q.tensors(), out, n, q.packed.numel(), n_blocks, **meta)
    return out


# ----------------------------------------------------------------------------------------------
# Kernel 2: fused dequant-GEMM, Y = X W^T (forward) and dX = dY W (backward)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row tiles sharing each column sweep, so W tiles stay in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def _nf4_gemm_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    K_ALIGNED: tl.constexpr, EVEN: tl.constexpr, W_AS_A: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if W_AS_A:  # Y^T tile = W X^T: the dequantized tile feeds the MMA from registers
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        if EVEN:  # K % BLOCK_K == 0: only the rows past M need masking
            x = tl.load(x_rows + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = nf4_dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr,
                             offs_n, k_start, N, K, BLOCK_N, BLOCK_K, K_ALIGNED, EVEN).to(x.dtype)
        if W_AS_A:
            acc = tl.dot(w, tl.trans(x), acc=acc, input_precision=DOT_PRECISION)  # (BN, BM)
        else:
            acc = tl.dot(x, tl.trans(w), acc=acc, input_precision=DOT_PRECISION)  # (BM, BN)
    y_rows = y_ptr + offs_m.to(tl.int64) * stride_ym
    if W_AS_A:
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(y_rows[None, :] + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_rows[:, None] + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_gemm_dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, dx_ptr,
    M, N, K, stride_dym, stride_dxm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    K_ALIGNED: tl.constexpr, EVEN: tl.constexpr, W_AS_A: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Output tile dX[offs_m, offs_k]; the reduction runs over W's rows (N) in BLOCK_N steps.
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = pid_k * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    if W_AS_A:  # dX^T tile = W^T dY^T
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        if EVEN:  # N % BLOCK_N == 0: only the rows past M need masking
            dy = tl.load(dy_rows + offs_n[None, :], mask=offs_m[:, None] < M, other=0.0)
        else:
            dy = tl.load(dy_rows + offs_n[None, :], mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = nf4_dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr,
                             offs_n, k_start, N, K, BLOCK_N, BLOCK_K, K_ALIGNED, EVEN).to(dy.dtype)
        if W_AS_A:
            acc = tl.dot(tl.trans(w), tl.trans(dy), acc=acc, input_precision=DOT_PRECISION)  # (BK, BM)
        else:
            acc = tl.dot(dy, w, acc=acc, input_precision=DOT_PRECISION)  # (BM, BK)
    dx_rows = dx_ptr + offs_m.to(tl.int64) * stride_dxm
    if W_AS_A:
        mask = (offs_k[:, None] < K) & (offs_m[None, :] < M)
        tl.store(dx_rows[None, :] + offs_k[:, None], acc.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        tl.store(dx_rows[:, None] + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Kernel 3: skinny GEMM for decoding (M <= 64 rows), split-K; memory-bound by design
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nf4_nibble_table(pairs_ptr):
    """(16,) fp32 NF4 values; tl.gather on it reads shared memory (a 64-byte table, no bank conflicts)."""
    return nf4_nibble(pairs_ptr, tl.arange(0, 16))


@triton.jit
def _nf4_word_codes(words):
    """4-bit codes of int32 words of packed NF4, (..., W) -> (..., W, 8), in element order.

    Byte b of a word (little-endian) holds elements 2b (high nibble) and 2b + 1, so element t sits
    at bit 8 * (t // 2) + 4 * (1 - t % 2). tl.join adds the minor dimension, so the outermost join
    picks t's lowest bit: the nested joins lay the 8 codes out in element order, in-thread.
    """
    return tl.join(
        tl.join(tl.join((words >> 4) & 15, (words >> 20) & 15), tl.join((words >> 12) & 15, (words >> 28) & 15)),
        tl.join(tl.join(words & 15, (words >> 16) & 15), tl.join((words >> 8) & 15, (words >> 24) & 15)))


@triton.jit
def _nf4_row_values(table, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Unscaled NF4 values (BLOCK_N, BLOCK_K) fp32 of int32 words (BLOCK_N, BLOCK_K // 8)."""
    codes = tl.reshape(_nf4_word_codes(words), (BLOCK_N * BLOCK_K,))
    return tl.reshape(tl.gather(table, codes, 0), (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_decode_fma_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, y_ptr,
    N, K, stride_xm, stride_ym, K_PER_SPLIT,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, WORD_VEC: tl.constexpr, X_AHEAD: tl.constexpr,
):
    # CUDA cores, 1 to 4 tokens; K % 64 == 0 and BLOCK_K % 64 == 0. Program (pid_n, pid_k) streams
    # rows offs_n over one K slice in steps of BLOCK_K // 2 bytes per row, read as int32 words
    # (16-byte loads). Per weight element: a shift and a mask for its code, one shared-memory gather
    # from the 16-value table, one FMA per token; the absmax scales each 64-element group's partial
    # sum (one multiply per group, not per element); the groups are summed once, at the end.
    # WORD_VEC = 1 (4-byte loads, BLOCK_K = 256 * num_warps) makes the compiler lay the warps along K,
    # so x loads straight into the layout of the products (no shared-memory round trip per step);
    # WORD_VEC = 4 gives 16-byte loads and warps along N.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo = tl.program_id(1) * K_PER_SPLIT
    acc0, acc1, acc2, acc3 = nf4_rows_loop(
        w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, _nf4_nibble_table(pairs_ptr),
        x_ptr, x_ptr + stride_xm, x_ptr + 2 * stride_xm, x_ptr + 3 * stride_xm, offs_n, n_mask,
        k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), K, M, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, WORD_VEC, X_AHEAD)
    _store_row(y_ptr, offs_n, n_mask, acc0, ATOMIC)
    if M > 1:
        _store_row(y_ptr + stride_ym, offs_n, n_mask, acc1, ATOMIC)
    if M > 2:
        _store_row(y_ptr + 2 * stride_ym, offs_n, n_mask, acc2, ATOMIC)
    if M > 3:
        _store_row(y_ptr + 3 * stride_ym, offs_n, n_mask, acc3, ATOMIC)


@triton.jit
def nf4_rows_loop(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table, src0, src1, src2, src3, offs_n, n_mask,
    k_lo, k_hi, K, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, WORD_VEC: tl.constexpr, X_AHEAD: tl.constexpr = False,
):
    """The CUDA-core decode loop, shared by nf4_gemv's fma kernel and the MoE row kernels
    (kernels/moe.py): rows offs_n of one NF4 weight (K % 64 == 0) over columns k_lo..k_hi, times M
    (1-4) activation rows src0..src3 (any float dtype; the unused ones ignored). Returns four
    (BN, G) fp32 per-group partial sums (G = BLOCK_K // 64), one per row. table:
    `_nf4_nibble_table(pairs_ptr)`. X_AHEAD: load the activations one step ahead too, like the words
    (they come from L2; without it each step waits for them)."""
    rows = offs_n.to(tl.int64)
    row_words = (K // 64) * 8  # K % 64 == 0
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * row_words  # (BN, 1)
    offs_w = tl.max_contiguous(tl.arange(0, BLOCK_K // 8), WORD_VEC)
    offs_c = tl.arange(0, BLOCK_K)
    G: tl.constexpr = BLOCK_K // 64
    acc0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    # The next step's words are loaded before this step's math (a hand-made pipeline: Triton does
    # not pipeline loads that feed no dot), so each warp keeps a step of DRAM reads in flight.
    words = _load_words(w_rows, k_lo, offs_w, n_mask, row_words, EVEN_N, EVEN_K)  # k_lo < k_hi <= K
    x0, x1, x2, x3 = _rows_x(src0, src1, src2, src3, k_lo + offs_c, K, M, X_AHEAD)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        cur = words
        # the last step re-reads its own words (in bounds, no mask) instead of the next slice's
        words = _load_words(w_rows, tl.where(k_start + BLOCK_K < k_hi, k_start + BLOCK_K, k_start), offs_w, n_mask,
                            row_words, EVEN_N, EVEN_K)
        c0, c1, c2, c3 = x0, x1, x2, x3  # this step's activations when loaded ahead
        if X_AHEAD:
            x0, x1, x2, x3 = _rows_x(src0, src1, src2, src3, k_start + BLOCK_K + offs_c, K, M, True)
        vals = _nf4_row_values(table, cur, BLOCK_N, BLOCK_K)  # (BN, BK) fp32, unscaled
        offs_g = k_start // 64 + tl.arange(0, G)
        scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows[:, None] * (K // 64) + offs_g[None, :],
                           n_mask[:, None] & (offs_g[None, :] < K // 64))  # (BN, G)
        offs_k = k_start + offs_c
        acc0 = _row_step(acc0, vals, scale, c0, src0, offs_k, K, BLOCK_N, BLOCK_K, X_AHEAD)
        if M > 1:
            acc1 = _row_step(acc1, vals, scale, c1, src1, offs_k, K, BLOCK_N, BLOCK_K, X_AHEAD)
        if M > 2:
            acc2 = _row_step(acc2, vals, scale, c2, src2, offs_k, K, BLOCK_N, BLOCK_K, X_AHEAD)
        if M > 3:
            acc3 = _row_step(acc3, vals, scale, c3, src3, offs_k, K, BLOCK_N, BLOCK_K, X_AHEAD)
    return acc0, acc1, acc2, acc3


@triton.jit
def _row_x(src, offs_k, K):
    """(BK,) fp32 activations of one row at columns offs_k (zeros past K)."""
    return tl.load(src + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)


@triton.jit
def _rows_x(src0, src1, src2, src3, offs_k, K, M: tl.constexpr, LOAD: tl.constexpr):
    """`_row_x` of rows src0..src(M-1); zeros (never read) for rows past M, or all without LOAD."""
    x0 = tl.zeros(offs_k.shape, dtype=tl.float32)
    x1 = x0
    x2 = x0
    x3 = x0
    if LOAD:
        x0 = _row_x(src0, offs_k, K)
        if M > 1:
            x1 = _row_x(src1, offs_k, K)
        if M > 2:
            x2 = _row_x(src2, offs_k, K)
        if M > 3:
            x3 = _row_x(src3, offs_k, K)
    return x0, x1, x2, x3


@triton.jit
def _row_step(acc, vals, scale, x, src, offs_k, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              X_AHEAD: tl.constexpr):
    """acc (BN, G) + the group sums of vals * x, scaled; x is loaded here unless it came ahead."""
    if not X_AHEAD:
        x = _row_x(src, offs_k, K)
    return acc + nf4_group_dots(vals, x, BLOCK_N, BLOCK_K) * scale


@triton.jit
def _load_words(w_rows, k0, offs_w, n_mask, row_words, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """(BN, W) int32 words of columns k0 ... of rows w_rows (k0 < K); words past K, or of rows
    past N, read 0x77777777: code 7, zero. The word index is written as a multiple of 8 so the
    compiler keeps the 16-byte alignment (k0 is a multiple of 64). With EVEN_N and EVEN_K the load
    has no mask: no predicate and no default words to set up."""
    ow = (k0 // 64) * 8 + offs_w
    if EVEN_K and EVEN_N:
        return tl.load(w_rows + ow[None, :])
    mask = ow[None, :] < row_words
    if not EVEN_N:
        mask = mask & n_mask[:, None]
    return tl.load(w_rows + ow[None, :], mask=mask, other=0x77777777)


@triton.jit
def nf4_group_dots(vals, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, BK // 64): each 64-element group's sum of vals (BN, BK) * x (BK,) (fp32)."""
    return tl.sum(tl.reshape(vals * x[None, :], (BLOCK_N, BLOCK_K // 64, 64)), axis=2)


@triton.jit
def _store_row(y_ptr, offs_n, n_mask, acc, ATOMIC: tl.constexpr):
    """Sum the per-group partials acc (BN, G) of one token and write (or add) them to y."""
    y = tl.sum(acc, axis=1)
    if ATOMIC:  # split-K: y is an fp32 buffer the launcher zeroed
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask, sem="relaxed")
    else:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _nf4_decode_mma_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, K_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, K_ALIGNED: tl.constexpr, EVEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Tensor cores, tokens padded to BLOCK_M (>= 16): W is the MMA's A operand, so the dequant is the
    # only per-element work and the padded tokens cost nothing. With K % 64 == 0 each 64-column
    # group is decoded as in the fma kernel (unscaled NF4 values rounded to x.dtype) and the absmax
    # scales that group's (BLOCK_N, BLOCK_M) product.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n.to(tl.int64)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_cols = x_ptr + offs_m[None, :] * stride_xm  # (1, BM): x^T tiles
    k_lo = tl.program_id(1) * K_PER_SPLIT
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if K_ALIGNED:
        row_words = (K // 64) * 8
        w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * row_words  # (BN, 1)
        table = _nf4_nibble_table(pairs_ptr)
    for k_start in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
        if K_ALIGNED:
            for g in tl.static_range(BLOCK_K // 64):
                k0 = k_start + g * 64
                offs_k = k0 + tl.arange(0, 64)
                xt = tl.load(x_cols + offs_k[:, None], mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
                ow = (k0 // 64) * 8 + tl.arange(0, 8)  # keeps the compiler's alignment facts
                if EVEN:
                    words = tl.load(w_rows + ow[None, :])  # (BN, 8) int32: one quant group per row
                else:
                    words = tl.load(w_rows + ow[None, :], mask=n_mask[:, None] & (ow[None, :] < row_words),
                                    other=0x77777777)
                codes = _nf4_row_values(table, words, BLOCK_N, 64).to(xt.dtype)
                in_k = (offs_n * 0 + k0) < K  # (BN,): this group exists (K can end mid-step)
                scale = nf4_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                   rows * (K // 64) + k0 // 64, n_mask & in_k)  # (BN,)
                acc += tl.dot(codes, xt, input_precision=DOT_PRECISION) * scale[:, None]
        else:  # any K: the generic tile helper, scaled per element
            offs_k = k_start + tl.arange(0, BLOCK_K)
            xt = tl.load(x_cols + offs_k[:, None], mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
            w = nf4_dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr,
                                 offs_n, k_start, N, K, BLOCK_N, BLOCK_K, False)
            acc = tl.dot(w.to(xt.dtype), xt, acc=acc, input_precision=DOT_PRECISION)  # (BN, BM)
    y_tile = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]  # (BN, BM), transposed view
    mask = m_mask[None, :] & n_mask[:, None]
    if ATOMIC:  # split-K: y is an fp32 buffer the launcher zeroed
        tl.atomic_add(y_tile, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (2-D inputs; configs are dicts so the benchmark can sweep them)
# ----------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _even(N: int, K: int, block_n: int, block_k: int) -> bool:
    """Every weight tile lies inside W: its loads need no masks."""
    return K % BLOCKSIZE == 0 and N % block_n == 0 and K % block_k == 0


def _check_2d(a: torch.Tensor, cols: int, q: NF4Tensor, what: str) -> torch.Tensor:
    if a.dim() != 2 or a.shape[1] != cols or len(q.shape) != 2:
        raise ValueError(f"{what}: expected a 2-D input with {cols} columns for a 2-D NF4 weight "
                         f"{tuple(q.shape)}, got {tuple(a.shape)}")
    if a.device != q.device:
        raise ValueError(f"{what}: input on {a.device} but the NF4 weight on {q.device}")
    return a.contiguous()


# Default tiles, chosen by SASS instruction counts per weight element (sm_90, triton 3.9) before
# any GPU timing; benchmarks/nf4.py sweeps alternatives. All keep W_AS_A where the MMA can take the
# dequantized tile from registers; dX prefers the tile as the MMA's B operand.
def gemm_config(M: int, N: int, K: int) -> dict:
    """Fused-GEMM tiles for Y = X W^T (M rows). Below 512 rows BLOCK_N shrinks until the grid has
    about two programs per SM (a 4096-row weight at M = 128 has only 64 tiles of 64 x 128)."""
    if M > 256:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, W_AS_A=True, num_warps=8, num_stages=3)
    block_m = 32 if M <= 64 else 64
    block_n = 128
    while block_n > 32 and cdiv(M, block_m) * cdiv(N, block_n) < 2 * 132:  # H100 SMs
        block_n //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, W_AS_A=True, num_warps=4, num_stages=4)


def dx_config(M: int, N: int, K: int) -> dict:
    """dX = dY W tiles: BLOCK_N steps over W's rows (the reduction), BLOCK_K spans dX's columns."""
    if M <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, W_AS_A=False, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, W_AS_A=False, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, W_AS_A=False, num_warps=8, num_stages=3)


def gemv_config(M: int, N: int, K: int) -> dict:
    """Decode tiles. KERNEL "fma" (CUDA cores; M <= 4, K % 64 == 0) or "mma" (tensor cores, any K,
    M <= 64). BLOCK_N None (fma): the largest of 16, 8, 4 rows that still gives WAVES programs per
    SM. SPLIT_K None: enough K slices for WAVES programs per SM. From benchmarks/nf4.py's sweep on an
    H100 (graph-timed): fma wins at 1-2 rows, and at 3 rows on weights with N >= K (the attention
    projections and w1/w3: 14.4 vs 16.0 us at 4096x4096, 38.0 vs 42.8 at 14336x4096; the tensor-core
    kernel wins at 4096x14336, 39.0 vs 44.9; benchmarks/results/ab_session3_call1.json)."""
    if (M <= 2 or (M == 3 and N >= K)) and K % BLOCKSIZE == 0:
        return dict(KERNEL="fma", BLOCK_N=None, BLOCK_K=512, WORD_VEC=4, SPLIT_K=None, WAVES=3, num_warps=4,
                    num_stages=1)
    if K % BLOCKSIZE:  # the generic per-element path: small steps keep it in registers
        return dict(KERNEL="mma", BLOCK_N=64, BLOCK_K=64, SPLIT_K=None, WAVES=4, num_warps=4, num_stages=1)
    return dict(KERNEL="mma", BLOCK_N=64, BLOCK_K=256, SPLIT_K=None, WAVES=4, num_warps=4, num_stages=3)


def nf4_gemm(x: torch.Tensor, q: NF4Tensor, config: dict | None = None) -> torch.Tensor:
    """Y (M, N) = X (M, K) @ W^T, W dequantized tile by tile in registers."""
    N, K = q.shape
    x = _check_2d(x, K, q, "nf4_gemm")
    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    c = dict(gemm_config(M, N, K), **(config or {}))
    grid = (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]),)
    _nf4_gemm_kernel[grid](
        x, *q.tensors(), y, M, N, K, x.stride(0), y.stride(0),
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
        K_ALIGNED=K % BLOCKSIZE == 0, EVEN=_even(N, K, c["BLOCK_N"], c["BLOCK_K"]), W_AS_A=c["W_AS_A"],
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"],
        enable_fp_fusion=False,
    )
    return y


def nf4_gemm_dx(dy: torch.Tensor, q: NF4Tensor, config: dict | None = None) -> torch.Tensor:
    """dX (M, K) = dY (M, N) @ W: the input gradient of nf4_gemm / nf4_gemv."""
    N, K = q.shape
    dy = _check_2d(dy, N, q, "nf4_gemm_dx")
    M = dy.shape[0]
    if N == 0:
        return torch.zeros((M, K), dtype=dy.dtype, device=dy.device)
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    c = dict(dx_config(M, N, K), **(config or {}))
    grid = (cdiv(M, c["BLOCK_M"]) * cdiv(K, c["BLOCK_K"]),)
    _nf4_gemm_dx_kernel[grid](
        dy, *q.tensors(), dx, M, N, K, dy.stride(0), dx.stride(0),
        BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
        K_ALIGNED=K % BLOCKSIZE == 0, EVEN=_even(N, K, c["BLOCK_N"], c["BLOCK_K"]), W_AS_A=c["W_AS_A"],
        DOT_PRECISION=_dot_precision(dy.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"],
        enable_fp_fusion=False,
    )
    return dx


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device (its index, or the current one)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _gemv_plan(M: int, N: int, K: int, dtype: torch.dtype, sms: int, config: dict) -> tuple:
    """(kernel, grid, split, scalar args, constexprs) of one nf4_gemv launch: x is contiguous
    (stride K) and y fresh (stride N), so the whole launch is fixed by the shape."""
    c = dict(gemv_config(M, N, K), **config)
    fma = c["KERNEL"] == "fma"
    if fma and (K % BLOCKSIZE or M > 4 or c["BLOCK_K"] % BLOCKSIZE):
        raise ValueError(f"nf4_gemv: the fma kernel needs K % 64 == 0, M <= 4 and BLOCK_K % 64 == 0, "
                         f"got K={K}, M={M}, BLOCK_K={c['BLOCK_K']}")
    target = c.get("WAVES", 4) * sms  # programs wanted
    block_n = c["BLOCK_N"] or next((b for b in (16, 8) if cdiv(N, b) >= target), 4)
    n_tiles, k_tiles = cdiv(N, block_n), cdiv(K, c["BLOCK_K"])
    split = c["SPLIT_K"] or max(1, min(k_tiles, cdiv(target, n_tiles)))
    k_per_split = cdiv(k_tiles, split) * c["BLOCK_K"]
    split = cdiv(K, k_per_split)
    meta = dict(BLOCK_N=block_n, BLOCK_K=c["BLOCK_K"], ATOMIC=split > 1, num_warps=c["num_warps"],
                num_stages=c["num_stages"])
    if fma:
        meta.update(M=M, EVEN_N=N % block_n == 0, EVEN_K=K % c["BLOCK_K"] == 0, WORD_VEC=c.get("WORD_VEC", 4),
                    X_AHEAD=c.get("X_AHEAD", False))
        return _nf4_decode_fma_kernel, (n_tiles, split), split, (N, K, K, N, k_per_split), meta
    meta.update(BLOCK_M=c.get("BLOCK_M") or max(16, next_power_of_2(M)), K_ALIGNED=K % BLOCKSIZE == 0,
                EVEN=_even(N, K, block_n, c["BLOCK_K"]), DOT_PRECISION=_dot_precision(dtype))
    return _nf4_decode_mma_kernel, (n_tiles, split), split, (M, N, K, K, N, k_per_split), meta


_default_gemv_plan = functools.lru_cache(maxsize=4096)(
    lambda M, N, K, dtype, sms: _gemv_plan(M, N, K, dtype, sms, {}))


def nf4_gemv(x: torch.Tensor, q: NF4Tensor, config: dict | None = None) -> torch.Tensor:
    """Y (M, N) = X (M, K) @ W^T for M <= 64 rows (decoding); split-K when N alone gives too few
    programs (fp32 atomics into a zeroed buffer, then one cast). The default launch is resolved once
    per shape: decoding calls this for every layer, and host time adds up. With config None, 1-8
    rows on sm_90 go to kernels/nf4_tc.py's tensor-core kernel where it measured faster
    (`nf4_tc.preferred`); a config dict (even {}) keeps this module's kernels."""
    N, K = q.shape
    x = _check_2d(x, K, q, "nf4_gemv")
    M = x.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"nf4_gemv handles at most {GEMV_MAX_ROWS} rows, got {M}; use nf4_gemm")
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=x.dtype, device=x.device)
    if config is None:
        from kernels import nf4_tc  # imports this module

        if nf4_tc.preferred(x, q):  # tensor cores, 1..8 rows, sm_90 (see nf4_tc.preferred_shape)
            return nf4_tc.launch(x, q)  # x checked above
    sms = _num_sms(x.device)
    plan = _default_gemv_plan(M, N, K, x.dtype, sms) if config is None else _gemv_plan(M, N, K, x.dtype, sms, config)
    kernel, grid, split, scalars, meta = plan
    if split == 1:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    kernel[grid](x, *q.tensors(), y, *scalars, **meta)
    return y if split == 1 else y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Entry point with autograd
# ----------------------------------------------------------------------------------------------


GEMV_MAX_ROWS = 64  # nf4_gemv's limit: the tensor-core decode kernel pads the rows to BLOCK_M <= 64

# nf4_matmul's policy on CUDA, by rows M of the (flattened) input; benchmarks/nf4.py measures it.
#   M <= GEMV_ROWS                 nf4_gemv: memory-bound decode kernels, W read once
#   GEMV_ROWS < M < DENSE_MIN_ROWS  the fused GEMM: W dequantized tile by tile in registers
#   M >= DENSE_MIN_ROWS             dequantize W into a transient bf16 copy (one weight, freed after
#                                   the call), then cuBLAS; the same for dX in the backward. The
#                                   fused kernel re-dequantizes each weight element once per BLOCK_M
#                                   rows: on Hopper that ALU work costs more than the HBM traffic of
#                                   one dense copy (~57 us per 14336x4096 weight) saves.
# Measured on an H100 (benchmarks/NOTES.md, "crossover", CUDA-graph times): from 16 to 64 rows the
# decode kernel (40-80 us) beats the fused GEMM (70-129 us) and the dense path (101-105 us); above
# 64 rows the dense path (102-116 us up to 256 rows, then cuBLAS-bound) beats the fused GEMM by up
# to 2.4x on tall weights (4096x14336: 162-281 us) and loses by ~9% only on wide ones at 65-128
# rows (14336x4096: fused 93 us). So the fused GEMM is off the default path; with
# DENSE_MIN_ROWS = None it serves every M > GEMV_ROWS (no transient copy).
GEMV_ROWS = 64
DENSE_MIN_ROWS: int | None = 65


def nf4_matmul_reference(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N), dequantizing W to x.dtype first."""
    return torch.nn.functional.linear(x, dequantize_nf4_reference(q, x.dtype))


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be None, 'triton' or 'reference', got {backend!r}")
    return backend == "triton" or (backend is None and t.is_cuda)


def _dense(rows: int) -> bool:
    return DENSE_MIN_ROWS is not None and rows >= DENSE_MIN_ROWS


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W frozen in NF4: the backward returns dX only."""

    @staticmethod
    def forward(ctx, x, q, backend):
        ctx.q, ctx.backend = q, backend
        N, K = q.shape
        x2 = x.reshape(-1, K)
        if not _use_triton(x, backend):
            y2 = torch.nn.functional.linear(x2, dequantize_nf4_reference(q, x.dtype))
        elif x2.shape[0] <= GEMV_ROWS:
            y2 = nf4_gemv(x2, q)
        elif _dense(x2.shape[0]):
            y2 = torch.nn.functional.linear(x2, dequantize_nf4_triton(q, x.dtype))
        else:
            y2 = nf4_gemm(x2, q)
        return y2.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        q = ctx.q
        N, K = q.shape
        dy2 = dy.reshape(-1, N)
        if not _use_triton(dy, ctx.backend):
            dx2 = dy2 @ dequantize_nf4_reference(q, dy.dtype)
        elif _dense(dy2.shape[0]):
            dx2 = dy2 @ dequantize_nf4_triton(q, dy.dtype)
        else:
            dx2 = nf4_gemm_dx(dy2, q)
        return dx2.reshape(*dy.shape[:-1], K), None, None


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, backend: str | None = None) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N) in x.dtype, differentiable in x.

    backend None picks by device: CUDA -> Triton (skinny kernel for <= 16 rows, fused GEMM above),
    CPU -> reference. "triton" forces the kernels (tests run them on CPU through the interpreter).
    """
    if x.shape[-1] != q.shape[-1]:
        raise ValueError(f"nf4_matmul: input has {x.shape[-1]} features, the NF4 weight "
                         f"{tuple(q.shape)} expects {q.shape[-1]}")
    return _NF4Matmul.apply(x, q, backend)
