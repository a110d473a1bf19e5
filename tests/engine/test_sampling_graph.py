"""CUDA-graph decoding: a replayed step gives exactly the eager tokens.

On a GPU, generate(cuda_graph=True) captures one decode step and replays it; the tokens must equal
those of eager steps (tiny Mixtral with NF4 experts on the decode kernels, and a dense model). On
any machine: the step updates its buffers in place and reads nothing back to the host (what
capture needs), and a model whose MoE would loop over experts is reported graph-unsafe.
"""
import pytest
import torch

from engine import sampling
from engine.sampling import LAST_DECODE, generate
from models.config import ModelConfig
from models.moe import SparseMoE
from models.nf4 import replace_linears_with_nf4
from models.transformer import Transformer

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model(preset, nf4=True, dtype=torch.float32):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset(preset)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    if nf4:
        replace_linears_with_nf4(m, skip=("gate", "lm_head"), compute_dtype=dtype)
    return m.to(DEV, dtype) if not nf4 else m.to(DEV)


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9)]


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense"])
def test_graph_replay_equals_eager(preset):
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    m = _model(preset, dtype=dtype)
    kw = dict(max_new_tokens=6, samples=3, temperature=1.0, top_p=0.9, seed=5, eos_ids=[7])
    eager = generate(m, _prompts(), cuda_graph=False, **kw)
    assert LAST_DECODE == {"cuda_graph": False, "why_not": "cuda_graph=False", "reused": False}
    graphed = generate(m, _prompts(), cuda_graph=True, **kw)
    if DEV == "cuda":
        assert LAST_DECODE["cuda_graph"], LAST_DECODE["why_not"]
    else:
        assert LAST_DECODE == {"cuda_graph": False, "why_not": "not on CUDA", "reused": False}
    assert graphed == eager
    assert sum(len(s) for row in eager for s in row) > 6


def test_timed_steps_record_each_replay_and_change_no_token():
    """engine.sampling.TIMED_STEPS (benchmarks/generate.py's per-step timing) gets a pair of CUDA events
    per replayed step (steps 3-5 of 5: the first is the warm-up, the second the capture) and leaves
    the tokens as they are; off CUDA nothing is replayed and nothing recorded."""
    m = _model("tiny-moe", dtype=torch.bfloat16 if DEV == "cuda" else torch.float32)
    kw = dict(max_new_tokens=6, samples=3, temperature=1.0, top_p=0.9, seed=5)
    plain = generate(m, _prompts(), **kw)
    sampling.TIMED_STEPS = []
    try:
        timed = generate(m, _prompts(), **kw)
        steps = list(sampling.TIMED_STEPS)
    finally:
        sampling.TIMED_STEPS = None
    assert timed == plain
    assert len(steps) == (3 if DEV == "cuda" else 0)
    if steps:
        torch.cuda.synchronize()
        assert all(start.elapsed_time(end) > 0 for start, end in steps)


def test_graph_safety_follows_the_moe_path():
    cuda = torch.device("cuda")  # only inspected, never used
    nf4 = _model("tiny-moe")
    assert sampling._graph_safe(nf4, 6, cuda) is None  # 12 pairs: the NF4 decode kernels
    assert "expert loop" in sampling._graph_safe(nf4, 40, cuda)  # 80 pairs: the loop
    dense_experts = _model("tiny-moe", nf4=False)
    assert "block_sparse_moe" in sampling._graph_safe(dense_experts, 6, cuda)
    assert sampling._graph_safe(_model("tiny-dense", nf4=False), 6, cuda) is None
    assert sampling._graph_safe(nf4, 6, torch.device("cpu")) == "not on CUDA"


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero")


class _HostReads:
    """Records calls that bring a tensor's value to the host (on CUDA: a sync, fatal in capture)."""

    def __init__(self, monkeypatch):
        self.seen, self.active = [], False
        for name in _HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, fn):
        def read(t, *args, **kwargs):
            if self.active:
                self.seen.append(name)
            return fn(t, *args, **kwargs)
        return read


def test_decode_step_is_in_place_and_reads_nothing_back(monkeypatch):
    """What capture needs, checked on any device: the MoE takes the decode kernels (through the
    Triton interpreter on CPU), and a step keeps every buffer's address and never syncs."""
    m = _model("tiny-moe")
    for mod in m.modules():
        if isinstance(mod, SparseMoE):
            mod.backend = "triton"
    checks = []
    step = sampling._Decoder.step
    reads = _HostReads(monkeypatch)

    def watched(self):
        before = [b.data_ptr() for b in self.buffers()]
        reads.seen, reads.active = [], True
        try:
            step(self)
        finally:
            reads.active = False
        checks.append((before == [b.data_ptr() for b in self.buffers()], reads.seen))

    monkeypatch.setattr(sampling._Decoder, "step", watched)
    out = generate(m, _prompts(), max_new_tokens=4, samples=2, temperature=1.0, top_p=0.9, seed=1,
                   cuda_graph=False)
    assert len(checks) == 3 and all(len(s) == 4 for row in out for s in row)
    assert all(same for same, _ in checks)
    assert all(seen == [] for _, seen in checks), checks

    for mod in m.modules():  # the expert loop does read the routing back: the check can see it
        if isinstance(mod, SparseMoE):
            mod.backend = "reference"
    checks.clear()
    generate(m, _prompts(), max_new_tokens=2, cuda_graph=False)
    assert checks and checks[0][1]


class _ReplayByCall:
    """Stands in for _GraphStep off the GPU: 'captures' at its third call and then 'replays' by
    calling the step it was built with, which, like a real graph, is bound to the first call's
    decoder buffers. Counts how many were built."""
    built = 0

    def __init__(self, step, device):
        type(self).built += 1
        self.step, self.calls, self.graph, self.failed = step, 0, None, None

    def __call__(self):
        self.calls += 1
        if self.calls >= 2:
            self.graph = True
        self.step()


def test_reused_graph_gives_the_tokens_of_fresh_calls(monkeypatch):
    """generate(reuse_graph=True) keeps the captured step, its buffers and KV caches on the model and
    refills them in later calls of the same key: prompts of other lengths (same cache bucket), other
    seeds and stream ids give exactly the eager tokens; a new key builds a new step and frees the old."""
    m = _model("tiny-moe")
    if DEV != "cuda":  # no real capture here: exercise the reuse bookkeeping with a stand-in graph
        monkeypatch.setattr(sampling, "_GraphStep", _ReplayByCall)
        monkeypatch.setattr(sampling, "_graph_safe", lambda model, rows, device: None)
    _ReplayByCall.built = 0
    g = torch.Generator().manual_seed(3)
    kw = dict(max_new_tokens=6, samples=3, temperature=1.0, top_p=0.9, eos_ids=[7])
    calls = [([5, 9], 0), ([12, 3], 4), ([7, 7], 9)]  # prompt lengths (L + 6 <= 64: one bucket), seed
    for i, (lengths, seed) in enumerate(calls):
        prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
        want = generate(m, prompts, cuda_graph=False, seed=seed, stream_ids=[i, i + 1], **kw)
        got = generate(m, prompts, reuse_graph=True, seed=seed, stream_ids=[i, i + 1], **kw)
        assert got == want, (i, lengths)
        assert LAST_DECODE["cuda_graph"] and LAST_DECODE["reused"] == (i > 0)
    kept = m.__dict__["_decode_reuse"]
    assert m.model.layers[0].self_attn.kv_cache is None  # detached from the model between calls
    got = generate(m, prompts, reuse_graph=True, seed=1, **dict(kw, max_new_tokens=5))  # another key
    assert not LAST_DECODE["reused"] and m.__dict__["_decode_reuse"] is not kept
    assert got == generate(m, prompts, cuda_graph=False, seed=1, **dict(kw, max_new_tokens=5))
    if DEV != "cuda":
        assert _ReplayByCall.built == 2
    sampling.release_decode_graph(m)
    assert "_decode_reuse" not in m.__dict__
