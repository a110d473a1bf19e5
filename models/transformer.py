"""A decoder for the Llama / Mistral / Mixtral family, in plain PyTorch.

Module names equal transformers' (`model.layers.{i}.self_attn.q_proj`, ...), so Hugging Face
state dicts load key for key and PEFT adapter keys map onto modules by name. Every projection
is an `nn.Linear`, which NF4 and LoRA modules replace by name.

Shapes: B batch, T new tokens, S key length (T, or the cache length), H heads, K kv heads,
D head dim, C hidden size, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import ModelConfig
from models.moe import SparseMoE


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


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, T) positions -> cos, sin of shape (B, 1, T, D), HF's half-rotation layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.int64).float() / head_dim))  # (D/2,)
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

    def forward(self, x, B, T, cos, sin, mask, input_pos):
        """x (B*T, C): linear layers see 2-D inputs (CPU matmuls on (B, 1, C) are pathologically slow)."""
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, K, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_kv != self.n_heads
        if mask is None:  # plain causal over T == S: the fused flash path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B * T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """The dense SwiGLU MLP: down(silu(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x, B, T, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), B, T, cos, sin, mask, input_pos)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


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
        mask = self._attention_mask(attention_mask, input_pos if cached else None, T, S, device)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, B, T, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, B, T, cos, sin, mask, input_pos)
        x = self.model.norm(x)
        return (x if return_hidden else self.lm_head(x)).view(B, T, -1)
