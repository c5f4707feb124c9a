"""Compile mHC's Triton kernels for a CUDA target with no GPU (Triton's bundled ptxas) and print each one's
registers and stack bytes per thread (cuobjdump -res-usage): ``test_mhc_triton`` runs this in a process without
TRITON_INTERPRET (the interpreter patches triton.language, so one process cannot do both).

    python tests/mhc_triton_compile.py     -> lines "<kernel> <streams dtype> REG:<n> STACK:<bytes>"
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moesaic.model import _mhc_triton as K

KERNELS = ("_mix_collapse_kernel", "_collapse_kernel", "_collapse_backward_kernel", "_mix_collapse_dx_kernel",
           "_fn_grad_kernel", "_expand_kernel", "_expand_backward_kernel")
# The launch configuration at V4's widths (n = 4, D = 4096: (2+n)*n = 24 projection outputs, padded to 32).
CONSTEXPRS = {"N": 4, "N_P": 4, "OUT_P": 32, "BLOCK_D": K._block_d(4096), "WRITE_DX": True}
STREAM_POINTERS = {"x_ptr", "y_ptr", "g_ptr", "dx_ptr", "dy_ptr"}  # in the streams' dtype; the rest are fp32


def main() -> None:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for name in KERNELS:
        kernel = getattr(K, name)
        for dtype in ("fp32", "bf16"):
            signature, constexprs = {}, {}
            for p in inspect.signature(kernel.fn).parameters:
                if p in CONSTEXPRS or p == "BLOCK_T":
                    signature[p] = "constexpr"
                    constexprs[p] = (2 * K._BLOCK_T if name == "_fn_grad_kernel" else K._BLOCK_T) \
                        if p == "BLOCK_T" else CONSTEXPRS[p]
                elif p.endswith("_ptr"):
                    signature[p] = f"*{dtype}" if p in STREAM_POINTERS else "*fp32"
                else:
                    signature[p] = "fp32" if p.endswith("eps") else "i32"
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": K._NUM_WARPS})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                       check=True).stdout
            print(name, dtype, *re.findall(r"(?:REG|STACK):\d+", usage))


if __name__ == "__main__":
    main()
