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
from tests.sm90 import run_child

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
               P="i32", N="i32", K="i32", E="i32", X_WORDS="i32", ROW_DIV="i32")
    pointers = [n for n in sig if n.endswith("ptr")]
    for dtype, ty in ((torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
        for mats in (2, 1):
            consts = dict(TC.kernel_constexprs(dtype), MATS=mats, COLS=8, W=4, REP=2, num_warps=4)
            k, u = sm90_compile(M._moe_tc_kernel, dict(sig, x_ptr=ty), consts, pointers, num_warps=4, maxnreg=128)
            print("RESULT", mats, k.metadata.shared, u["REG"], u["STACK"], u["LOCAL"], k.asm["ptx"].count("mma.sync"))
''')


def test_kernel_builds_for_sm90_with_only_its_tables_in_shared_memory():
    out = run_child(_BUILD)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 4
    for mats, shared, reg, stack, local, n_mma in rows:
        assert int(shared) == TC.SHARED_BYTES  # the PTX reads its tables at offset 0: nothing else there
        assert int(stack) == 0 and int(local) == 0 and int(reg) <= 128  # 4 programs per SM, no spills
        assert int(n_mma) == 32  # 16 MMAs per row tile and span, 2 row tiles


def _experts(C, I, device, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = lambda n, k: quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(device))  # noqa: E731
    return K.NF4Experts.build([q(I, C) for _ in range(E)], [q(I, C) for _ in range(E)],
                              [q(C, I) for _ in range(E)])


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
            for config in (None, dict(WAVES=1), dict(REP=1)):
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


def test_programs_cover_the_items_in_short_streams():
    """ITEMS items per program at the most experts the pairs could pick, and never less than a wave."""
    c = dict(M.DEFAULT_CONFIG, ITEMS=10)
    assert M.programs_for(c, 132, 43008) == 4301  # 3 tokens, top-2: 6 experts x 2 weights x 112 x 32, 10 each
    assert M.programs_for(c, 132, 1000) == c["WAVES"] * 132  # few items: one wave
    assert M.programs_for(dict(c, ITEMS=None), 132, 43008) == c["WAVES"] * 132
