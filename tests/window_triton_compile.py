"""Compile the window attention's Triton kernels for a CUDA target with no GPU (Triton's bundled ptxas) at the
launch configurations of two realistic shapes (16 heads of 128 and V4-Flash's 64 heads of 512, window 128;
bf16) and print each one's registers and stack bytes per thread: ``test_window_triton`` runs this in a process
without TRITON_INTERPRET (the interpreter patches triton.language, so one process cannot do both).

    python tests/window_triton_compile.py     -> lines "<kernel> <head dim> <extra> REG:<n> STACK:<bytes>"
"""

from __future__ import annotations

import inspect

import torch

from moesaic.model.attention import _window_triton as W
from triton_sm90 import resource_usage

POINTER_TYPES = {"idx_ptr": "*i64", "msk_ptr": "*u8", "q_ptr": "*bf16", "kv_ptr": "*bf16", "ent_ptr": "*bf16",
                 "out_ptr": "*bf16", "do_ptr": "*bf16", "dq_ptr": "*bf16"}  # the rest: fp32 buffers


def main() -> None:
    for heads, c in ((16, 128), (64, 512)):
        for kernel, tile in ((W._forward_kernel, 8192), (W._backward_kernel, 4096)):  # as forward_op/backward_op
            for extra in (W._NO_EXTRA, W._IDX, W._MASK):
                block_h, block_n, block_k = W._blocks(torch.empty(1, 1, heads, c, device="meta"), 128, tile)
                constexprs = {"C": c, "BLOCK_H": block_h, "BLOCK_N": block_n, "BLOCK_K": block_k, "EXTRA": extra,
                              "STATS": True, "FULL_FP32": False}
                types = {p: POINTER_TYPES.get(p, "*fp32") if p.endswith("_ptr") else "fp32" if p == "scale" else "i32"
                         for p in inspect.signature(kernel.fn).parameters}
                usage = resource_usage(kernel, types, constexprs, W._num_warps(c))
                print(kernel.fn.__name__, c, extra, *usage, flush=True)


if __name__ == "__main__":
    main()
