"""Programmatic dependent launch (PDL, sm_90+), for kernels/nf4_tc.py's GEMV and cast launches.

A kernel launched with `launch_pdl=True` may start while the kernel before it still runs. It must
execute `griddepcontrol.wait` (which returns once that kernel has finished and its writes are
visible) before it reads or writes any memory an earlier kernel may touch;
`griddepcontrol.launch_dependents` lets the next kernel launch. The rule is transitive: a kernel
finishes only after its own wait, so waiting for the previous kernel also waits for every earlier
one. Kernels launched without the attribute (torch's, our others) keep plain stream order. Both
instructions are no-ops in a kernel launched without the attribute.

Where it pays (benchmarks/NOTES.md, session 7): a kernel with work that reads nothing earlier
kernels write. nf4_tc fills its 32 KB shared-memory table before its wait: -0.6 to -1.0 us per
call. Given to the decode step's small kernels too (RMSNorm, RoPE, attention: trigger at start,
then wait), the 32-layer step became 0.5 ms slower (13.0 vs 12.5 ms), so they stay without it.

Use: a kernel takes `PDL: tl.constexpr`, calls `pdl_start(PDL)` (or its own wait after work that
reads only constants), and is launched with `PDL=p, launch_pdl=p` where `p = pdl.enabled(tensor)`.
"""
import torch
import triton
import triton.language as tl

from kernels.nf4 import cuda_capability

ENABLED = True  # False: plain stream order everywhere (A/B runs: benchmarks/generate.py --no-pdl)

GDC_WAIT = "griddepcontrol.wait; mov.b32 $0, 0;"
GDC_LAUNCH = "griddepcontrol.launch_dependents; mov.b32 $0, 0;"
_WAIT, _LAUNCH = tl.constexpr(GDC_WAIT), tl.constexpr(GDC_LAUNCH)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (a no-op unless PDL)."""
    if PDL:
        tl.inline_asm_elementwise(_LAUNCH, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise(_WAIT, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels working on t launch with PDL: CUDA, compute capability 9.0 or later, and
    not turned off (ENABLED). The Triton interpreter runs no inline PTX, so CPU tensors never do."""
    return ENABLED and t.is_cuda and cuda_capability(t.device) >= (9, 0)
