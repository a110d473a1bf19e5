"""Batched decoding with a static KV cache and one shared prefill for N samples per prompt.

Rows are left padded and prefilled once; the cache is then repeated N times (row b's samples
are rows b*N .. b*N+N-1) and all B*N sequences decode together, each stopping at its own EOS.

Sampling is temperature + top-p through the Gumbel-max trick with counter-based noise: the
uniform draw for (seed, stream, step, token) is a hash of those four numbers. A sequence's
tokens therefore depend only on its own stream id (the caller's row id and the sample index),
never on what else shares the batch, so a shared prefill gives exactly the tokens of
independent runs, on CPU and GPU alike. Top-p keeps a token when the mass of strictly larger
logits is below top_p (ties kept or dropped together). On CUDA one launch samples and records
each step (kernels.sampling, `FUSED_SAMPLING`); elsewhere the PyTorch reference runs.

Decode steps run on static buffers (`_Decoder`): the last tokens, their positions and cache slot,
the step counter, the outputs and the done flags are device tensors updated in place, and a step
needs nothing from the host. On CUDA the step is captured once in a CUDA graph (after one eager
step that warms up kernels and caches) and replayed for every further step, so a step costs its
GPU time instead of ~1000 Python-issued launches. A replay runs the same kernels on the same
inputs as the eager step, so the tokens are the same. Where the model cannot run a step without
the host (the MoE expert loop, taken for more than `kernels.moe.MAX_PAIRS` (token, slot) pairs or
non-NF4 experts), or capture fails, decoding stays eager; `LAST_DECODE` says which path ran.
With `reuse_graph=True` (engine.generate's batches) the captured step, its buffers and KV caches
stay on the model, and a later call with the same key (rows, cache bucket, sampling settings, the
addresses of the model's tensors) refills them in place and replays it: no warm-up step, no capture.
"""
from __future__ import annotations

import torch

from kernels import sampling as sampling_kernels
from kernels.sampling import noise, sample_reference, stream_keys, token_hashes

FUSED_SAMPLING = True  # on CUDA, sample and record each step in one launch (kernels.sampling)
# A list to time decode steps (benchmarks/generate.py): every graph replay appends its CUDA (start, end)
# events, recorded around the replay on its stream; None (default): nothing recorded
TIMED_STEPS: list | None = None


def uniform_noise(seed: int, streams: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(S,) stream ids -> (S, vocab) uniforms in (0, 1), a pure function of its arguments."""
    return noise(stream_keys(seed, streams), step, token_hashes(vocab, streams.device))


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float, seed: int,
                streams: torch.Tensor, step: int) -> torch.Tensor:
    """logits (S, V) -> next tokens (S,). temperature <= 0 means greedy."""
    return sample_reference(logits, stream_keys(seed, streams), step, token_hashes(logits.shape[-1], logits.device),
                            temperature, top_p)


# ----------------------------------------------------------------------------------------------
# The decode loop: static buffers, one in-place step, optionally replayed from a CUDA graph
# ----------------------------------------------------------------------------------------------

LAST_DECODE: dict = {"cuda_graph": False, "why_not": "no decoding yet"}  # what the last generate() ran


class _Decoder:
    """The state of R = B*N decoding sequences as device tensors that keep their addresses.

    tok (R,) the last sampled tokens; pos (R,) their RoPE positions; slot (1,) their KV-cache slot;
    t (1,) the index of the last sampled token; out (R, max_new) the tokens (pad after EOS);
    lengths (R,) where each stopped; done (R,) finished; hit (R,) finished at the last step.
    `step` changes them only in place and never reads them on the host: it can be captured.
    """

    def __init__(self, model, mask: torch.Tensor, next_pos: torch.Tensor, first_slot: int,
                 keys: torch.Tensor, vocab: int, *, max_new_tokens: int, temperature: float,
                 top_p: float, eos: torch.Tensor, pad_id: int):
        R, device = next_pos.shape[0], next_pos.device
        self.model, self.mask, self.keys, self.eos = model, mask, keys, eos
        self.tok_hash = token_hashes(vocab, device)  # (V,)
        self.temperature, self.top_p, self.pad_id = temperature, top_p, pad_id
        self.tok = torch.full((R,), pad_id, dtype=torch.long, device=device)
        self.pos = next_pos.clone()
        self.slot = torch.full((1,), first_slot, dtype=torch.long, device=device)
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.lengths = torch.full((R,), max_new_tokens, dtype=torch.long, device=device)
        self.done = torch.zeros(R, dtype=torch.bool, device=device)
        self.hit = torch.zeros(R, dtype=torch.bool, device=device)

    def reset(self, mask: torch.Tensor, next_pos: torch.Tensor, first_slot: int, keys: torch.Tensor) -> None:
        """Start a new call on these buffers (in place: a captured step keeps reading them)."""
        self.mask.copy_(mask)
        self.keys.copy_(keys)
        self.pos.copy_(next_pos)
        self.slot.fill_(first_slot)
        self.tok.fill_(self.pad_id)
        self.t.zero_()
        self.out.fill_(self.pad_id)
        self.lengths.fill_(self.out.shape[1])
        self.done.zero_()
        self.hit.zero_()

    def record(self, logits: torch.Tensor) -> None:
        """Sample token t from logits (R, V) and write it into the outputs (one launch on CUDA)."""
        if FUSED_SAMPLING and logits.is_cuda:
            sampling_kernels.sample_and_record(
                logits, self.keys, self.t, temperature=self.temperature, top_p=self.top_p, pad_id=self.pad_id,
                eos=self.eos, tok=self.tok, out=self.out, lengths=self.lengths, done=self.done, hit=self.hit)
            return
        tok = sample_reference(logits, self.keys, self.t, self.tok_hash, self.temperature, self.top_p)
        tok = tok.masked_fill(self.done, self.pad_id)  # (R,)
        self.tok.copy_(tok)
        self.out.scatter_(1, self.t.expand(tok.shape[0])[:, None], tok[:, None])
        hit = (tok[:, None] == self.eos[None, :]).any(dim=-1) & ~self.done
        self.hit.copy_(hit)
        self.lengths.copy_(torch.where(hit, self.t, self.lengths))
        self.done |= hit

    def step(self) -> None:
        """Forward the last tokens into their cache slot, then sample and record the next ones."""
        logits = self.model(self.tok[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                            input_pos=self.slot)[:, -1]  # (R, V)
        self.t += 1
        self.slot += 1
        self.pos += 1
        self.record(logits)

    def buffers(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.slot, self.t, self.out, self.lengths, self.done, self.hit]


def _graph_safe(model, rows: int, device: torch.device) -> str | None:
    """None when a decode step of `rows` tokens needs no host sync, else the reason it does."""
    if device.type != "cuda":
        return "not on CUDA"
    for name, m in model.named_modules():
        check = getattr(m, "uses_decode_kernels", None)  # models.moe.SparseMoE
        if check is not None and not check(rows, device):
            return f"{name} runs its expert loop for {rows} tokens (host sync)"
    return None


class _StepCounts:
    """How many sequences are alive and how many stopped at the last step, read one step late.

    Reading them right after a step would make the host wait for it, and the GPU then wait for the
    host to launch the next step (~0.2 ms a step for a 32-layer Mixtral). Instead the counts are
    copied into pinned host memory behind the step (`enqueue`), the next step is launched, and only
    then are they read (`read`), so the GPU stays busy. Two buffers alternate."""

    def __init__(self, dec: "_Decoder"):
        self.dec = dec
        self.cuda = dec.done.is_cuda
        self.host = [torch.zeros(2, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.i = 0

    def enqueue(self) -> None:
        self.i ^= 1
        counts = torch.stack([(~self.dec.done).sum(), self.dec.hit.sum()])
        self.host[self.i].copy_(counts, non_blocking=self.cuda)
        if self.cuda:
            self.events[self.i].record()

    def read(self) -> tuple[int, int]:
        if self.cuda:
            self.events[self.i].synchronize()
        alive, hit = self.host[self.i].tolist()
        return alive, hit


class _GraphStep:
    """Calls `step` eagerly once on a side stream (the warm-up: Triton compiles, caches fill), then
    captures it in a CUDA graph and replays that graph. If capture fails it stays eager."""

    def __init__(self, step, device: torch.device):
        self.step, self.device = step, device
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = False
        self.failed: str | None = None

    def __call__(self) -> None:
        if self.graph is not None:
            if TIMED_STEPS is None:
                self.graph.replay()
                return
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.graph.replay()
            end.record()
            TIMED_STEPS.append((start, end))
        elif self.failed is not None:
            self.step()
        elif not self.warm:
            self._on_side_stream(self.step)
            self.warm = True
        else:
            self.graph = self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()

    def _on_side_stream(self, fn) -> None:
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            fn()
        main.wait_stream(self.stream)

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        # capture_begin/end directly: torch.cuda.graph would also run gc.collect() and empty the
        # allocator cache, which costs more than many decode steps. thread_local: a sync issued by
        # this thread fails the capture; other threads (data loaders) may go on.
        graph = torch.cuda.CUDAGraph()
        error = []

        def capture():
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
                error.append(f"{type(exc).__name__}: {exc}")
            finally:
                try:
                    graph.capture_end()
                except Exception as exc:  # noqa: BLE001
                    error.append(f"{type(exc).__name__}: {exc}")

        self._on_side_stream(capture)
        if error:
            self.failed = "capture failed: " + error[0][:300]
            return None
        return graph


class _Reuse:
    """What generate(reuse_graph=True) keeps on the model between calls: the captured step, its
    decoder buffers and the KV caches it reads, valid for one key (shapes, sampling settings and
    the addresses of every parameter and buffer)."""

    def __init__(self, key: tuple, caches: list, dec: "_Decoder", runner: _GraphStep):
        self.key, self.caches, self.dec, self.runner = key, caches, dec, runner


CACHE_BUCKET = 64  # with reuse_graph, KV caches are sized up to a multiple of this many slots


def _reuse_key(model, rows: int, cache_len: int, max_new_tokens: int, temperature: float, top_p: float,
               eos: tuple, pad_id: int) -> tuple:
    tensors = [t.data_ptr() for t in model.parameters()] + [t.data_ptr() for t in model.buffers()]
    return (rows, cache_len, max_new_tokens, temperature, top_p, eos, pad_id, tuple(tensors))


def release_decode_graph(model) -> None:
    """Free what generate(reuse_graph=True) keeps on the model (graph, KV caches, buffers)."""
    model.__dict__.pop("_decode_reuse", None)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 64, samples: int = 1,
             temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, eos_ids=(),
             pad_id: int = 0, stream_ids: list[int] | None = None,
             on_step=None, cuda_graph: bool = True, reuse_graph: bool = False) -> list[list[list[int]]]:
    """Decode `samples` continuations of each prompt; returns tokens[row][sample] (EOS excluded).

    stream_ids: a stable id per prompt (e.g. its row number in the dataset) that keys its random
    stream; by default the prompt's index in this call. on_step(n_new_tokens) is called after
    every decode step (progress bars). cuda_graph: replay decode steps from a CUDA graph when the
    model is on CUDA and its step is graph-safe (else, silently, eager steps; see LAST_DECODE).
    reuse_graph: keep the captured step (with its KV caches and buffers) on the model and replay it
    in later calls of the same shape and settings, skipping the warm-up step and the capture; the
    cache is sized up to a multiple of CACHE_BUCKET slots so that batches of nearby prompt lengths
    share it. Only while the model is not changed in ways that keep its tensors' addresses (a
    LoRA merge in place, a new backend): the key checks shapes, settings and addresses, not module
    state. `release_decode_graph(model)` frees it.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")
    device = next(model.parameters()).device
    B, N = len(prompts), samples
    L = max(len(p) for p in prompts)
    S = L + max_new_tokens  # KV-cache slots
    if reuse_graph:
        S = -(-S // CACHE_BUCKET) * CACHE_BUCKET
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding
        ids[i, L - len(p):] = torch.tensor(p, device=device)
        mask[i, L - len(p):] = 1
    pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L)
    stream_base = torch.tensor(stream_ids if stream_ids is not None else range(B), device=device)
    streams = (stream_base[:, None] * N + torch.arange(N, device=device)).reshape(-1)  # (B*N,)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)

    why_not = "cuda_graph=False" if not cuda_graph else _graph_safe(model, B * N, device)
    LAST_DECODE.update(cuda_graph=False, why_not=why_not, reused=False)
    reuse, key = None, None
    if reuse_graph and why_not is None:
        key = _reuse_key(model, B * N, S, max_new_tokens, temperature, top_p, tuple(eos.tolist()), pad_id)
        reuse = model.__dict__.get("_decode_reuse")
        if reuse is not None and reuse.key != key:
            release_decode_graph(model)  # another shape or model state: free it before allocating
            reuse = None
    runner = None
    model.setup_kv_cache(B, S)
    try:
        logits = model(ids, attention_mask=mask, position_ids=pos,
                       input_pos=torch.arange(L, device=device))[:, -1]  # (B, V)
        if N > 1:
            model.repeat_kv_cache(N)
            logits = logits.repeat_interleave(N, dim=0)  # (B*N, V)
            mask = mask.repeat_interleave(N, dim=0)
        next_pos, keys = pos[:, -1].repeat_interleave(N) + 1, stream_keys(seed, streams)
        if reuse is not None:  # the captured step reads these caches and buffers: refill them
            for layer, kept in zip(model.model.layers, reuse.caches):
                kept.k.copy_(layer.self_attn.kv_cache.k)
                kept.v.copy_(layer.self_attn.kv_cache.v)
                layer.self_attn.kv_cache = kept
            dec, runner = reuse.dec, reuse.runner
            dec.reset(mask, next_pos, L, keys)
            LAST_DECODE.update(reused=True)
        else:
            dec = _Decoder(model, mask, next_pos, L, keys, logits.shape[-1], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, eos=eos, pad_id=pad_id)
            runner = dec.step if why_not is not None else _GraphStep(dec.step, device)
        dec.record(logits)  # token 0, from the prefill's logits
        counts = _StepCounts(dec)
        counts.enqueue()
        for t in range(1, max_new_tokens + 1):
            if t < max_new_tokens:
                runner()  # step t is queued before step t - 1's counts are read: the GPU does not wait
            alive, hit = counts.read()  # of step t - 1
            if on_step is not None:
                on_step(alive + hit)
            if alive == 0 or t == max_new_tokens:
                break  # (a step queued after every sequence stopped changes nothing they keep)
            counts.enqueue()
        if isinstance(runner, _GraphStep):
            LAST_DECODE.update(cuda_graph=runner.graph is not None,
                               why_not=runner.failed or (None if runner.graph else "fewer than 3 steps"))
        out, lengths = dec.out.cpu(), dec.lengths.cpu()
        if key is not None and reuse is None and isinstance(runner, _GraphStep) and runner.graph is not None:
            model.__dict__["_decode_reuse"] = _Reuse(key, [layer.self_attn.kv_cache for layer in model.model.layers],
                                                     dec, runner)
    finally:
        model.clear_kv_cache()
        del runner  # frees the graph and its memory pool
    seqs = [out[i, :lengths[i]].tolist() for i in range(B * N)]
    return [seqs[b * N:(b + 1) * N] for b in range(B)]
