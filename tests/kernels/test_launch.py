"""kernels/launch.py: the cached launcher gives fn[grid]'s results and never reuses a kernel compiled
for another specialization. A fake JIT function checks the mechanics on any machine; a real kernel
runs through it on the test device (on a GPU through the kept compiled kernel, on CPU through the
interpreter, which returns no compiled kernel to keep)."""
import types

import pytest
import torch
import triton
import triton.language as tl

from kernels import launch as LA

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh():
    LA.clear()
    yield
    LA.clear()


# ---- the key: at least as fine as Triton's specialization ----

def _spec(a):
    return LA._key((a,))[0]


def test_spec_tells_apart_what_triton_specializes_on():
    t = torch.zeros(64, dtype=torch.bfloat16)
    assert _spec(t) == _spec(torch.ones(64, dtype=torch.bfloat16))
    assert _spec(t) != _spec(t[1:])  # 2 bytes off: no longer 16-byte aligned
    assert _spec(t[8:]) == _spec(t)  # 16 bytes off: aligned
    assert _spec(t) != _spec(t.float())
    ints = [1, 2, 16, 2 ** 31, -(2 ** 31) - 1, 2 ** 63]
    assert len({_spec(v) for v in ints}) == len(ints)
    assert _spec(17) == _spec(33) and _spec(32) == _spec(48)
    assert _spec(True) != _spec(False) and _spec(True) != _spec(1)
    assert _spec(0.5) == _spec(3.0)
    assert _spec(None) is None and _spec("tf32") == "tf32"


# ---- the mechanics, with a fake JIT function ----

class _FakeKernel:
    def __init__(self, log):
        self.function, self.packed_metadata = "handle", ("meta",)
        self.run = lambda *a: log.append(("launcher", a))


class _FakeFn:
    """Triton's JIT function surface that launch() uses: fn[grid](...), params, pre_run_hooks."""

    def __init__(self, names_defaults, compiled=True):
        self.params = [types.SimpleNamespace(name=n, _param=types.SimpleNamespace(default=d))
                       for n, d in names_defaults]
        self.pre_run_hooks = []
        self.log = []
        self.compiled = compiled

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("run", grid, args, kwargs))
            return _FakeKernel(self.log) if self.compiled else None
        return run


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(LA, "_stream", lambda device: 1234)
    monkeypatch.setattr(LA, "_device", lambda: 0)
    return _FakeFn([("x", None), ("n", None), ("BLOCK", None), ("SCALE", 2)])


def test_second_launch_goes_to_the_compiled_launcher(fake):
    x = torch.zeros(32)
    LA.launch(fake, (4,), x, 100, BLOCK=64, num_warps=4)
    assert [e[0] for e in fake.log] == ["run"]
    LA.launch(fake, (5, 2), x, 200, BLOCK=64, num_warps=4)  # same specialization (200 % 16 != 0 like 100)
    kind, a = fake.log[-1]
    assert kind == "launcher"
    # grid padded to 3, stream, handle, metadata, no launch metadata / hooks, then every parameter in order:
    # positional ones, then keywords and defaults (constexprs included, as Triton's launcher takes them)
    assert a[:9] == (5, 2, 1, 1234, "handle", ("meta",), None, None, None)
    assert a[9] is x and a[10:] == (200, 64, 2)


@pytest.mark.parametrize("change", ["alignment", "dtype", "int_class", "keyword", "device"])
def test_a_new_specialization_goes_through_fn_grid(fake, monkeypatch, change):
    x = torch.zeros(32)
    LA.launch(fake, (1,), x, 100, BLOCK=64)
    args, kw = (x, 100), dict(BLOCK=64)
    if change == "alignment":
        args = (x[1:], 100)
    elif change == "dtype":
        args = (x.double(), 100)
    elif change == "int_class":
        args = (x, 96)  # divisible by 16: Triton specializes on that
    elif change == "keyword":
        kw = dict(BLOCK=128)
    else:
        monkeypatch.setattr(LA, "_device", lambda: 1)
    LA.launch(fake, (1,), *args, **kw)
    assert [e[0] for e in fake.log] == ["run", "run"]
    LA.launch(fake, (1,), *args, **kw)  # and that one is kept as well
    assert [e[0] for e in fake.log] == ["run", "run", "launcher"]


def test_fallbacks(fake, monkeypatch):
    x = torch.zeros(32)
    monkeypatch.setattr(LA, "FAST", False)
    for _ in range(2):
        LA.launch(fake, (1,), x, 100, BLOCK=64)
    assert [e[0] for e in fake.log] == ["run", "run"] and not LA._KERNELS
    monkeypatch.setattr(LA, "FAST", True)
    interp = _FakeFn([("x", None)], compiled=False)  # the interpreter returns no compiled kernel
    for _ in range(2):
        LA.launch(interp, (1,), x)
    assert [e[0] for e in interp.log] == ["run", "run"] and not LA._KERNELS
    for _ in range(2):  # a grid given as a callable: always fn[grid]
        LA.launch(fake, lambda meta: (1,), x, 100, BLOCK=64)
    assert [e[0] for e in fake.log] == ["run"] * 4 and not LA._KERNELS
    fake.pre_run_hooks.append(lambda *a, **k: None)
    for _ in range(2):
        LA.launch(fake, (1,), x, 100, BLOCK=64)
    assert [e[0] for e in fake.log] == ["run"] * 6 and not LA._KERNELS


def test_a_launch_hook_turns_the_fast_path_off(fake, monkeypatch):
    x = torch.zeros(32)
    LA.launch(fake, (1,), x, 100, BLOCK=64)
    hook = lambda metadata: None  # noqa: E731
    chain = triton.knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
    else:
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    try:
        LA.launch(fake, (1,), x, 100, BLOCK=64)
    finally:
        if hasattr(chain, "remove"):
            chain.remove(hook)
    assert [e[0] for e in fake.log] == ["run", "run"]
    LA.launch(fake, (1,), x, 100, BLOCK=64)
    assert fake.log[-1][0] == "launcher"


# ---- a real kernel ----

@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr, SHIFT: tl.constexpr = 1.0):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * factor + SHIFT, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_kernel_matches_fn_grid(dtype, monkeypatch):
    runs = []
    run = _scale_kernel.run
    monkeypatch.setattr(_scale_kernel, "run", lambda *a, **k: runs.append(1) or run(*a, **k))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g).to(DEV, dtype)
    for n, offset, factor in [(1000, 0, 0.5), (999, 1, 2.0), (777, 0, -1.5), (1000, 0, 3.0)]:
        x = base[offset:offset + n]  # offset 1: a misaligned pointer, another specialization
        want = torch.empty_like(x)
        _scale_kernel[(triton.cdiv(n, 256),)](x, want, n, factor, BLOCK=256)
        got = torch.full_like(x, float("nan"))
        LA.launch(_scale_kernel, (triton.cdiv(n, 256),), x, got, n, factor, BLOCK=256)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got.float(), x.float() * factor + 1.0, rtol=2e-3, atol=2e-3)
    # On a GPU the launches after the first of each specialization (aligned x; x one element off)
    # used the kept kernel: 4 fn[grid] calls for `want`, 2 from launch(). The interpreter: 4 + 4.
    assert len(LA._KERNELS) == (2 if DEV == "cuda" else 0)
    assert len(runs) == (6 if DEV == "cuda" else 8)


def test_host_cdiv_and_next_power_of_2_match_triton():
    for a in list(range(0, 70)) + [4095, 4096, 4097, 5120, 2 ** 31 - 1, 2 ** 40 + 3]:
        for b in (1, 2, 3, 16, 64, 256, 1000):
            assert LA.cdiv(a, b) == triton.cdiv(a, b) == -(-a // b)
    for n in list(range(1, 70)) + [1000, 1024, 1025, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1]:
        assert LA.next_power_of_2(n) == triton.next_power_of_2(n)
