"""mHC's passes over the streams as Triton kernels (``model.attention.backend="triton"``, ``mhc.py`` selects them).

Per sublayer the torch ops go over the [T, n, D] streams many times: an fp32 copy of 16-bit streams for the
mapping projection, the projection, the RMS norm, the collapse's bmm, the expand's bmm and its addcmul (each
with an intermediate in memory), and as many again in backward. Here:

* ``mix_collapse``: per tile of tokens, phi . x~ and sum(x~^2) (fp32, the streams converted on load), then
  pre = sigmoid(a0 mix[:n] + b[:n]) + eps and sum_i pre_i X_i. pre needs the whole row's projection, so the
  tile's streams are read twice, the second time right after the first, so that it can come from cache. Its
  backward (``mix_collapse_backward``, after dpre from ``collapse_backward``): dX of the collapse and the
  projection together in one read of X, and dphi in another (each program sums all tokens for its columns);
* ``Collapse`` (pre given), its backward ``collapse_backward``: dX and dpre in one read of X and the gradient;
* ``Expand``: post_j F + sum_i comb[i, j] X_i; backward: dF, dX, dpost, dcomb in one read of X, F, the gradient.

The per-token math on the [T, (2+n)n] projection (post, comb's Sinkhorn over n x n, pre's sigmoid
derivative, the projection's per-token backward terms) stays torch ops in ``mhc.py``. Sums run in fp32
(tl.dot in full fp32, no TF32); outputs take the streams' dtype. Runs on CUDA tensors, and on CPU ones under
``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK_T = 16  # tokens per program (tl.dot's minimum tile side in the projection)
# 8 warps and 32-wide column tiles: every kernel compiles for sm_90 without register spills (cuobjdump -res-usage)
_NUM_WARPS = 8


@triton.jit
def _mix_collapse_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, lin_ptr, r_ptr, pre_ptr, y_ptr, T, D, OUT,
                         sx_t, sx_i, s_fn, norm_eps, eps,
                         N: tl.constexpr, N_P: tl.constexpr, OUT_P: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # lin[t, o] = sum_{i,d} x[t, i, d] fn[o, i*D + d]; r[t] = (mean_{i,d} x[t, i, d]^2 + norm_eps)^-1/2;
    # pre[t, i] = sigmoid(scale[0] lin[t, i] r[t] + base[i]) + eps; y[t, d] = sum_i pre[t, i] x[t, i, d]
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # int64: T * n * D may pass 2^31
    offs_o, offs_d, offs_i = tl.arange(0, OUT_P), tl.arange(0, BLOCK_D), tl.arange(0, N_P)
    in_t, in_o, in_i = offs_t < T, offs_o < OUT, offs_i < N
    acc = tl.zeros((BLOCK_T, OUT_P), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for i in tl.static_range(N):
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            in_d = d < D
            x = tl.load(x_ptr + offs_t[:, None] * sx_t + i * sx_i + d[None, :], mask=in_t[:, None] & in_d[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
            w = tl.load(fn_ptr + offs_o[None, :] * s_fn + i * D + d[:, None], mask=in_d[:, None] & in_o[None, :],
                        other=0.0)  # [BLOCK_D, OUT_P]: fn^T
            acc += tl.dot(x, w, input_precision="ieee")
            sq += tl.sum(x * x, axis=1)
    r = 1.0 / tl.sqrt(sq / (N * D) + norm_eps)
    z = acc * r[:, None] * tl.load(scale_ptr) + tl.load(base_ptr + offs_o, mask=offs_o < N, other=0.0)
    # [BLOCK_T, OUT_P] -> the first N columns [BLOCK_T, N_P]
    pre = tl.sum(tl.where(offs_i[None, :, None] == offs_o[None, None, :], tl.sigmoid(z)[:, None, :], 0.0), axis=2) + eps
    m2 = in_t[:, None] & in_i[None, :]
    tl.store(lin_ptr + offs_t[:, None] * OUT + offs_o[None, :], acc, mask=in_t[:, None] & in_o[None, :])
    tl.store(r_ptr + offs_t, r, mask=in_t)
    tl.store(pre_ptr + offs_t[:, None] * N + offs_i[None, :], pre, mask=m2)
    for d0 in range(0, D, BLOCK_D):  # the token tile's streams again, just read: a cache hit where they still fit
        d = d0 + offs_d
        in_d = d < D
        x3 = tl.load(x_ptr + offs_t[:, None, None] * sx_t + offs_i[None, :, None] * sx_i + d[None, None, :],
                     mask=m2[:, :, None] & in_d[None, None, :], other=0.0).to(tl.float32)  # [BLOCK_T, N_P, BLOCK_D]
        y = tl.sum(pre[:, :, None] * x3, axis=1)
        tl.store(y_ptr + offs_t[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=in_t[:, None] & in_d[None, :])


@triton.jit
def _collapse_kernel(x_ptr, pre_ptr, y_ptr, T, D, sx_t, sx_i,
                     N: tl.constexpr, N_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # y[t, d] = sum_i pre[t, i] x[t, i, d]
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, N_P)
    in_t, in_i, in_d = offs_t < T, offs_i < N, d < D
    pre = tl.load(pre_ptr + offs_t[:, None] * N + offs_i[None, :], mask=in_t[:, None] & in_i[None, :], other=0.0)
    m3 = (in_t[:, None] & in_i[None, :])[:, :, None] & in_d[None, None, :]
    x = tl.load(x_ptr + offs_t[:, None, None] * sx_t + offs_i[None, :, None] * sx_i + d[None, None, :], mask=m3,
                other=0.0).to(tl.float32)  # [BLOCK_T, N_P, BLOCK_D]
    y = tl.sum(pre[:, :, None] * x, axis=1)
    tl.store(y_ptr + offs_t[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=in_t[:, None] & in_d[None, :])


@triton.jit
def _collapse_backward_kernel(x_ptr, pre_ptr, g_ptr, dx_ptr, dpre_ptr, T, D, sx_t, sx_i,
                              N: tl.constexpr, N_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                              WRITE_DX: tl.constexpr):
    # dx[t, i, d] = pre[t, i] g[t, d] (if WRITE_DX); dpre[t, i] = sum_d x[t, i, d] g[t, d]
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_i, offs_d = tl.arange(0, N_P), tl.arange(0, BLOCK_D)
    in_t, in_i = offs_t < T, offs_i < N
    m2 = in_t[:, None] & in_i[None, :]
    pre = tl.load(pre_ptr + offs_t[:, None] * N + offs_i[None, :], mask=m2, other=0.0)
    dpre = tl.zeros((BLOCK_T, N_P), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        in_d = d < D
        m3 = m2[:, :, None] & in_d[None, None, :]
        x = tl.load(x_ptr + offs_t[:, None, None] * sx_t + offs_i[None, :, None] * sx_i + d[None, None, :], mask=m3,
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs_t[:, None] * D + d[None, :], mask=in_t[:, None] & in_d[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        dpre += tl.sum(x * g[:, None, :], axis=2)
        if WRITE_DX:
            dx = pre[:, :, None] * g[:, None, :]
            tl.store(dx_ptr + offs_t[:, None, None] * (N * D) + offs_i[None, :, None] * D + d[None, None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=m3)
    tl.store(dpre_ptr + offs_t[:, None] * N + offs_i[None, :], dpre, mask=m2)


@triton.jit
def _mix_collapse_dx_kernel(x_ptr, pre_ptr, g_ptr, dlin_ptr, coef_ptr, fn_ptr, dx_ptr, T, D, OUT, sx_t, sx_i, s_fn,
                            N: tl.constexpr, OUT_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dx[t, i, d] = pre[t, i] g[t, d] + sum_o dlin[t, o] fn[o, i*D + d] + coef[t] x[t, i, d]
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_o = tl.arange(0, OUT_P)
    in_t, in_d, in_o = offs_t < T, d < D, offs_o < OUT
    md = in_t[:, None] & in_d[None, :]
    dlin = tl.load(dlin_ptr + offs_t[:, None] * OUT + offs_o[None, :], mask=in_t[:, None] & in_o[None, :], other=0.0)
    coef = tl.load(coef_ptr + offs_t, mask=in_t, other=0.0)
    g = tl.load(g_ptr + offs_t[:, None] * D + d[None, :], mask=md, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
    for i in tl.static_range(N):
        x = tl.load(x_ptr + offs_t[:, None] * sx_t + i * sx_i + d[None, :], mask=md, other=0.0).to(tl.float32)
        p = tl.load(pre_ptr + offs_t * N + i, mask=in_t, other=0.0)
        w = tl.load(fn_ptr + offs_o[:, None] * s_fn + i * D + d[None, :], mask=in_o[:, None] & in_d[None, :],
                    other=0.0)  # [OUT_P, BLOCK_D]
        dx = tl.dot(dlin, w, input_precision="ieee") + coef[:, None] * x + p[:, None] * g
        tl.store(dx_ptr + offs_t[:, None] * (N * D) + i * D + d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=md)


@triton.jit
def _fn_grad_kernel(x_ptr, dlin_ptr, dfn_ptr, T, D, OUT, sx_t, sx_i,
                    OUT_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dfn[o, i*D + d] = sum_t dlin[t, o] x[t, i, d]: one program per (stream i, column tile), over all tokens
    i = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_o, offs_t = tl.arange(0, OUT_P), tl.arange(0, BLOCK_T)
    in_d, in_o = d < D, offs_o < OUT
    acc = tl.zeros((OUT_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + offs_t).to(tl.int64)
        in_t = t < T
        dlin_t = tl.load(dlin_ptr + t[None, :] * OUT + offs_o[:, None], mask=in_o[:, None] & in_t[None, :],
                         other=0.0)  # [OUT_P, BLOCK_T]
        x = tl.load(x_ptr + t[:, None] * sx_t + i * sx_i + d[None, :], mask=in_t[:, None] & in_d[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
        acc += tl.dot(dlin_t, x, input_precision="ieee")
    tl.store(dfn_ptr + offs_o[:, None] * (D * tl.num_programs(0)) + i * D + d[None, :], acc,
             mask=in_o[:, None] & in_d[None, :])


@triton.jit
def _expand_kernel(y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, D, sx_t, sx_i,
                   N: tl.constexpr, N_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[t, j, d] = post[t, j] y[t, d] + sum_i comb[t, i, j] x[t, i, d]
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, N_P)
    in_t, in_i, in_d = offs_t < T, offs_i < N, d < D
    m2, md = in_t[:, None] & in_i[None, :], in_t[:, None] & in_d[None, :]
    x = tl.load(x_ptr + offs_t[:, None, None] * sx_t + offs_i[None, :, None] * sx_i + d[None, None, :],
                mask=m2[:, :, None] & in_d[None, None, :], other=0.0).to(tl.float32)  # [BLOCK_T, N_P, BLOCK_D]
    y = tl.load(y_ptr + offs_t[:, None] * D + d[None, :], mask=md, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
    for j in tl.static_range(N):
        c = tl.load(comb_ptr + offs_t[:, None] * (N * N) + offs_i[None, :] * N + j, mask=m2, other=0.0)  # comb[:, :, j]
        p = tl.load(post_ptr + offs_t * N + j, mask=in_t, other=0.0)
        out = p[:, None] * y + tl.sum(c[:, :, None] * x, axis=1)
        tl.store(out_ptr + offs_t[:, None] * (N * D) + j * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=md)


@triton.jit
def _expand_backward_kernel(y_ptr, x_ptr, post_ptr, comb_ptr, g_ptr, dy_ptr, dx_ptr, dpost_ptr, dcomb_ptr,
                            T, D, sx_t, sx_i,
                            N: tl.constexpr, N_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # dy = sum_j post_j g_j; dx_i = sum_j comb[i, j] g_j; dpost_j = y . g_j; dcomb[i, j] = x_i . g_j (per token)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_i, offs_d = tl.arange(0, N_P), tl.arange(0, BLOCK_D)
    in_t, in_i = offs_t < T, offs_i < N
    m2 = in_t[:, None] & in_i[None, :]
    post = tl.load(post_ptr + offs_t[:, None] * N + offs_i[None, :], mask=m2, other=0.0)  # [BLOCK_T, N_P]
    dpost = tl.zeros((BLOCK_T, N_P), dtype=tl.float32)
    dcomb = tl.zeros((BLOCK_T, N_P, N_P), dtype=tl.float32)  # [t, i, j]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        in_d = d < D
        m3, md = m2[:, :, None] & in_d[None, None, :], in_t[:, None] & in_d[None, :]
        x = tl.load(x_ptr + offs_t[:, None, None] * sx_t + offs_i[None, :, None] * sx_i + d[None, None, :], mask=m3,
                    other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs_t[:, None] * D + d[None, :], mask=md, other=0.0).to(tl.float32)
        dy = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dx = tl.zeros((BLOCK_T, N_P, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(N):
            g = tl.load(g_ptr + offs_t[:, None] * (N * D) + j * D + d[None, :], mask=md, other=0.0).to(tl.float32)
            p = tl.sum(tl.where(offs_i[None, :] == j, post, 0.0), axis=1)  # post[:, j]
            c = tl.load(comb_ptr + offs_t[:, None] * (N * N) + offs_i[None, :] * N + j, mask=m2, other=0.0)
            dy += p[:, None] * g
            dx += c[:, :, None] * g[:, None, :]
            dpost += tl.where(offs_i[None, :] == j, tl.sum(y * g, axis=1)[:, None], 0.0)
            dcomb += tl.where(offs_i[None, None, :] == j, tl.sum(x * g[:, None, :], axis=2)[:, :, None], 0.0)
        tl.store(dy_ptr + offs_t[:, None] * D + d[None, :], dy.to(dy_ptr.dtype.element_ty), mask=md)
        tl.store(dx_ptr + offs_t[:, None, None] * (N * D) + offs_i[None, :, None] * D + d[None, None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=m3)
    tl.store(dpost_ptr + offs_t[:, None] * N + offs_i[None, :], dpost, mask=m2)
    mc = m2[:, :, None] & in_i[None, None, :]
    tl.store(dcomb_ptr + offs_t[:, None, None] * (N * N) + offs_i[None, :, None] * N + offs_i[None, None, :], dcomb,
             mask=mc)


def check_device(x: torch.Tensor) -> None:
    """The kernels take CUDA tensors, and CPU ones only in Triton's interpreter."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.attention.backend='triton' runs CUDA tensors (CPU ones only under TRITON_INTERPRET=1)")


def _streams(x: torch.Tensor) -> torch.Tensor:
    """x [..., n, D] as [T, n, D] with unit stride along D (a view where possible: the first layer's streams are the
    embedding expanded n times, stride 0 along n)."""
    x3 = x.reshape(-1, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def _block_d(D: int) -> int:
    return min(32, max(16, triton.next_power_of_2(D)))


def mix_collapse(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., n, D] (any float dtype), fn [OUT, n*D], base [>= n], scale [>= 1] fp32 -> (sum_i pre_i X_i [..., D] in
    x's dtype, x~ fn^T [..., OUT], r = rms(x~)^-1 [..., 1], pre [..., n]), all but the first fp32."""
    check_device(x)
    x3 = _streams(x)
    T, n, D = x3.shape
    fn = fn.contiguous()
    out = fn.shape[0]
    y = x.new_empty(T, D)
    lin = torch.empty(T, out, device=x.device, dtype=torch.float32)
    r, pre = lin.new_empty(T), lin.new_empty(T, n)
    _mix_collapse_kernel[(triton.cdiv(T, _BLOCK_T),)](
        x3, fn, base.contiguous(), scale.contiguous(), lin, r, pre, y, T, D, out, x3.stride(0), x3.stride(1),
        fn.stride(0), norm_eps, eps, N=n, N_P=triton.next_power_of_2(n),
        OUT_P=max(16, triton.next_power_of_2(out)), BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(D), num_warps=_NUM_WARPS)
    lead = x.shape[:-2]
    return y.view(*lead, D), lin.view(*lead, out), r.view(*lead, 1), pre.view(*lead, n)


def collapse_backward(x: torch.Tensor, pre: torch.Tensor, g: torch.Tensor,
                      write_dx: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The collapse's gradients for g [..., D]: dX [..., n, D] in x's dtype (None unless ``write_dx``), dpre
    [..., n] fp32."""
    x3 = _streams(x)
    T, n, D = x3.shape
    g2, pre2 = g.reshape(T, D).contiguous(), pre.reshape(T, n).float().contiguous()
    dx = torch.empty(T, n, D, device=x3.device, dtype=x3.dtype) if write_dx else None
    dpre = torch.empty_like(pre2)
    _collapse_backward_kernel[(triton.cdiv(T, _BLOCK_T),)](
        x3, pre2, g2, dx if write_dx else dpre, dpre, T, D, x3.stride(0), x3.stride(1),
        N=n, N_P=triton.next_power_of_2(n), BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(D), WRITE_DX=write_dx,
        num_warps=_NUM_WARPS)
    return (dx.view(x.shape) if write_dx else None), dpre.view(pre.shape)


def mix_collapse_backward(x: torch.Tensor, pre: torch.Tensor, g: torch.Tensor, d_lin: torch.Tensor,
                          coef: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix_collapse``'s stream and projection gradients from the collapse's output gradient g [..., D] and the
    projection's terms (``mhc._mix_terms``: d_lin [..., OUT], coef [..., 1]): (pre_i g + d_lin fn + coef x~
    [..., n, D] in x's dtype, d_lin^T x~ [OUT, n*D] fp32), each in one read of the streams."""
    x3 = _streams(x)
    T, n, D = x3.shape
    out = fn.shape[0]
    g2, pre2 = g.reshape(T, D).contiguous(), pre.reshape(T, n).contiguous()
    d_lin2, coef1, fn = d_lin.reshape(T, out).contiguous(), coef.reshape(T).contiguous(), fn.contiguous()
    dx = torch.empty(T, n, D, device=x3.device, dtype=x3.dtype)
    d_fn = torch.empty(out, n * D, device=x3.device, dtype=torch.float32)
    bd, out_p = _block_d(D), max(16, triton.next_power_of_2(out))
    _mix_collapse_dx_kernel[(triton.cdiv(T, _BLOCK_T), triton.cdiv(D, bd))](
        x3, pre2, g2, d_lin2, coef1, fn, dx, T, D, out, x3.stride(0), x3.stride(1), fn.stride(0),
        N=n, OUT_P=out_p, BLOCK_T=_BLOCK_T, BLOCK_D=bd, num_warps=_NUM_WARPS)
    _fn_grad_kernel[(n, triton.cdiv(D, bd))](
        x3, d_lin2, d_fn, T, D, out, x3.stride(0), x3.stride(1), OUT_P=out_p, BLOCK_T=2 * _BLOCK_T, BLOCK_D=bd,
        num_warps=_NUM_WARPS)
    return dx.view(x.shape), d_fn


class Collapse(torch.autograd.Function):
    """sum_i pre_i X_i: x [..., n, D], pre [..., n] fp32 -> [..., D] in x's dtype (backward recomputes nothing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        check_device(x)
        x3, pre2 = _streams(x), pre.reshape(-1, pre.shape[-1]).contiguous()  # [T, n, D], [T, n]
        T, n, D = x3.shape
        y = x.new_empty(T, D)
        bd = _block_d(D)
        _collapse_kernel[(triton.cdiv(T, _BLOCK_T), triton.cdiv(D, bd))](
            x3, pre2, y, T, D, x3.stride(0), x3.stride(1),
            N=n, N_P=triton.next_power_of_2(n), BLOCK_T=_BLOCK_T, BLOCK_D=bd, num_warps=_NUM_WARPS)
        ctx.save_for_backward(x, pre)
        return y.view(*x.shape[:-2], D)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return collapse_backward(*ctx.saved_tensors, g)


class Expand(torch.autograd.Function):
    """post_j y + sum_i comb[i, j] X_i: y [..., D], x [..., n, D], post [..., n], comb [..., n, n] (fp32)
    -> [..., n, D] in x's dtype."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        check_device(x)
        x3 = _streams(x)
        T, n, D = x3.shape
        y2 = y.reshape(T, D).contiguous()
        post2, comb3 = post.reshape(T, n).contiguous(), comb.reshape(T, n, n).contiguous()
        out = torch.empty(T, n, D, device=x.device, dtype=x.dtype)
        bd = _block_d(D)
        _expand_kernel[(triton.cdiv(T, _BLOCK_T), triton.cdiv(D, bd))](
            y2, x3, post2, comb3, out, T, D, x3.stride(0), x3.stride(1),
            N=n, N_P=triton.next_power_of_2(n), BLOCK_T=_BLOCK_T, BLOCK_D=bd, num_warps=_NUM_WARPS)
        ctx.save_for_backward(y2, x3, post2, comb3)
        ctx.shapes = y.shape, x.shape, post.shape, comb.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y2, x3, post2, comb3 = ctx.saved_tensors
        T, n, D = x3.shape
        g3 = g.reshape(T, n, D).contiguous()
        dy, dx = torch.empty_like(y2), torch.empty(T, n, D, device=x3.device, dtype=x3.dtype)
        dpost, dcomb = torch.empty_like(post2), torch.empty_like(comb3)
        _expand_backward_kernel[(triton.cdiv(T, _BLOCK_T),)](
            y2, x3, post2, comb3, g3, dy, dx, dpost, dcomb, T, D, x3.stride(0), x3.stride(1),
            N=n, N_P=triton.next_power_of_2(n), BLOCK_T=_BLOCK_T, BLOCK_D=_block_d(D), num_warps=_NUM_WARPS)
        return tuple(t.view(s) for t, s in zip((dy, dx, dpost, dcomb), ctx.shapes))
