"""Compile mHC's Triton kernels for a CUDA target with no GPU (Triton's bundled ptxas) and print each one's
registers and stack bytes per thread (cuobjdump -res-usage): ``test_mhc_triton`` runs this in a process without
TRITON_INTERPRET (the interpreter patches triton.language, so one process cannot do both).

    python tests/mhc_triton_compile.py     -> lines "<kernel> <streams dtype> REG:<n> STACK:<bytes>"
"""

from __future__ import annotations

import inspect

from moesaic.model import _mhc_triton as K
from triton_sm90 import resource_usage

KERNELS = ("_mix_collapse_kernel", "_collapse_kernel", "_collapse_backward_kernel", "_mix_collapse_dx_kernel",
           "_fn_grad_kernel", "_expand_kernel", "_expand_backward_kernel")
# The launch configuration at V4's widths (n = 4, D = 4096: (2+n)*n = 24 projection outputs, padded to 32).
CONSTEXPRS = {"N": 4, "N_P": 4, "OUT_P": 32, "BLOCK_D": K._block_d(4096), "WRITE_DX": True}
STREAM_POINTERS = {"x_ptr", "y_ptr", "g_ptr", "dx_ptr", "dy_ptr"}  # in the streams' dtype; the rest are fp32


def main() -> None:
    for name in KERNELS:
        kernel = getattr(K, name)
        block_t = 2 * K._BLOCK_T if name == "_fn_grad_kernel" else K._BLOCK_T
        for dtype in ("fp32", "bf16"):
            types = {p: (f"*{dtype}" if p in STREAM_POINTERS else "*fp32") if p.endswith("_ptr")
                     else "fp32" if p.endswith("eps") else "i32" for p in inspect.signature(kernel.fn).parameters}
            usage = resource_usage(kernel, types, {**CONSTEXPRS, "BLOCK_T": block_t}, K._NUM_WARPS)
            print(name, dtype, *usage)


if __name__ == "__main__":
    main()
