"""The decode-path kernels (kernels/norm.py, rope.py, attention.py) compile for an H100 (sm_90)
at Mixtral shapes in bf16 without spilling registers: Triton's own ptxas, no GPU needed (the CPU
tests run them only through the interpreter, which skips the compiler)."""
import textwrap

from tests.sm90 import run_child

_COMPILE = textwrap.dedent("""
    from kernels import attention, norm, rope

    def compile_(name, fn, sig, consts, warps, **opts):
        _, usage = sm90_compile(fn, sig, consts, num_warps=warps, **opts)
        print(name, "regs", usage["REG"], "stack", usage["STACK"], "local", usage["LOCAL"], flush=True)

    bf, i32 = "*bf16", "i32"
    ints = lambda names: {n: i32 for n in names.split()}
    for res, slots in ((True, 0), (False, 0), (True, 2)):  # slots: an MoE output's SlotSums (top-2)
        sig = dict(x_ptr=bf, r_ptr="*fp32" if slots else bf, w_ptr=bf, y_ptr=bf, s_ptr=bf,
                   wt_ptr=bf if slots else "constexpr", C=i32, eps="fp32",
                   **ints("stride_x stride_r stride_y stride_s"))
        consts = dict(HAS_RESIDUAL=res, BLOCK=4096, SLOTS=slots, **({} if slots else dict(wt_ptr=None)))
        compile_(f"norm_residual={res}_slots={slots}", norm._add_rms_norm_kernel, sig, consts, 8,
                 enable_fp_fusion=False)
    for cache in (True, False):
        sig = {n: bf for n in "q_ptr k_ptr v_ptr cos_ptr sin_ptr qo_ptr ko_ptr ck_ptr cv_ptr".split()}
        sig.update(pos_ptr="*i64", **ints("T stride_q stride_k stride_v stride_qo stride_ko stride_cos_b "
                                          "stride_cos_t stride_sin_b stride_sin_t stride_c_b stride_c_h "
                                          "stride_c_s stride_cv_b stride_cv_h stride_cv_s"))
        compile_(f"rope_cache={cache}", rope._rope_qkv_kernel, sig, dict(H=32, D=128, WRITE_CACHE=cache, BLOCK=64),
                 1, enable_fp_fusion=False)
    for rows in (16, 32, 64):
        qkv = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf)
        strides = ints("stride_qb stride_qt stride_qh stride_kb stride_kh stride_ks stride_vb stride_vh stride_vs")
        c = attention.config(rows, 128)
        consts = dict(G=4, D=128, BLOCK_M=rows, BLOCK_D=128, BLOCK_S=c["BLOCK_S"], HAS_MASK=True, HAS_WINDOW=True)
        sig = dict(qkv, pos_ptr="*i64", m_ptr="*i64", ml_ptr="*fp32", acc_ptr="*fp32", T=i32, S=i32, window=i32,
                   scale="fp32", BLOCKS_PER_SPLIT=i32, **strides, stride_mb=i32)
        compile_(f"attention_split_rows={rows}", attention._split_kernel, sig, consts, c["num_warps"])
        sig = dict(qkv, o_ptr=bf, pos_ptr="*i64", m_ptr="*i64", ml_ptr="*fp32", acc_ptr="*fp32", T=i32, S=i32,
                   window=i32, scale="fp32", N_SPLIT=i32, **strides,
                   **ints("stride_ob stride_ot stride_oh stride_mb"))
        compile_(f"attention_combine_rows={rows}", attention._combine_kernel, sig, dict(consts, UNROLL=c["UNROLL"]),
                 c["num_warps"])
""")


def test_decode_kernels_compile_for_sm90_without_spills():
    r = run_child(_COMPILE)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.splitlines()]
    assert len(lines) == 11, r.stdout
    for line in lines:
        assert line[4] == "0" and line[6] == "0", f"register spill: {' '.join(line)}"
