"""kernels.sampling: the one-launch sample-and-record kernel against the PyTorch reference.

On CPU the kernel runs through TRITON_INTERPRET=1 (numpy's exact logs), and tokens must be equal.
On the GPU the kernel's log may differ by an ulp, so the chosen token's reference score must equal
the reference's best score to fp32 rounding (and the tokens are compared where scores are apart).
"""
import pytest
import torch

from kernels import sampling as S

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(R, V, kind, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: many tied logits, also at the top-p boundary
        x = torch.randint(-6, 7, (R, V), generator=g).float() / 2
    elif kind == "bf16":
        x = (torch.randn(R, V, generator=g) * 3).bfloat16()
    else:
        x = torch.randn(R, V, generator=g) * 4
    return x.to(device)


def _buffers(R, max_new, device=DEV, done=None):
    return dict(tok=torch.full((R,), -5, dtype=torch.long, device=device),
                out=torch.full((R, max_new), 9, dtype=torch.long, device=device),
                lengths=torch.full((R,), max_new, dtype=torch.long, device=device),
                done=(done if done is not None else torch.zeros(R, dtype=torch.bool)).to(device),
                hit=torch.ones(R, dtype=torch.bool, device=device))


def _reference_record(logits, keys, t, temperature, top_p, pad_id, eos, buf):
    """engine.sampling._Decoder.record's reference path, on copies of the buffers."""
    buf = {k: v.clone() for k, v in buf.items()}
    tok_hash = S.token_hashes(logits.shape[-1], logits.device)
    tok = S.sample_reference(logits, keys, t, tok_hash, temperature, top_p).masked_fill(buf["done"], pad_id)
    buf["tok"].copy_(tok)
    buf["out"][:, int(t)] = tok
    hit = (tok[:, None] == eos[None, :]).any(-1) & ~buf["done"]
    buf["hit"].copy_(hit)
    buf["lengths"] = torch.where(hit, t, buf["lengths"])
    buf["done"] |= hit
    return buf


def _scores(logits, keys, t, temperature):
    """(R, V) the reference's x + Gumbel noise."""
    x = logits.float() * (1.0 / temperature)
    u = S.noise(keys, t, S.token_hashes(logits.shape[-1], logits.device))
    return x - torch.log(-torch.log(u))


def test_top_p_keeps_ties_together():
    x = torch.tensor([[1.0, 1.0, 0.0, -1.0]])
    # p = [0.409, 0.409, 0.150, 0.055]: a sort would keep one of the tied tokens at top_p = 0.3
    assert S.top_p_keep(x, 0.3).tolist() == [[True, True, False, False]]
    assert S.top_p_keep(x, 0.85).tolist() == [[True, True, True, False]]
    assert S.top_p_keep(x, 1e-6).tolist() == [[True, True, False, False]]  # the top group always stays


def test_reference_noise_matches_hash_definition():
    keys = S.stream_keys(5, torch.arange(3))
    u = S.noise(keys, 4, S.token_hashes(10, "cpu"))
    key = S.hash32(keys[1] ^ (4 * S.STEP_MIX & S.M32))
    bits = S.hash32(key ^ S.hash32(torch.tensor(7 * S.TOKEN_MIX))) >> 8
    assert u[1, 7].item() == (bits.item() + 0.5) / 2 ** 24


@pytest.mark.parametrize("V", [1, 7, 1000, 5003])
@pytest.mark.parametrize("kind", ["normal", "ties", "bf16"])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 0.95), (0.7, 1.0), (0.7, 0.95), (1.5, 0.5), (1.0, 0.1)])
def test_kernel_equals_reference(V, kind, temperature, top_p):
    R, max_new, pad_id = 6, 5, 0
    logits = _logits(R, V, kind, seed=V + len(kind))
    keys = S.stream_keys(11, torch.arange(R, device=DEV))
    t = torch.tensor([3], device=DEV)
    eos = torch.tensor([1, 4], device=DEV)
    done = torch.tensor([False, True, False, False, True, False])
    buf = _buffers(R, max_new, done=done)
    want = _reference_record(logits, keys, t, temperature, top_p, pad_id, eos, buf)
    S.sample_and_record(logits, keys, t, temperature=temperature, top_p=top_p, pad_id=pad_id, eos=eos, **buf)
    if DEV == "cuda" and temperature > 0:  # an ulp of log may flip near-ties: compare scores
        sc = _scores(logits, keys, t, temperature)
        if top_p < 1:
            sc = sc.masked_fill(~S.top_p_keep(logits.float() * (1.0 / temperature), top_p), float("-inf"))
        live = ~done.to(DEV)
        got_score = sc.gather(1, buf["tok"].clamp(min=0)[:, None])[:, 0]
        torch.testing.assert_close(got_score[live], sc.max(-1).values[live], rtol=0, atol=1e-5)
        return
    for k in want:
        assert torch.equal(buf[k], want[k]), k


def test_top_p_rounds_are_exercised():
    """With top_p = 0.1 the unfiltered argmax is often outside the kept set: the kernel's extra
    rounds must then find the kept argmax (the reference's answer)."""
    R, V = 16, 3000
    logits = _logits(R, V, "normal", seed=2) / 3  # flat: many tokens share the mass
    keys = S.stream_keys(1, torch.arange(R, device=DEV))
    t = torch.tensor([0], device=DEV)
    th = S.token_hashes(V, logits.device)
    free = S.sample_reference(logits, keys, t, th, 1.0, 1.0)
    want = S.sample_reference(logits, keys, t, th, 1.0, 0.1)
    assert (free != want).sum() >= 4  # the first round misses in these rows
    buf = _buffers(R, 2)
    S.sample_and_record(logits, keys, t, temperature=1.0, top_p=0.1, pad_id=0, eos=torch.tensor([-1], device=DEV),
                        **buf)
    assert torch.equal(buf["tok"], want)


def test_eos_and_done():
    R, V = 4, 50
    logits = torch.full((R, V), -10.0, device=DEV)
    logits[:, 7] = 10.0  # every row picks token 7 greedily
    logits[2, 7], logits[2, 9] = -10.0, 10.0  # row 2 picks 9
    done = torch.tensor([False, True, False, False])
    buf = _buffers(R, 4, done=done)
    S.sample_and_record(logits, S.stream_keys(0, torch.arange(R, device=DEV)), torch.tensor([2], device=DEV),
                        temperature=0.0, top_p=1.0, pad_id=3, eos=torch.tensor([7], device=DEV), **buf)
    assert buf["tok"].tolist() == [7, 3, 9, 7]
    assert buf["out"][:, 2].tolist() == [7, 3, 9, 7] and (buf["out"][:, [0, 1, 3]] == 9).all()
    assert buf["hit"].tolist() == [True, False, False, True]
    assert buf["done"].tolist() == [True, True, False, True]
    assert buf["lengths"].tolist() == [2, 4, 4, 2]


def test_bad_buffers_are_refused():
    buf = _buffers(3, 2)
    buf["done"] = buf["done"].long()
    with pytest.raises(ValueError, match="bool"):
        S.sample_and_record(torch.zeros(3, 8, device=DEV), torch.zeros(3, dtype=torch.long, device=DEV),
                            torch.zeros(1, dtype=torch.long, device=DEV), temperature=1.0, top_p=0.9, pad_id=0,
                            eos=torch.tensor([1], device=DEV), **buf)


if torch.cuda.is_available():
    def test_kernel_in_cuda_graph():
        R, V = 6, 32000
        logits = _logits(R, V, "bf16", seed=5)
        keys = S.stream_keys(2, torch.arange(R, device=DEV))
        t = torch.tensor([0], device=DEV)
        eos = torch.tensor([2], device=DEV)
        buf = _buffers(R, 8)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        S.sample_and_record(logits, keys, t, temperature=0.7, top_p=0.95, pad_id=0, eos=eos, **buf)  # compile
        buf = _buffers(R, 8)
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            S.sample_and_record(logits, keys, t, temperature=0.7, top_p=0.95, pad_id=0, eos=eos, **buf)
        got = []
        for step in range(3):
            t.fill_(step)
            graph.replay()
            torch.cuda.synchronize()
            got.append(buf["tok"].clone())
            want = S.sample_reference(logits, keys, t, S.token_hashes(V, DEV), 0.7, 0.95)
            sc = _scores(logits, keys, t, 0.7)
            sc = sc.masked_fill(~S.top_p_keep(logits.float() * (1 / 0.7), 0.95), float("-inf"))
            torch.testing.assert_close(sc.gather(1, got[-1][:, None])[:, 0], sc.gather(1, want[:, None])[:, 0],
                                       rtol=0, atol=1e-5)
        assert not torch.equal(got[0], got[1])  # the step changes the noise
        assert torch.equal(buf["out"][:, :3].T.contiguous(), torch.stack(got))


def test_greedy_ties_pick_the_first_token_across_chunks():
    """Equal maxima in one lane of two chunks of the vocabulary (4096 apart) and in another lane:
    the first token wins, as torch.argmax picks it."""
    V = 9000
    logits = torch.zeros(3, V, device=DEV)
    logits[0, [5, 4096 + 5]] = 1.0
    logits[1, [4096 + 3, 7, 8192 + 3]] = 1.0
    logits[2, [8192 + 1, 4096 + 1]] = 1.0
    buf = _buffers(3, 1)
    S.sample_and_record(logits, S.stream_keys(0, torch.arange(3, device=DEV)), torch.tensor([0], device=DEV),
                        temperature=0.0, top_p=1.0, pad_id=0, eos=torch.tensor([-1], device=DEV), **buf)
    assert buf["tok"].tolist() == [5, 7, 4096 + 1] == logits.argmax(-1).tolist()


def test_top_p_outside_0_1_is_refused():
    """top_p <= 0 keeps nothing (the kernel's rounds would not end): refused, as in generate()."""
    from engine.sampling import generate
    from models.config import ModelConfig
    from models.transformer import Transformer

    buf = _buffers(2, 1)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            S.sample_and_record(torch.zeros(2, 8, device=DEV), S.stream_keys(0, torch.arange(2, device=DEV)),
                                torch.tensor([0], device=DEV), temperature=1.0, top_p=bad, pad_id=0,
                                eos=torch.tensor([-1], device=DEV), **buf)
    with pytest.raises(ValueError, match="top_p"):
        generate(Transformer(ModelConfig.from_preset("tiny-dense")), [[3, 4]], max_new_tokens=2, top_p=0.0)
