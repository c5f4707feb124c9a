"""Compile Triton kernels for an sm_90 GPU on a machine without one (Triton's bundled ptxas) and read each
cubin's registers and stack bytes per thread (cuobjdump -res-usage): what the GPU tests of the kernels check
for register spills. The interpreter the other tests run under patches triton.language, so the compiling
happens in a script of its own (``run_script``), in a process without TRITON_INTERPRET."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(kernel: triton.JITFunction, types: dict[str, str], constexprs: dict[str, object],
                   num_warps: int) -> list[str]:
    """["REG:<n>", "STACK:<bytes>"] of ``kernel`` built for sm_90; ``types`` gives the non-constexpr
    parameters' Triton types, ``constexprs`` the values of those of the kernel's constexprs it names."""
    names = inspect.signature(kernel.fn).parameters
    signature = {p: "constexpr" if p in constexprs else types[p] for p in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature,
                                        constexprs={k: v for k, v in constexprs.items() if k in names}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return re.findall(r"(?:REG|STACK):\d+", usage)


def run_script(name: str) -> list[list[str]]:
    """The whitespace-split lines a compile script in tests/ prints (skips where triton has no NVIDIA tools)."""
    if not CUOBJDUMP.exists():
        pytest.skip("this triton build has no bundled NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name(name))], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line.split() for line in out.stdout.splitlines()]
