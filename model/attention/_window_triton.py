"""``window_attention`` as Triton kernels (``model.attention.backend="triton"``; ``kernels.py`` imports this
module when chosen and calls ``forward_op``/``backward_op``, the same seam as ``_window_cpu``).

The torch path (``kernels._blocked_forward``) runs a dozen torch ops per block of queries, so on a GPU
it is bound by kernel launches. Here one program takes one query and a group of its heads as the rows
of every tile: K = V is a single shared head (MQA), so each key, selected entry or masked entry is
loaded once for all heads of the group and scored by one ``tl.dot`` [heads, c] x [c, tile]. The
forward is flash attention's online softmax over the query's window keys, then its extra entries
(``idx``: gathered rows of ``entries``; ``mask``: the visible ones of all N), then the sink in the
denominator only; it keeps each row's log-sum-exp, and for ``idx`` a second pass over the picks turns
their logits into the head-summed probabilities ``mass`` (the final lse is needed first). The
backward rebuilds the probabilities from lse (delta = d_out . out, from torch), writes d_q and adds
each key's and entry's gradient (K = V: dS scaled q plus P d_out) with ``tl.atomic_add`` into fp32
buffers: d_kv and d_entries are NOT bitwise deterministic across runs (the order of the adds of
different queries varies); d_q, out and lse are, and mass too while one program holds all heads (up to
8192 / c of them; beyond, head groups add theirs atomically). d_sink is summed by torch from lse and delta.

fp32 inputs multiply in full fp32 (``input_precision="ieee"``, no TF32), so results match the torch
path up to summation order; fp16/bf16 use the tensor cores with fp32 accumulation, probabilities
rounded to the input dtype before they multiply values, as the torch path does. Triton's dots need the
head dim c a power of 2 >= 16 (``configs.validate`` checks it). Runs on CUDA tensors, and on CPU ones
under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .stats import AttentionStats

_NO_EXTRA, _IDX, _MASK = 0, 1, 2  # the EXTRA constexpr: which compressed entries a call has


@triton.jit
def _dot(a, b, FULL_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; full fp32 products for fp32 inputs."""
    if FULL_FP32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _logits(qv, keys, visible, scale, FULL_FP32: tl.constexpr):
    """Scaled logits [BLOCK_H, tile] of the query rows against a tile of keys [tile, C]; -inf where hidden."""
    return tl.where(visible[None, :], _dot(qv, tl.trans(keys), FULL_FP32) * scale, float("-inf"))


@triton.jit
def _online(qv, keys, visible, m_i, l_this, l_other, acc, scale, FULL_FP32: tl.constexpr):
    """One tile of the online softmax: (new running max, this part's and the other part's rescaled sums,
    rescaled output accumulator). The window and the extra entries keep separate sums for the statistics."""
    logits = _logits(qv, keys, visible, scale, FULL_FP32)
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: exp(-inf) = 0
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(logits - m_safe[:, None])
    acc = acc * alpha[:, None] + _dot(p.to(keys.dtype), keys, FULL_FP32)
    return m_new, l_this * alpha + tl.sum(p, 1), l_other * alpha, acc


@triton.jit
def _query(q_ptr, sq_b, sq_s, sq_h, H, BLOCK_H: tl.constexpr, C: tl.constexpr):
    """This program's query s of batch b (int64: B*S*H*c may pass 2^31), its heads and its rows [BLOCK_H, C]."""
    s, b = tl.program_id(0).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, C)
    in_h = offs_h < H
    qv = tl.load(q_ptr + b * sq_b + s * sq_s + offs_h[:, None] * sq_h + offs_c[None, :], mask=in_h[:, None],
                 other=0.0)
    return s, b, offs_h, offs_c, in_h, qv


@triton.jit
def _window_tile(kv_ptr, base, n0, row, skv_t, offs_c, BLOCK_N: tl.constexpr):
    """Window keys n0.. of the query at ``row`` (base: its batch's kv): (rows, visible, keys [BLOCK_N, C])."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    visible = offs_n <= row
    keys = tl.load(kv_ptr + base + offs_n[:, None] * skv_t + offs_c[None, :], mask=visible[:, None], other=0.0)
    return offs_n, visible, keys


@triton.jit
def _pick_tile(idx_ptr, idx_base, j0, K, BLOCK_K: tl.constexpr):
    """Picks j0.. of the query (idx_base: its idx row): (slots, entry rows, visible)."""
    offs_j = j0 + tl.arange(0, BLOCK_K)
    picks = tl.load(idx_ptr + idx_base + offs_j, mask=offs_j < K, other=-1)
    return offs_j, picks, picks >= 0


@triton.jit
def _mask_tile(msk_ptr, msk_base, n0, N, BLOCK_N: tl.constexpr):
    """Entries n0.. and which of them the query sees (msk_base: its mask row): (rows, visible)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return offs_n, tl.load(msk_ptr + msk_base + offs_n, mask=offs_n < N, other=0) != 0


@triton.jit
def _any(visible):
    """Whether a tile holds an entry the query sees: the others (padding picks, HCA entries past the causal
    edge) cost their index or mask row only, no entry loads or products."""
    return tl.max(visible.to(tl.int32), 0) > 0


@triton.jit
def _entries(ent_ptr, ent_base, rows, visible, se_n, offs_c):
    """The visible ones of entry ``rows`` [tile, C] (0 elsewhere)."""
    return tl.load(ent_ptr + ent_base + rows[:, None] * se_n + offs_c[None, :], mask=visible[:, None], other=0.0)


@triton.jit
def _forward_kernel(q_ptr, kv_ptr, sink_ptr, ent_ptr, idx_ptr, msk_ptr, out_ptr, lse_ptr, mass_ptr, stat_ptr,
                    S, T, H, N, K, window, scale,
                    sq_b, sq_s, sq_h, skv_b, skv_t, se_b, se_n, si_b, si_s, sm_b, sm_s, so_b, so_s, so_h,
                    C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EXTRA: tl.constexpr, STATS: tl.constexpr, FULL_FP32: tl.constexpr):
    s, b, offs_h, offs_c, in_h, qv = _query(q_ptr, sq_b, sq_s, sq_h, H, BLOCK_H, C)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_win = tl.zeros((BLOCK_H,), tl.float32)
    l_ext = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, C), tl.float32)
    row = T - S + tl.program_id(0)  # the query's own row of kv (int32: the loop bounds)
    for n0 in range(tl.maximum(row - window + 1, 0), row + 1, BLOCK_N):
        _, visible, keys = _window_tile(kv_ptr, b * skv_b, n0, row, skv_t, offs_c, BLOCK_N)
        m_i, l_win, l_ext, acc = _online(qv, keys, visible, m_i, l_win, l_ext, acc, scale, FULL_FP32)
    if EXTRA == 1:
        for j0 in range(0, K, BLOCK_K):
            _, picks, visible = _pick_tile(idx_ptr, b * si_b + s * si_s, j0, K, BLOCK_K)
            if _any(visible):
                keys = _entries(ent_ptr, b * se_b, picks, visible, se_n, offs_c)
                m_i, l_ext, l_win, acc = _online(qv, keys, visible, m_i, l_ext, l_win, acc, scale, FULL_FP32)
    if EXTRA == 2:
        for n0 in range(0, N, BLOCK_N):
            offs_n, visible = _mask_tile(msk_ptr, b * sm_b + s * sm_s, n0, N, BLOCK_N)
            if _any(visible):
                keys = _entries(ent_ptr, b * se_b, offs_n, visible, se_n, offs_c)
                m_i, l_ext, l_win, acc = _online(qv, keys, visible, m_i, l_ext, l_win, acc, scale, FULL_FP32)
    sink = tl.load(sink_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)
    m_f = tl.maximum(m_i, sink)  # m_i is finite: every query sees its own key
    z = (l_win + l_ext) * tl.exp(m_i - m_f) + tl.exp(sink - m_f)
    lse = m_f + tl.log(z)
    out = acc * (tl.exp(m_i - m_f) / z)[:, None]
    tl.store(out_ptr + b * so_b + s * so_s + offs_h[:, None] * so_h + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_h[:, None])
    row_hs = (b * S + s) * H + offs_h  # index into [B, S, H] fp32 buffers
    tl.store(lse_ptr + row_hs, lse, mask=in_h)
    if STATS:  # per row: window mass, compressed mass, max logit ([B, S, H, 3]); torch sums them
        tl.store(stat_ptr + row_hs * 3, l_win * tl.exp(m_i - lse), mask=in_h)
        tl.store(stat_ptr + row_hs * 3 + 1, l_ext * tl.exp(m_i - lse), mask=in_h)
        tl.store(stat_ptr + row_hs * 3 + 2, m_i, mask=in_h)
    if EXTRA == 1:  # mass: each pick's probability summed over heads, now that lse is known
        for j0 in range(0, K, BLOCK_K):
            offs_j, picks, visible = _pick_tile(idx_ptr, b * si_b + s * si_s, j0, K, BLOCK_K)
            if _any(visible):  # the mass of padding picks stays 0
                keys = _entries(ent_ptr, b * se_b, picks, visible, se_n, offs_c)
                p = tl.exp(_logits(qv, keys, visible, scale, FULL_FP32) - lse[:, None])
                p = tl.where(in_h[:, None], p, 0.0)
                tl.atomic_add(mass_ptr + (b * S + s) * K + offs_j, tl.sum(p, 0), mask=offs_j < K)  # head groups add


@triton.jit
def _grad_tile(qv, do, lse, delta, keys, visible, dq, scale, FULL_FP32: tl.constexpr):
    """One tile's backward: (dq + dS keys, the tile's key = value gradient [tile, C] fp32)."""
    p = tl.exp(_logits(qv, keys, visible, scale, FULL_FP32) - lse[:, None])  # 0 where hidden and on padding rows
    dp = _dot(do, tl.trans(keys), FULL_FP32)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(keys.dtype), keys, FULL_FP32)
    d_keys = _dot(tl.trans(ds * scale).to(keys.dtype), qv, FULL_FP32)
    d_keys += _dot(tl.trans(p).to(keys.dtype), do, FULL_FP32)
    return dq, d_keys


@triton.jit
def _backward_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, msk_ptr, do_ptr, lse_ptr, delta_ptr,
                     dq_ptr, dkv_ptr, dent_ptr,
                     S, T, H, N, K, window, scale,
                     sq_b, sq_s, sq_h, skv_b, skv_t, se_b, se_n, si_b, si_s, sm_b, sm_s, sd_b, sd_s, sd_h,
                     C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EXTRA: tl.constexpr, FULL_FP32: tl.constexpr):
    s, b, offs_h, offs_c, in_h, qv = _query(q_ptr, sq_b, sq_s, sq_h, H, BLOCK_H, C)
    do = tl.load(do_ptr + b * sd_b + s * sd_s + offs_h[:, None] * sd_h + offs_c[None, :], mask=in_h[:, None],
                 other=0.0).to(qv.dtype)
    row_hs = (b * S + s) * H + offs_h
    lse = tl.load(lse_ptr + row_hs, mask=in_h, other=float("inf"))  # padding rows: probabilities 0
    delta = tl.load(delta_ptr + row_hs, mask=in_h, other=0.0)
    dq = tl.zeros((BLOCK_H, C), tl.float32)
    row = T - S + tl.program_id(0)
    for n0 in range(tl.maximum(row - window + 1, 0), row + 1, BLOCK_N):
        offs_n, visible, keys = _window_tile(kv_ptr, b * skv_b, n0, row, skv_t, offs_c, BLOCK_N)
        dq, d_keys = _grad_tile(qv, do, lse, delta, keys, visible, dq, scale, FULL_FP32)
        tl.atomic_add(dkv_ptr + b * T * C + offs_n[:, None] * C + offs_c[None, :], d_keys, mask=visible[:, None])
    if EXTRA == 1:
        for j0 in range(0, K, BLOCK_K):
            _, picks, visible = _pick_tile(idx_ptr, b * si_b + s * si_s, j0, K, BLOCK_K)
            if _any(visible):
                keys = _entries(ent_ptr, b * se_b, picks, visible, se_n, offs_c)
                dq, d_keys = _grad_tile(qv, do, lse, delta, keys, visible, dq, scale, FULL_FP32)
                tl.atomic_add(dent_ptr + b * N * C + picks[:, None] * C + offs_c[None, :], d_keys,
                              mask=visible[:, None])
    if EXTRA == 2:
        for n0 in range(0, N, BLOCK_N):
            offs_n, visible = _mask_tile(msk_ptr, b * sm_b + s * sm_s, n0, N, BLOCK_N)
            if _any(visible):
                keys = _entries(ent_ptr, b * se_b, offs_n, visible, se_n, offs_c)
                dq, d_keys = _grad_tile(qv, do, lse, delta, keys, visible, dq, scale, FULL_FP32)
                tl.atomic_add(dent_ptr + b * N * C + offs_n[:, None] * C + offs_c[None, :], d_keys,
                              mask=visible[:, None])
    tl.store(dq_ptr + b * sq_b + s * sq_s + offs_h[:, None] * sq_h + offs_c[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=in_h[:, None])


def _blocks(q: torch.Tensor, window: int, tile: int) -> tuple[int, int, int]:
    """(heads per program, window/mask tile, pick tile): powers of 2 >= 16 (tl.dot's minimum); fewer heads and
    keys per program for wide heads, so the [heads, c] and [keys, c] tiles (``tile`` elements at most) stay in
    registers (the backward holds four such tiles, the forward two: it takes half the forward's ``tile``)."""
    H, c = q.shape[2:]
    block_h = min(max(16, triton.next_power_of_2(H)), max(16, tile // c))
    return block_h, min(max(16, tile // c), 64, max(16, triton.next_power_of_2(window))), 16


def _num_warps(c: int) -> int:
    """Warps per program: 8 for heads of 512 and wider (4 spilled registers at V4-Flash's 512 in the forward)."""
    return 8 if c >= 512 else 4


def _check(q: torch.Tensor) -> None:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("model.attention.backend='triton' runs CUDA tensors (CPU ones only under TRITON_INTERPRET=1)")
    c = q.shape[-1]
    if c < 16 or c & (c - 1):
        raise ValueError(f"the Triton window attention needs head_dim a power of 2 >= 16, not {c}")


def _extra_args(q: torch.Tensor, entries: Optional[torch.Tensor], idx: Optional[torch.Tensor],
                mask: Optional[torch.Tensor]) -> tuple:
    """(entries, idx, mask, N, K, EXTRA, strides...) as the kernels take them; a missing tensor is q (never read)."""
    N = 0 if entries is None else entries.shape[1]
    K = 0 if idx is None else idx.shape[2]
    kind = _NO_EXTRA if entries is None else (_IDX if idx is not None else _MASK)
    entries = q if entries is None else entries.contiguous()
    idx = q if idx is None else idx.contiguous()
    if mask is not None:
        mask = mask.contiguous().view(torch.uint8)  # [B|1, S, N]; a batch of 1 is broadcast by a 0 stride
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1))
    else:
        mask, mask_strides = q, (0, 0)
    strides = (entries.stride(0), entries.stride(1), idx.stride(0), idx.stride(1), *mask_strides)
    return entries, idx, mask, N, K, kind, strides


def forward_op(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
               idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], window: int, scale: float,
               _query_chunk: int, stats: Optional[AttentionStats], out: torch.Tensor, lse: torch.Tensor,
               mass: Optional[torch.Tensor]) -> None:
    """``kernels._blocked_forward`` by ``_forward_kernel``: fills out, lse (and mass) in place (all three are
    the contiguous buffers ``kernels`` allocates)."""
    _check(q)
    B, S, H, c = q.shape
    T = kv.shape[1]
    q, kv, sink = q.contiguous(), kv.contiguous(), sink.float().contiguous()
    ent, idx_, msk, N, K, kind, ex_strides = _extra_args(q, entries, idx, mask)
    row_stats = torch.empty(B, S, H, 3, device=q.device, dtype=torch.float32) if stats is not None else lse
    if mass is not None:
        mass.zero_()  # the kernel adds each head group's probabilities
    block_h, block_n, block_k = _blocks(q, window, 8192)
    grid = (S, triton.cdiv(H, block_h), B)
    mass_buf = lse if mass is None else mass  # lse: never written as mass without picks
    _forward_kernel[grid](q, kv, sink, ent, idx_, msk, out, lse, mass_buf, row_stats, S, T, H, N, K, window, scale,
                          q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), *ex_strides,
                          out.stride(0), out.stride(1), out.stride(2),
                          C=c, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_K=block_k, EXTRA=kind,
                          STATS=stats is not None, FULL_FP32=q.dtype == torch.float32, num_warps=_num_warps(c))
    if stats is not None:
        sums = row_stats[..., :2].sum(dim=(0, 1, 2), dtype=torch.float64)  # [window mass, compressed mass]
        sink_mass = (sink.view(1, 1, H) - lse).exp().sum(dtype=torch.float64)
        totals = torch.stack([sums[0], sums[1], sink_mass, row_stats[..., 2].amax().double()])
        stats.add_masses(totals, B * S * H, entries is not None)


def backward_op(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
                idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], out: torch.Tensor,
                lse: torch.Tensor, d_out: torch.Tensor, window: int, scale: float,
                _query_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``kernels._blocked_backward`` by ``_backward_kernel``: (d_q, d_kv, d_sink, d_entries)."""
    _check(q)
    B, S, H, c = q.shape
    T = kv.shape[1]
    q, kv, d_out, lse = q.contiguous(), kv.contiguous(), d_out.contiguous(), lse.contiguous()
    # delta = sum_j p_j dP_j = d_out . out per row: the softmax backward without the probabilities.
    delta = (d_out.float() * out.float()).sum(dim=-1).contiguous()  # [B,S,H]
    d_sink = -((sink.float().view(1, 1, H) - lse).exp() * delta).sum(dim=(0, 1))
    ent, idx_, msk, N, K, kind, ex_strides = _extra_args(q, entries, idx, mask)
    d_q = torch.empty_like(q)
    d_kv = torch.zeros(B, T, c, device=q.device, dtype=torch.float32)
    d_ent = torch.zeros(B, N, c, device=q.device, dtype=torch.float32) if entries is not None else d_kv
    block_h, block_n, block_k = _blocks(q, window, 4096)
    grid = (S, triton.cdiv(H, block_h), B)
    _backward_kernel[grid](q, kv, ent, idx_, msk, d_out, lse, delta, d_q, d_kv, d_ent, S, T, H, N, K, window, scale,
                           q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), *ex_strides,
                           d_out.stride(0), d_out.stride(1), d_out.stride(2),
                           C=c, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_K=block_k, EXTRA=kind,
                           FULL_FP32=q.dtype == torch.float32, num_warps=_num_warps(c))
    d_entries = None if entries is None else d_ent.to(entries.dtype)
    return d_q, d_kv.to(kv.dtype), d_sink.to(sink.dtype), d_entries
