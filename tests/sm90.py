"""Compiling Triton kernels for an H100 (sm_90) on a machine without a GPU.

Triton bundles ptxas and cuobjdump, so a child process without TRITON_INTERPRET (which
tests/conftest.py sets for the interpreter) can build every kernel for sm_90 and read its
registers, stack and local memory (spills). Tests prepend `SM90_HELPER` to the script they run in
that child (`run_child`, or `child_env` for their own Popen).
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SM90_HELPER = r'''
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sm90_compile(fn, signature, constexprs, aligned=(), **options):
    """(compiled kernel, {"REG", "STACK", "LOCAL"} from cuobjdump) of fn (Triton or Gluon) built for sm_90;
    signature: the types of the non-constexpr arguments; `aligned` names arguments Triton may
    assume 16-divisible."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else signature[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource
    if type(fn).__name__ == "GluonJITFunction":  # Gluon kernels build from Gluon's source class
        from triton.experimental.gluon._runtime import GluonASTSource as source
    k = triton.compile(source(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    found = {key: int(re.search(key + r":(\d+)", usage).group(1)) for key in ("REG", "STACK", "LOCAL")}
    found["LOOP_SPILLS"] = loop_spills(sass)
    return k, found


def loop_spills(sass):
    """Local-memory instructions (LDL/STL: spills) inside the kernel's loops, i.e. between a backward
    branch's target and the branch; a spill before or after the loops costs once per program."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), at) for at, text in ins
             if (m := re.search(r"BRA (?:\S+, )?0x([0-9a-f]+)", text)) and int(m.group(1), 16) < at]
    return sum(1 for at, text in ins if re.search(r"\b(LDL|STL)\b", text) and any(a <= at <= b for a, b in loops))
'''


def child_env() -> dict:
    """The environment of a compiling child: no interpreter, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def run_child(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run SM90_HELPER + script in a compiling child; stdout/stderr captured as text."""
    return subprocess.run([sys.executable, "-c", SM90_HELPER + script, *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
