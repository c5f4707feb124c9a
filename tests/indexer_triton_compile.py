"""Compile the lightning indexer's Triton scores kernel for a CUDA target with no GPU (Triton's bundled ptxas)
at the index widths of V4-Flash (128) and the smaller configs (64), in bf16 and fp32 (full-precision dots), and
print each build's registers and stack bytes per thread: ``test_indexer_triton`` runs this in a process without
TRITON_INTERPRET (the interpreter patches triton.language, so one process cannot do both).

    python tests/indexer_triton_compile.py     -> lines "<head dim> <dtype> REG:<n> STACK:<bytes>"
"""

from __future__ import annotations

import inspect

from moesaic.model.attention import _indexer_triton as kernels
from triton_sm90 import resource_usage


def main() -> None:
    names = inspect.signature(kernels._scores_kernel.fn).parameters
    for c in (64, 128):
        for dtype in ("bf16", "fp32"):
            types = {p: f"*{dtype}" if p == "q_ptr" else "*fp32" if p.endswith("_ptr") else "i32" for p in names}
            constexprs = {"C": c, "BLOCK_S": kernels.BLOCK_S, "BLOCK_N": kernels.BLOCK_N, "FULL_FP32": dtype == "fp32"}
            print(c, dtype, *resource_usage(kernels._scores_kernel, types, constexprs, 4), flush=True)


if __name__ == "__main__":
    main()
