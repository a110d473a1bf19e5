"""A decoder for the Llama / Mistral / Mixtral family, in plain PyTorch.

Module names equal transformers' (`model.layers.{i}.self_attn.q_proj`, ...), so Hugging Face
state dicts load key for key and PEFT adapter keys map onto modules by name. Every projection
is an `nn.Linear`, which NF4 and LoRA modules replace by name.

Shapes: B batch, T new tokens, S key length (T, or the cache length), H heads, K kv heads,
D head dim, C hidden size, V vocab.

Two paths run the same math. The reference (PyTorch ops, autograd; training, the CPU) and, for
inference on CUDA, fused Triton kernels for the model's own small ops, which matter when a decode
step is a few tokens and each kernel launch costs more than its work: the residual add fused into
the next RMSNorm (kernels.norm), RoPE on q and k plus the KV-cache write in one launch
(kernels.rope), and attention of the new tokens against the cache with the mask applied inside
(kernels.attention; no mask tensor). `Transformer.backend` picks the path; parity tests run the
reference, tests/models/test_fused_decode.py checks the fused path against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import moe_tc
from kernels.attention import decode_attention
from kernels.attention import fits as decode_attention_fits
from kernels.norm import add_rms_norm
from kernels.rope import rope_from_sums, rope_qkv, sums_fit
from kernels.swiglu import swiglu
from models.config import ModelConfig
from models.moe import SparseMoE
from models.nf4 import NF4Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, residual) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(x + residual), x + residual) in one kernel (kernels.norm); residual may be None or a
        kernels.norm.SlotSums.
        Inference only: the fused path of `DecoderLayer.forward_fused`."""
        return add_rms_norm(x, residual, self.weight, self.eps, backend="triton")


_INV_FREQ: dict = {}  # (head_dim, theta, device) -> (D/2,) fp32: five launches fewer per decode step


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """(D/2,) RoPE frequencies, HF's formula; kept per device once computed (not while a CUDA graph
    is being captured: the capture would not run the kernels that fill it)."""
    key = (head_dim, float(theta), str(device))
    if key in _INV_FREQ:
        return _INV_FREQ[key]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    if not (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _INV_FREQ[key] = inv_freq
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, 1, T, D), HF's half-rotation layout."""
    inv_freq = rope_inv_freq(head_dim, theta, position_ids.device)  # (D/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D): rotate the two halves of each head dim (HF `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """A static cache of keys and values, written at explicit slot positions."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """input_pos (T,), k/v (B, K, T, D) -> the whole cache (B, K, S, D)."""
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


@dataclass
class LayerContext:
    """What every layer needs about one forward call; built once per call by Transformer.forward."""

    B: int
    T: int
    cos: torch.Tensor  # (B, 1, T, D) RoPE tables
    sin: torch.Tensor  # (B, 1, T, D)
    mask: torch.Tensor | None  # bool (B|1, 1, T, S) for SDPA; None: plain causal, or decode_attention
    input_pos: torch.Tensor | None  # (T,) cache slots of the new tokens
    kernels: bool = False  # the fused Triton ops (inference only)
    decode_attention: bool = False  # attention by kernels.attention over the cache (no mask tensor)
    attention_mask: torch.Tensor | None = None  # (B|1, S) for decode_attention


FUSED_ROUTER = True  # decoding: the MoE block's RMSNorm and router in one launch (SparseMoE.add_norm_route)
DEFERRED_COMBINE = True  # decoding: the MoE output combined inside the next RMSNorm's launch (kernels.norm.SlotSums)
FUSED_QKV_ROPE = True  # decoding: with FUSED_QKV, RoPE and the cache write in the cast's launch (rope_from_sums)
FUSED_QKV = True  # decoding: q, k and v of plain NF4Linear layers in one launch (kernels.moe_tc.multi_gemv)


def fused_qkv(attn: "Attention", x: torch.Tensor) -> tuple | None:
    """(q, k, v) from one multi-weight GEMV launch when attn's projections are plain NF4Linear
    layers without bias in x's dtype and moe_tc.multi_gemv takes x (decoding on sm_90); else None.
    q, k, v are column slices of one (B*T, sum N) tensor."""
    weights = _plain_nf4_qkv(attn, x)
    if weights is None:
        return None
    y = moe_tc.multi_gemv(x, weights)
    return None if y is None else tuple(y.split([q.shape[0] for q in weights], dim=1))


def _plain_nf4_qkv(attn: "Attention", x: torch.Tensor) -> list | None:
    """The NF4 weights of q, k, v when they are plain NF4Linear layers without bias in x's dtype and
    moe_tc.multi_gemv takes x (decoding on sm_90); else None."""
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not (FUSED_QKV and x.is_cuda and all(type(m) is NF4Linear and m.bias is None
                                            and m.compute_dtype in (None, x.dtype) for m in layers)):
        return None
    weights = [m.nf4 for m in layers]
    return weights if moe_tc.multi_supported(x, weights) else None


def fused_qkv_rope(attn: "Attention", x: torch.Tensor, ctx: "LayerContext") -> torch.Tensor | None:
    """Decoding over the cache: q rotated (B*T, H*D), with k rotated and v written into the cache, from
    one multi-weight GEMV launch and one launch that casts, rotates and stores (kernels.rope
    .rope_from_sums); None where fused_qkv's conditions or rope_from_sums' fail."""
    cache = attn.kv_cache
    if not (FUSED_QKV_ROPE and cache is not None and ctx.decode_attention):
        return None
    weights = _plain_nf4_qkv(attn, x)
    if weights is None:
        return None
    slots = (cache.k, cache.v, ctx.input_pos)
    rows = moe_tc.segment_rows(weights)
    if not sums_fit(rows, attn.n_heads, attn.n_kv, ctx.cos, ctx.sin, slots, x.dtype, x.shape[0]):
        return None
    return moe_tc.multi_gemv(x, weights, epilogue=lambda sums, rows: rope_from_sums(
        sums, rows, attn.n_heads, attn.n_kv, ctx.cos, ctx.sin, slots, x.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, ctx: LayerContext):
        """x (B*T, C): linear layers see 2-D inputs (CPU matmuls on (B, 1, C) are pathologically slow)."""
        q = fused_qkv_rope(self, x, ctx) if ctx.kernels else None
        if q is not None:  # q rotated, k and v already in the cache
            B, T = ctx.B, ctx.T
            y = decode_attention(q.view(B, T, self.n_heads, self.head_dim), self.kv_cache.k, self.kv_cache.v,
                                 ctx.input_pos, ctx.attention_mask, self.cfg.sliding_window, backend="triton")
            return self.o_proj(y.view(B * T, -1))
        qkv = fused_qkv(self, x) if ctx.kernels else None
        q, k, v = qkv or (self.q_proj(x), self.k_proj(x), self.v_proj(x))  # (B*T, H*D), (B*T, K*D), (B*T, K*D)
        y = self._attend_fused(q, k, v, ctx) if ctx.kernels else self._attend(q, k, v, ctx)  # (B*T, H*D)
        return self.o_proj(y)

    def _heads(self, t: torch.Tensor, B: int, T: int) -> torch.Tensor:
        return t.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B*T, n*D) -> (B, n, T, D)

    def _attend(self, q, k, v, ctx: LayerContext):
        """The reference: RoPE, cache update and SDPA in PyTorch ops."""
        B, T = ctx.B, ctx.T
        q, k, v = self._heads(q, B, T), self._heads(k, B, T), self._heads(v, B, T)  # (B, H|K, T, D)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(ctx.input_pos, k, v)  # (B, K, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        return self._sdpa(q, k, v, ctx)

    def _attend_fused(self, q, k, v, ctx: LayerContext):
        """The same with kernels: RoPE on q and k and the cache write in one launch, then attention
        over the cache in two more (kernels.attention; SDPA for inputs too long for it)."""
        B, T, cache = ctx.B, ctx.T, self.kv_cache
        slots = (cache.k, cache.v, ctx.input_pos) if cache is not None else None
        q, k = rope_qkv(q, k, v, ctx.cos, ctx.sin, slots, backend="triton")  # (B*T, H*D), (B*T, K*D) | None
        if ctx.decode_attention:
            y = decode_attention(q.view(B, T, self.n_heads, self.head_dim), cache.k, cache.v, ctx.input_pos,
                                 ctx.attention_mask, self.cfg.sliding_window, backend="triton")  # (B, T, H, D)
            return y.view(B * T, -1)
        if cache is not None:
            k, v = cache.k.to(q.dtype), cache.v.to(q.dtype)  # (B, K, S, D)
        else:
            k, v = self._heads(k, B, T), self._heads(v, B, T)  # (B, K, T, D)
        return self._sdpa(self._heads(q, B, T), k, v, ctx)

    def _sdpa(self, q, k, v, ctx: LayerContext):
        """q (B, H, T, D), k and v (B, K, S, D) -> (B*T, H*D)."""
        gqa = self.n_kv != self.n_heads
        if ctx.mask is None:  # plain causal over T == S: the fused flash path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=gqa)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(ctx.B * ctx.T, self.n_heads * self.head_dim)


class MLP(nn.Module):
    """The dense SwiGLU MLP: down(silu(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        # silu(g) * u: one fused kernel each way on CUDA (kernels.swiglu), the eager ops on CPU
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe:
            self.block_sparse_moe = SparseMoE(cfg.hidden_size, cfg.intermediate_size,
                                              cfg.num_local_experts, cfg.num_experts_per_tok)
        else:
            self.mlp = MLP(cfg)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x, ctx: LayerContext):
        """x (B*T, C) -> (B*T, C)."""
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.ffn(self.post_attention_layernorm(x))

    def forward_fused(self, x, delta, ctx: LayerContext):
        """forward with each residual add fused into the RMSNorm that follows it (inference).

        x (B*T, C) is the residual stream without delta (B*T, C), the last sublayer's output
        (None before the first layer; a kernels.norm.SlotSums after an MoE block on moe_tc, which
        the next norm combines); returns the same pair after this layer. The sums are the
        reference's, rounded alike: x + delta is stored in x's dtype before it is normalized.
        """
        h, x = self.input_layernorm.add_forward(x, delta)  # h = norm(x + delta), x = x + delta
        delta = self.self_attn(h, ctx)
        moe = getattr(self, "block_sparse_moe", None)
        fused = moe.add_norm_route(self.post_attention_layernorm, x, delta) if FUSED_ROUTER and moe else None
        if fused is not None:  # the norm and the MoE router in one launch
            h, x, routing = fused
            return x, moe(h, routing=routing, combine=not DEFERRED_COMBINE)  # maybe a SlotSums
        h, x = self.post_attention_layernorm.add_forward(x, delta)
        return x, self.ffn(h)


class DecoderStack(nn.Module):
    """transformers' `model.` prefix: embeddings, layers and the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # The model's own small ops (norms, residual adds, RoPE, cache write, attention): None runs
        # the fused Triton kernels on CUDA when no gradient is needed, else the PyTorch reference;
        # "reference" never uses them; "triton" uses them on any device (CPU: the interpreter).
        # Projections and the MoE block pick their own kernels.
        self.backend: str | None = None
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- KV cache ----
    def setup_kv_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        ref = self.model.embed_tokens.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.float32)
        device = device or ref.device
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_len, c.num_key_value_heads,
                                               c.head_dim, dtype, device)

    def clear_kv_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def repeat_kv_cache(self, n: int):
        """Repeat every batch row n times (row b -> rows b*n .. b*n+n-1): one prefill, n samples."""
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k = cache.k.repeat_interleave(n, dim=0)
            cache.v = cache.v.repeat_interleave(n, dim=0)

    @property
    def kv_cache_len(self) -> int | None:
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else cache.k.shape[2]

    # ---- forward ----
    def _use_kernels(self, device: torch.device) -> bool:
        """Whether this call takes the fused kernels; never when autograd may need a backward."""
        if self.backend == "reference" or torch.is_grad_enabled():
            return False
        return self.backend == "triton" or device.type == "cuda"

    def _attention_mask(self, attention_mask, input_pos, T, S, device):
        """Boolean (B|1, 1, T, S) mask: causal by slot, padding, sliding window; None if plain causal."""
        window = self.config.sliding_window
        if attention_mask is None and input_pos is None and (window is None or T <= window):
            return None
        q_pos = input_pos if input_pos is not None else torch.arange(T, device=device)  # (T,)
        k_pos = torch.arange(S, device=device)  # (S,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, S)
        if window is not None:
            mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
        mask = mask[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        # A query row with no visible key (a left-pad position) would give NaN; let it see all.
        return mask | ~mask.any(dim=-1, keepdim=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or final hidden states (B, T, C).

        Without a KV cache, attention_mask is (B, T) with 1 for real tokens. With one
        (`setup_kv_cache`), input_pos (T,) gives the cache slots the tokens are written to and
        attention_mask is (B, S) over all cache slots. position_ids (B, T) feed RoPE; by default
        they equal the slot index.
        """
        B, T = input_ids.shape
        device = input_ids.device
        cached = self.kv_cache_len is not None
        if cached and input_pos is None:
            raise ValueError("with a KV cache, pass input_pos (the cache slots of these tokens)")
        S = self.kv_cache_len if cached else T
        if position_ids is None:
            base = input_pos if input_pos is not None else torch.arange(T, device=device)
            position_ids = base[None].expand(B, T)
        x = self.model.embed_tokens(input_ids).view(B * T, -1)  # (B*T, C)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        c = self.config
        kernels = self._use_kernels(device)
        # A few new tokens against the cache: the attention kernel masks by itself (no mask tensor).
        decode_attn = (kernels and cached and (attention_mask is None or attention_mask.shape[-1] == S)
                       and decode_attention_fits(T, c.num_attention_heads, c.num_key_value_heads))
        mask = None
        if not decode_attn:
            mask = self._attention_mask(attention_mask, input_pos if cached else None, T, S, device)
        ctx = LayerContext(B, T, cos, sin, mask, input_pos, kernels, decode_attn,
                           attention_mask if decode_attn else None)
        if kernels:
            delta = None  # the last sublayer's output, added inside the next norm
            for layer in self.model.layers:
                x, delta = layer.forward_fused(x, delta, ctx)
            x, _ = self.model.norm.add_forward(x, delta)
        else:
            for layer in self.model.layers:
                if self.gradient_checkpointing and self.training:
                    x = checkpoint(layer, x, ctx, use_reentrant=False)
                else:
                    x = layer(x, ctx)
            x = self.model.norm(x)
        return (x if return_hidden else self.lm_head(x)).view(B, T, -1)
