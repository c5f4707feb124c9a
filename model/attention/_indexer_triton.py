"""The lightning indexer's scores as one Triton kernel (``model.attention.backend="triton"``).

I[b, s, n] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, :, n]): the torch ops (``Indexer._scores_t``)
write the per-head dots [s * H, n] to memory, read them back for the ReLU and again for the head-weighted
sum; here a [BLOCK_S, BLOCK_N] tile of scores stays in registers while the heads stream through it, the
keys of the tile loaded once for all heads. Selection only (no gradient): the indexer loss rescores the
picks (``selected_scores``). fp32 queries multiply in full fp32 (no TF32), so the scores and with them
the exact top-k tie rule see what the torch ops compute, up to summation order; fp16/bf16 queries use the
tensor cores with fp32 accumulation. Runs on CUDA tensors, and on CPU ones under ``TRITON_INTERPRET=1``
(how CI tests it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_S, BLOCK_N = 32, 64  # queries x entries per program: one fp32 score tile in registers


@triton.jit
def _scores_kernel(q_ptr, w_ptr, k_ptr, out_ptr, S, N, H,
                   sq_b, sq_s, sq_h, sw_b, sw_s, sk_b, sk_c, so_b, so_s,
                   C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, FULL_FP32: tl.constexpr):
    pid_s, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: q's offsets
    offs_s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)  # can pass 2^31 (B * S * H * c elements)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, C)
    in_s, in_n = offs_s < S, offs_n < N
    keys = tl.load(k_ptr + b * sk_b + offs_c[:, None] * sk_c + offs_n[None, :], mask=in_n[None, :], other=0.0)
    keys = keys.to(q_ptr.dtype.element_ty)  # [C, BLOCK_N] in the queries' dtype, once for all heads
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    for h in range(H):
        q = tl.load(q_ptr + b * sq_b + offs_s[:, None] * sq_s + h * sq_h + offs_c[None, :], mask=in_s[:, None],
                    other=0.0)  # [BLOCK_S, C]
        if FULL_FP32:
            dots = tl.dot(q, keys, input_precision="ieee")
        else:
            dots = tl.dot(q, keys)  # fp32 accumulation
        w = tl.load(w_ptr + b * sw_b + offs_s * sw_s + h, mask=in_s, other=0.0)
        acc += w[:, None] * tl.maximum(dots, 0.0)
    tl.store(out_ptr + b * so_b + offs_s[:, None] * so_s + offs_n[None, :], acc, mask=in_s[:, None] & in_n[None, :])


def indexer_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """``Indexer._scores_t`` by the kernel: q [B, S, H, c], w [B, S, H], keys_t [B, c, N] -> [B, S, N] fp32."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.attention.backend='triton' runs CUDA tensors (CPU ones only under TRITON_INTERPRET=1)")
    B, S, H, c = q.shape
    N = keys_t.shape[-1]
    if c < 16 or c & (c - 1):
        raise ValueError(f"the Triton indexer needs index_head_dim a power of 2 >= 16, not {c}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    w, keys_t = w.float().contiguous(), keys_t.float().contiguous()
    out = torch.empty(B, S, N, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(S, BLOCK_S), triton.cdiv(N, BLOCK_N), B)
    _scores_kernel[grid](q, w, keys_t, out, S, N, H, q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1),
                         keys_t.stride(0), keys_t.stride(1), out.stride(0), out.stride(1),
                         C=c, BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, FULL_FP32=q.dtype == torch.float32)
    return out
