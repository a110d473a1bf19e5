"""MoE decode on the tensor-core core (kernels/moe_tc.py).

CPU (Triton interpreter): the plan, swiglu and combine kernels against PyTorch; the Gluon kernel
compiled for sm_90 (no spills, only its tables in shared memory). GPU: the whole block against
kernels.moe's reference for 1-8 tokens, routings that share experts and leave some unused, eagerly
and replayed from a CUDA graph.
"""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernels import moe as K
from kernels import moe_tc as M
from kernels import nf4_tc as TC
from kernels.nf4 import quantize_nf4
from tests.sm90 import SM90_HELPER, run_child

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=DEV)


@pytest.mark.parametrize("rows,E", [([[3, 1]], 8), ([[0, 2], [2, 5], [5, 0]], 8), ([[1], [1], [1], [1]], 4),
                                    ([[7, 6, 5], [0, 1, 2], [6, 5, 4]], 8), ([[2, 0]] * 8, 3)])
def test_plan_kernel_matches_reference(rows, E):
    ids = _ids(rows)
    P = ids.numel()
    plan = torch.full((1 + 2 * E + M.MAX_TOKENS * E,), -1, dtype=torch.int32, device=DEV)
    M._plan_kernel[(1,)](ids.reshape(-1), plan, P, E, BLOCK_P=max(2, 1 << (P - 1).bit_length()),
                         BLOCK_E=max(2, 1 << (E - 1).bit_length()), COLS=M.MAX_TOKENS)
    want = M.plan_reference(ids, E)
    R = int(want[0])
    assert plan[0].item() == R
    assert torch.equal(plan[1:1 + R].cpu(), want[1:1 + R])  # slots past R are never read
    assert torch.equal(plan[1 + E:].cpu(), want[1 + E:])


@pytest.mark.parametrize("n", [1, 1000, 3000])
def test_swiglu_zero_kernel(n):
    gu = torch.randn(2 * n, device=DEV) * 3
    want = (F.silu(gu[:n]) * gu[n:]).to(torch.float16)
    h = torch.empty(n, dtype=torch.float16, device=DEV)
    M._swiglu_zero_kernel[(-(-n // 1024),)](gu, h, n, BLOCK=1024)
    assert (h.float() - want.float()).abs().max().item() <= 1e-3 * want.float().abs().max().item()
    assert not gu.any()


@pytest.mark.parametrize("T,top_k,C", [(1, 2, 64), (3, 2, 1500), (2, 3, 200), (1, 3, 256), (1, 4, 4096)])
def test_combine_zero_kernel(T, top_k, C):
    g = torch.Generator().manual_seed(T)
    y = torch.randn(T * top_k, C, generator=g).to(DEV)
    wt = torch.softmax(torch.randn(T, top_k, generator=g), -1).to(DEV, torch.float16)
    want = K.moe_combine((wt.reshape(-1, 1).float() * y)[None], top_k, torch.float16)
    out = torch.empty(T, C, dtype=torch.float16, device=DEV)
    M._combine_zero_kernel[(T, -(-C // 1024))](y, wt.reshape(-1), out, C, TOP_K=top_k, BLOCK=1024)
    assert torch.allclose(out.float(), want.float(), rtol=2e-3, atol=1e-4)
    assert not y.any()


def test_cpu_input_is_refused_with_a_clear_error():
    w = _experts(128, 128, "cpu")
    ids, wt = _ids([[0, 1]]).cpu(), torch.ones(1, 2, dtype=torch.float16)
    assert not M.supported(torch.zeros(1, 128, dtype=torch.float16), ids, w)
    with pytest.raises(ValueError, match="moe_decode_tc needs sm_90"):
        M.moe_decode_tc(torch.zeros(1, 128, dtype=torch.float16), wt, ids, w)


def test_experts_record_whether_they_share_one_code2():
    w = _experts(128, 128, DEV)
    assert w.code2_shared
    odd = quantize_nf4(torch.randn(128, 128, device=DEV))
    odd.code2 = odd.code2.clone()
    odd.code2[7] += 1e-3
    assert not K.NF4Experts.build([odd] + w.w1[1:], w.w3, w.w2).code2_shared


_BUILD = textwrap.dedent(r'''
    import torch
    import kernels.moe_tc as M
    import kernels.nf4_tc as TC
    sig = dict(x_ptr="*bf16", table_ptr="*i64", plan_ptr="*i32", code2_ptr="*fp32", pairs_ptr="*i32", out_ptr="*fp32",
               zeros_ptr="*i32", P="i32", N="i32", K="i32", E="i32", X_WORDS="i32", ROW_DIV="i32")
    pointers = [n for n in sig if n.endswith("ptr")]
    for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
        for mats, per_segment, four, split in ((2, False, True, True), (2, False, False, False), (1, True, True, False),
                                               (1, True, False, True)):
            consts = dict(TC.kernel_constexprs(dtype, None, four), MATS=mats, COLS=8, W=4, REP=2,
                          PER_SEGMENT=per_segment, SPLIT=split, num_warps=4)
            k, u = sm90_compile(M._moe_tc_kernel, dict(sig, x_ptr=ty), consts, pointers, num_warps=4, maxnreg=128)
            print("RESULT", mats, int(four), k.metadata.shared, u["REG"], u["LOOP_SPILLS"], u["LOCAL"],
                  k.asm["ptx"].count("mma.sync"))
''')


def test_kernel_builds_for_sm90_with_only_its_tables_in_shared_memory():
    out = run_child(_BUILD)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 8
    for mats, four, shared, reg, loop_spills, local, n_mma in rows:
        assert int(shared) == TC.SHARED_BYTES  # the PTX reads its tables at offset 0: nothing else there
        # 4 programs per SM, and no spills in the loop (the four-column build at the 128-register cap
        # saves and restores a few registers once before it: 8-24 bytes of stack with Triton 3.6-3.9)
        assert int(loop_spills) == 0 and int(local) == 0 and int(reg) <= 128
        assert int(n_mma) == (16 if four == "1" else 32)  # 16 MMAs per row tile and span (four columns: 8), 2 tiles


def test_loop_spill_count_sees_only_spills_inside_loops():
    helper: dict = {}
    exec(SM90_HELPER, helper)  # noqa: S102 - the helper's own source, as the compiling child runs it
    sass = """
        /*0000*/   STL.64 [R1], R38 ;
        /*0010*/   IMAD R2, R3, R4, RZ ;
        /*0020*/   LDL.LU.64 R40, [R1] ;
        /*0030*/   HMMA.16816.F32.BF16 R16, R16, R44, RZ ;
        /*0040*/   @P0 BRA 0x20 ;
        /*0050*/   EXIT ;"""
    assert helper["loop_spills"](sass) == 1  # the LDL at 0x20 is in the loop 0x20..0x40, the STL is not
    assert helper["loop_spills"](sass.replace("LDL.LU.64 R40, [R1]", "IMAD R40, R1, R1, RZ")) == 0


def _experts(C, I, device, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = lambda n, k: quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(device))  # noqa: E731
    return K.NF4Experts.build([q(I, C) for _ in range(E)], [q(I, C) for _ in range(E)],
                              [q(C, I) for _ in range(E)])


def _decode_with_flag(cfg, flag: str, owner, spied: str):
    """A tiny bf16 NF4 model of cfg on the GPU decodes 2 steps after a 4-token prefill (3 rows), with
    models.transformer's `flag` on, then off; `owner.spied` is counted in each run.
    -> (logits on, logits off, calls on, calls off)."""
    import models.transformer as MT
    from models.nf4 import replace_linears_with_nf4

    torch.manual_seed(0)
    model = MT.Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.05)
    model = model.to("cuda", torch.bfloat16)
    replace_linears_with_nf4(model)
    ids = torch.randint(0, 256, (3, 6), device="cuda")
    calls, real = [], getattr(owner, spied)

    def logits(on):
        setattr(MT, flag, on)
        out = []
        with torch.no_grad():
            model.setup_kv_cache(3, 16)
            try:
                model(ids[:, :4], input_pos=torch.arange(4, device="cuda"))
                for t in (4, 5):
                    out.append(model(ids[:, t:t + 1], input_pos=torch.tensor([t], device="cuda")))
            finally:
                model.clear_kv_cache()
                setattr(MT, flag, True)
        return torch.cat(out, 1).float()

    setattr(owner, spied, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    try:
        on = logits(True)
        n_on = len(calls)
        off = logits(False)
    finally:
        setattr(owner, spied, real)
    return on, off, n_on, len(calls) - n_on


if torch.cuda.is_available() and M.supported(torch.zeros(1, 128, dtype=torch.bfloat16, device="cuda"),
                                             torch.zeros(1, 2, dtype=torch.int64, device="cuda"),
                                             _experts(128, 128, "cuda", E=2)):

    ROUTINGS = [[[3, 1]], [[0, 2], [2, 5], [5, 0]], [[1, 4], [1, 4], [1, 4], [1, 4]],
                [[7, 6], [0, 1], [6, 5], [4, 3], [2, 1], [0, 7], [3, 5], [6, 2]], [[2, 6, 1], [6, 2, 0]]]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("C,I", [(128, 256), (384, 640), (1024, 3584)])
    def test_moe_decode_tc_matches_reference(dtype, C, I):
        w = _experts(C, I, "cuda")
        for i, rows in enumerate(ROUTINGS):
            ids = _ids(rows)
            T, k = ids.shape
            g = torch.Generator().manual_seed(i)
            x = torch.randn(T, C, generator=g).to("cuda", dtype)
            wt = torch.softmax(torch.randn(T, k, generator=g), -1).to("cuda", dtype)
            for config in (None, dict(WAVES=1), dict(REP=1), dict(SPLIT=not M.DEFAULT_CONFIG["SPLIT"])):
                got = M.moe_decode_tc(x, wt, ids, w, config)
                want = K.moe_decode_reference(x, wt, ids, w)
                assert got.dtype == dtype and got.shape == (T, C)
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                assert err < 2e-2, (rows, config, err)

    def test_graph_replays_and_the_default_dispatch():
        w = _experts(256, 512, "cuda", seed=3)
        ids = _ids([[0, 2], [2, 5], [5, 7]])
        x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
        wt = torch.softmax(torch.randn(3, 2, device="cuda"), -1).to(torch.bfloat16)
        want = K.moe_decode_reference(x, wt, ids, w)
        rel = lambda a: ((a.float() - want.float()).abs().max() / want.float().abs().max()).item()  # noqa: E731
        assert rel(K.moe_decode(x, wt, ids, w)) < 2e-2  # the default takes moe_tc here
        calls = []
        real = M.moe_decode_tc
        M.moe_decode_tc = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        try:
            K.moe_decode(x, wt, ids, w)
        finally:
            M.moe_decode_tc = real
        assert calls == [1]
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            y = M.moe_decode_tc(x, wt, ids, w)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert rel(y) < 2e-2
        # the sums buffers are left at zero for the next call
        assert not TC.resident_sums(x.device, 2 * 6 * 512, "moe_gate_up").any()

    def test_uncombined_output_and_stale_sums():
        """combine=False hands out the slot sums (kernels.norm.SlotSums) whose combine is the output;
        sums left uncombined (an error before the next norm) are cleared by the next call."""
        from kernels.norm import SlotSums

        w = _experts(256, 512, "cuda", seed=4)
        ids = _ids([[0, 2], [2, 5], [5, 7]])
        x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
        wt = torch.softmax(torch.randn(3, 2, device="cuda"), -1).to(torch.bfloat16)
        want = M.moe_decode_tc(x, wt, ids, w)
        slots = M.moe_decode_tc(x, wt, ids, w, combine=False)
        assert isinstance(slots, SlotSums) and slots.sums.any()
        got = slots.combine()
        assert not slots.sums.any()
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2
        M.moe_decode_tc(x, wt, ids, w, combine=False)  # never combined
        again = M.moe_decode_tc(x, wt, ids, w)
        torch.testing.assert_close(again, want, rtol=0, atol=0)

    def test_decoding_combines_the_moe_output_in_the_next_norm():
        """A Mixtral-like model on moe_tc: decode steps with the combine deferred into the next
        RMSNorm (kernels.norm.SlotSums) give the logits of a separate combine launch."""
        import kernels.norm as N
        from models.config import ModelConfig

        cfg = ModelConfig(model_type="mixtral", vocab_size=256, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
        deferred, separate, n_on, n_off = _decode_with_flag(cfg, "DEFERRED_COMBINE", N.SlotSums, "take")
        # two decode steps, every layer (not the 12-token prefill)
        assert n_on == 2 * cfg.num_hidden_layers and n_off == 0
        assert ((deferred - separate).abs().max() / separate.abs().max()).item() < 2e-2


def test_programs_cover_the_items_in_short_streams():
    """ITEMS items per program at the most experts the pairs could pick, and never less than a wave."""
    c = dict(M.DEFAULT_CONFIG, ITEMS=10)
    assert M.programs_for(c, 132, 43008) == 4301  # 3 tokens, top-2: 6 experts x 2 weights x 112 x 32, 10 each
    assert M.programs_for(c, 132, 1000) == c["WAVES"] * 132  # few items: one wave
    assert M.programs_for(dict(c, ITEMS=None), 132, 43008) == c["WAVES"] * 132


# ----------------------------------------------------------------------------------------------
# Several weights over the same rows (attention's q, k, v while decoding): multi_gemv
# ----------------------------------------------------------------------------------------------


def test_segments_of_several_weights():
    """Segment rows: the largest of 1024/512/256/128 dividing every weight whose segments start on a
    nested-absmax block; each segment's pointers are offset into its weight's buffers."""
    q = [quantize_nf4(torch.randn(n, k)) for n, k in ((4096, 4096), (1024, 4096), (1024, 4096))]
    assert M.segment_rows(q) == 1024
    assert M.segment_rows([quantize_nf4(torch.randn(384, 512))]) == 128
    assert M.segment_rows([quantize_nf4(torch.randn(200, 512))]) is None  # no row count fits
    assert M.segment_rows([quantize_nf4(torch.randn(384, 192))]) is None  # 128 rows: 384 blocks, not % 256
    table = M.segment_table(q, 1024)
    assert len(table) == 5 and len(table[0]) == 6
    assert table[0][1] - table[0][0] == 1024 * 4096 // 2  # packed codes: 2 per byte
    assert table[1][3] - table[1][0] == 3 * 1024 * 4096 // 64  # absmax codes: one per 64
    assert table[2][2] - table[2][0] == 4 * 2 * 1024 * 4096 // 64 // 256  # nested absmax: fp32, one per 256
    assert table[0][4] == q[1].packed.data_ptr() and table[4][5] == q[2].offset.data_ptr()


@pytest.mark.parametrize("T,R,rows", [(1, 3, 128), (3, 6, 256), (8, 2, 1024)])
def test_segments_cast_zero_kernel(T, R, rows):
    out = torch.randn(R * T * rows, device=DEV)
    want = out.view(R, T, rows).permute(1, 0, 2).reshape(T, R * rows).half()
    y = torch.empty(T, R * rows, dtype=torch.float16, device=DEV)
    M._segments_cast_zero_kernel[(R, T)](out, y, T, rows, R * rows, BLOCK=rows)
    assert torch.equal(y, want) and not out.any()


def test_multi_gemv_refuses_cpu():
    q = [quantize_nf4(torch.randn(256, 512)) for _ in range(2)]
    assert not M.multi_supported(torch.zeros(2, 512, dtype=torch.float16), q)


if torch.cuda.is_available() and TC.gluon is not None and torch.cuda.get_device_capability() == (9, 0):

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("T,shapes", [(1, [(512, 512), (256, 512), (256, 512)]),
                                          (3, [(4096, 4096), (1024, 4096), (1024, 4096)]),
                                          (8, [(384, 256), (128, 256)])])
    def test_multi_gemv_matches_each_weight(T, shapes, dtype):
        from kernels.nf4 import nf4_matmul_reference
        g = torch.Generator().manual_seed(T)
        q = [quantize_nf4((torch.randn(n, k, generator=g) * 0.05).cuda()) for n, k in shapes]
        x = torch.randn(T, shapes[0][1], generator=g).to("cuda", dtype)
        assert M.multi_supported(x, q)
        want = torch.cat([nf4_matmul_reference(x, w) for w in q], dim=1)
        for _ in range(2):  # the sums are back at zero after each call
            got = M.multi_gemv(x, q)
            assert got.dtype == dtype and got.shape == want.shape
            assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 2e-2
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            y = M.multi_gemv(x, q)
        graph.replay()
        torch.cuda.synchronize()
        assert ((y.float() - want.float()).abs().max() / want.float().abs().max()).item() < 2e-2

    @pytest.mark.parametrize("flag,spied", [("FUSED_QKV", "multi_gemv"), ("FUSED_QKV_ROPE", "rope_from_sums")])
    def test_decoding_takes_the_fused_qkv_and_gives_the_same_logits(flag, spied):
        """A Mistral-like model whose attention projections fit multi_gemv: decode steps with
        q, k, v in one launch (FUSED_QKV), and with RoPE and the cache write in its cast's launch
        (FUSED_QKV_ROPE), give the logits of three separate GEMVs / of the separate RoPE launch."""
        import models.transformer as MT
        from models.config import ModelConfig

        cfg = ModelConfig(model_type="mistral", vocab_size=256, hidden_size=512, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64)
        fused, separate, n_on, n_off = _decode_with_flag(cfg, flag, M if spied == "multi_gemv" else MT, spied)
        assert n_on == 2 * cfg.num_hidden_layers and n_off == 0  # two decode steps, every layer (not the prefill)
        assert ((fused - separate).abs().max() / separate.abs().max()).item() < 2e-2
