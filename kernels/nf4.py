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
  nf4_gemm         Y = X W^T for M > 16 rows, W dequantized tile by tile in registers
  nf4_gemm_dx      dX = dY W, the backward of the same family (the base is frozen: no dW)
  nf4_gemv         skinny Y = X W^T for M <= 16 rows (decoding), split-K over fp32 atomics
  nf4_matmul       autograd entry point that picks among them     (`nf4_matmul_reference`)

Contract of the tile-dequant helper `nf4_dequant_tile`, for other kernels' fused GEMMs
(kernels/lora.py, the MoE kernels):

    w = nf4_dequant_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, qmap_ptr,
                         offs_n, k_start, N, K, BLOCK_N, BLOCK_K, K_ALIGNED)

  - returns W[offs_n, k_start : k_start + BLOCK_K] as fp32, shape (BLOCK_N, BLOCK_K); cast it to the
    dot dtype yourself. Elements outside the (N, K) weight come out exactly 0.0 (masked loads read
    NF4 code 7, which is zero), so the tile can go straight into tl.dot.
  - pointers are the NF4Tensor fields in this order: packed, absmax, absmax2, code2, offset (a
    1-element fp32 tensor, read in-kernel so no host sync), qmap (the 16 NF4 values, fp32).
  - offs_n: (BLOCK_N,) int row indices (output features); k_start: a multiple of BLOCK_K.
  - K_ALIGNED (constexpr) = K % 64 == 0: each row then starts on a byte and block boundary and the
    helper loads BLOCK_K // 2 contiguous bytes and one absmax per 64 columns; BLOCK_K must be a
    power of 2 >= 16. Otherwise it gathers per element (correct for any K, slower).
  - for bit-parity with bitsandbytes launch the kernel with enable_fp_fusion=False; with fusion
    the absmax dequant may become an FMA and differ by one ulp.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The six tensors in kernel-argument order (packed, absmax, absmax2, code2, offset, qmap)."""
        return (self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.qmap)

    def to(self, device) -> "NF4Tensor":
        return NF4Tensor(*(t.to(device) for t in self.tensors()), shape=self.shape, dtype=self.dtype)

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
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(-1)  # (2 * bytes,)
    nblk = q.absmax.numel()
    codes = torch.nn.functional.pad(codes, (0, nblk * BLOCKSIZE - codes.numel()), value=7)
    vals = q.qmap[codes.long()].view(nblk, BLOCKSIZE) * _absmax_reference(q).view(-1, 1)  # fp32
    return vals.view(-1)[:n].to(dtype or q.dtype).view(q.shape)
