"""Relaunch a compiled Triton kernel without `JITFunction.run`'s per-call work (host time).

A lone LoRA layer's step on the GEMM path is host-bound (benchmarks/NOTES.md, "LoRA, session 10"
and "session 11"). On an H200 host, an empty 24-argument kernel cost 27 us through fn[grid] and
8.6 us through its compiled C launcher: run() binds the arguments, builds a cache key from them and
a string of the options, reads knobs, and builds launch metadata for hooks nobody set.

`launch(fn, grid, *args, **kwargs)` does what `fn[grid](*args, **kwargs)` does. The first call with
a given specialization goes through `fn[grid]` (compiling if needed) and keeps the compiled kernel;
later calls with that specialization call its C launcher directly. The key here is at least as fine
as Triton's own: each tensor's dtype and 16-byte alignment, each int's ==1, %16 and integer width,
each float as a float, every other positional value and every keyword (constexprs, num_warps, ...)
by value, and the device. So a reused kernel is always the one Triton would have picked; a finer
key only costs an extra trip through `fn[grid]`, which then finds its kernel in Triton's cache.

It falls back to `fn[grid]` (always correct) when FAST is off, when launch hooks are set (profilers
such as proton use them), when the kernel has pre-run hooks, under the Triton interpreter (the call
returns no compiled kernel), and for a compiled kernel without the attributes used here (another
Triton version: tested with 3.6 on the GPU). Not checked here, unlike `fn[grid]`: that global
values a kernel reads have not changed since it was compiled (the kernels that use this module read
only module constants).
"""
import torch
from triton import knobs

FAST = True  # False: every launch through fn[grid] (A/B runs, debugging)

_Tensor = torch.Tensor
_KERNELS: dict = {}  # (fn, device, key) -> (launcher, function, packed metadata, trailing argument values)
_CUDA: list = []  # [torch.cuda.is_available()], asked once


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton.cdiv is a constexpr_function in Triton 3.6, ~3 us a call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), for host code (see cdiv)."""
    return 1 << (n - 1).bit_length()


def _key(args: tuple) -> tuple:
    """Per positional argument: a tensor's dtype and 16-byte alignment; an int's ==1, %16 and width
    (i32, i64 or u64); a float as float; anything else (None, bool, str) by value. One
    comprehension, no call per argument: this runs on every launch (~2 us for 30 arguments)."""
    return tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, _Tensor)
                  else (a == 1, a & 15 == 0, -2 ** 31 <= a < 2 ** 31, -2 ** 63 <= a < 2 ** 63)
                  if type(a) is int else float if type(a) is float else a
                  for a in args])


def _idle(hook) -> bool:
    """No launch hook is set (Triton 3.6 keeps an empty HookChain; older versions keep None)."""
    return hook is None or getattr(hook, "calls", None) == []


def hooks_idle(fn) -> bool:
    return (_idle(knobs.runtime.launch_enter_hook) and _idle(knobs.runtime.launch_exit_hook)
            and not getattr(fn, "pre_run_hooks", None))


def _grid3(grid) -> tuple:
    return (tuple(grid) + (1, 1))[:3]


def _remember(fn, kernel, n_args: int, kwargs: dict):
    """The launcher, handle, metadata and the values of the parameters after the positional ones
    (keywords or defaults) of a compiled kernel, or None where this Triton differs."""
    try:
        params = fn.params
        tail = []
        for p in params[n_args:]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            else:
                tail.append(p._param.default)
        return kernel.run, kernel.function, kernel.packed_metadata, tuple(tail)
    except AttributeError:  # interpreter, or a Triton whose compiled kernels look different
        return None


def _device() -> int:
    """The current CUDA device (Triton launches there too), -1 without CUDA."""
    if not _CUDA:
        _CUDA.append(torch.cuda.is_available())
    return torch.cuda.current_device() if _CUDA[0] else -1


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def launch(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs), through the compiled kernel's launcher once it is known (a grid
    given as a callable always goes through fn[grid]); returns the compiled kernel from fn[grid],
    None from the fast path."""
    if not FAST or callable(grid):
        return fn[grid](*args, **kwargs)
    device = _device()
    key = (fn, device, _key(args), tuple(kwargs.items()))
    entry = _KERNELS.get(key)
    if entry is not None and hooks_idle(fn):
        launcher, function, metadata, tail = entry
        g = _grid3(grid)
        launcher(g[0], g[1], g[2], _stream(device), function, metadata,
                 None, None, None, *args, *tail)
        return None
    kernel = fn[grid](*args, **kwargs)
    if entry is None and kernel is not None and hooks_idle(fn):
        entry = _remember(fn, kernel, len(args), kwargs)
        if entry is not None:
            _KERNELS[key] = entry
    return kernel


def clear() -> None:
    """Forget the kept kernels (tests; Triton's own cache is untouched)."""
    _KERNELS.clear()
