"""The model's fused inference path (Transformer.backend: kernels.norm, kernels.rope,
kernels.attention) gives the logits and tokens of the PyTorch reference path.

On CPU, backend="triton" forces the kernels through the Triton interpreter; on a GPU the default
(None) takes them. Tiny Mixtral (MoE), Llama (dense) and a Mistral with a sliding window, left
padding, a prefill short enough for the decode-attention kernel and one too long for it.
"""
import pytest
import torch

import kernels.attention
import kernels.norm
import kernels.rope
from engine.sampling import generate
from models.config import ModelConfig
from models.transformer import Transformer

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FORCED = "triton" if DEV == "cpu" else None  # None takes the kernels on CUDA


def _model(preset, window=None, dtype=torch.float32, seed=0):
    cfg = ModelConfig.from_preset(preset)
    cfg.sliding_window = window
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights
            else:
                p.normal_(0, 0.3)
    return m.to(DEV, dtype)


def _run(model, backend, ids, mask, pos, prefill, S):
    """Logits (B, L, V) of a prefill of `prefill` tokens then one token per step, on a cache of S."""
    model.backend = backend
    B, L = ids.shape
    with torch.no_grad():
        model.setup_kv_cache(B, S)
        try:
            out = [model(ids[:, :prefill], attention_mask=mask, position_ids=pos[:, :prefill],
                         input_pos=torch.arange(prefill, device=DEV))]
            for t in range(prefill, L):
                out.append(model(ids[:, t:t + 1], attention_mask=mask, position_ids=pos[:, t:t + 1],
                                 input_pos=torch.tensor([t], device=DEV)))
        finally:
            model.clear_kv_cache()
            model.backend = None
    return torch.cat(out, dim=1)


def _padded(B, L, S, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g).to(DEV)
    mask = torch.ones(B, S, dtype=torch.long, device=DEV)
    mask[1, :3] = 0  # row 1 left padded by three slots
    mask[2 % B, :L - 2] = 0  # row 2: a long left pad (its queries before slot L - 2 see nothing)
    pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return ids, mask, pos


# A prefill of 7 tokens x 2 query heads per kv head = 14 rows takes the decode-attention kernel;
# 33 x 2 = 66 > 64 rows takes SDPA (after the fused RoPE wrote the cache).
@pytest.mark.parametrize("preset,window,prefill", [("tiny-moe", None, 7), ("tiny-dense", None, 7),
                                                   ("tiny-dense", 5, 7), ("tiny-moe", None, 33),
                                                   ("tiny-dense", 5, 33)])
def test_incremental_decoding_matches_reference(preset, window, prefill):
    m = _model(preset, window)
    L, S = prefill + 3, prefill + 6
    ids, mask, pos = _padded(3, L, S, m.config.vocab_size)
    want = _run(m, "reference", ids, mask, pos, prefill, S)
    got = _run(m, FORCED, ids, mask, pos, prefill, S)
    real = mask[:, :L].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_full_forward_without_cache_matches_reference(preset):
    m = _model(preset)
    ids, mask, pos = _padded(3, 9, 9, m.config.vocab_size, seed=1)
    with torch.no_grad():
        m.backend = "reference"
        want = m(ids, attention_mask=mask, position_ids=pos)
        m.backend = FORCED
        got = m(ids, attention_mask=mask, position_ids=pos)
        plain = m(ids[:, :4])  # no mask at all: causal SDPA after the fused RoPE
        m.backend = "reference"
        plain_want = m(ids[:, :4])
    m.backend = None
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, plain_want, rtol=1e-4, atol=1e-4)


def test_decode_step_takes_every_kernel(monkeypatch):
    """No silent fallback: with the kernels on, a decode step calls none of the references."""
    m = _model("tiny-moe")
    ids, mask, pos = _padded(2, 6, 8, m.config.vocab_size)

    def boom(*args, **kwargs):
        raise AssertionError("reference path taken")

    for mod, name in ((kernels.norm, "add_rms_norm_reference"), (kernels.rope, "rope_qkv_reference"),
                      (kernels.attention, "decode_attention_reference")):
        monkeypatch.setattr(mod, name, boom)
    _run(m, FORCED, ids, mask, pos, 5, 8)


def test_generate_tokens_equal_reference():
    """3 samples of two prompts of different lengths (left padding), sampled: the same tokens."""
    m = _model("tiny-moe")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9)]
    kw = dict(max_new_tokens=6, samples=3, temperature=1.0, top_p=0.9, seed=5, cuda_graph=False)
    m.backend = "reference"
    want = generate(m, prompts, **kw)
    m.backend = FORCED
    got = generate(m, prompts, **kw)
    m.backend = None
    assert got == want


def test_training_keeps_the_autograd_path():
    """With a gradient possible the kernels are never used, even when forced; backward works."""
    m = _model("tiny-dense")
    m.backend = "triton"
    assert not m._use_kernels(torch.device(DEV))
    ids = torch.randint(0, 256, (2, 6), device=DEV)
    m(ids).float().pow(2).mean().backward()
    assert m.model.layers[0].input_layernorm.weight.grad is not None
    with torch.no_grad():
        assert m._use_kernels(torch.device(DEV))
    m.backend = "reference"
    with torch.no_grad():
        assert not m._use_kernels(torch.device(DEV))
    m.backend = None
    with torch.no_grad():
        assert m._use_kernels(torch.device(DEV)) == (DEV == "cuda")


# bf16 decoding exists only as a GPU test (collected on CUDA machines; the interpreter's bf16
# tl.dot is broken), like the bf16 cases of the kernel tests.
if DEV == "cuda":
    def test_bf16_decoding_close_to_reference():
        m = _model("tiny-moe", dtype=torch.bfloat16)
        ids, mask, pos = _padded(3, 12, 16, m.config.vocab_size)
        want = _run(m, "reference", ids, mask, pos, 7, 16)
        got = _run(m, None, ids, mask, pos, 7, 16)
        real = mask[:, :12].bool()
        got, want = got[real].float(), want[real].float()
        assert (got - want).norm() / want.norm() < 2e-2  # bf16 roundings in different places
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
