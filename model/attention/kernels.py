"""The core attention of every DeepSeek-V4 layer: one softmax over window keys, compressed entries and a sink.

``window_attention(q, kv, sink, window, scale, query_chunk, extra=None) -> (out, mass)`` is the only kernel the
attention layers call (MODEL_SPEC §2.4, §2.7, §3.3). Keys and values are the same single shared
head (MQA, K = V), so queries of all heads read the same ``kv`` rows.

* Window keys: ``kv`` [B, T, c] holds consecutive positions whose last S rows are the queries'
  own positions (the first T - S rows are past keys, e.g. from a decode cache). Query i sits at
  row T - S + i and sees rows T - S + i - window + 1 .. T - S + i (``window`` keys, itself included).
* Extra compressed entries (CSA/HCA): ``extra = CompressedKV(kv=[B, N, c], idx=..., mask=...)``
  with exactly one of

  - ``idx`` [B, S, k] long: per query, the entry rows it attends to; -1 marks an unused slot.
    Valid entries of one row should be distinct (a repeated entry is counted twice, as in the
    official ``sparse_attn``). Use it for top-k selected entries (CSA).
  - ``mask`` [B or 1, S, N] bool: per query, which of all N entries are visible. Use it for dense
    causal visibility (HCA: entry w visible to query t iff w < (t + 1) // ratio).

  The entries must already be normalised and rotated at their own positions, like ``kv``.
* Sink: ``sink`` [H] fp32 is one logit per head that enters the softmax denominator only.

The softmax runs in fp32 over [window keys ; extra entries ; sink] and the output is
sum(p_j * v_j) over window keys and extra entries (the sink has no value).

Memory is linear in S: queries are processed in blocks of C queries; a block scores only its
C + window - 1 candidate keys and its own extra entries, never S x S. On CPU C = min(query_chunk,
max(32, window/2)): a block forms (C + window - 1) / window times the window logits it needs, and
that elementwise softmax work, not the GEMMs, dominates there (at window 128, blocks of 64 queries
ran ~1.4x faster than blocks of 256). On GPU C = query_chunk: there kernel launches per block dominate.
On CPU in fp32 (backend "auto" or "cpu") the same function runs as compiled per-query loops instead
(``_window_cpu``): each query scores only its own window keys and selected entries, read in place,
and its backward adds straight into their gradients; masked (HCA) entries, a dense prefix shared by a
span of queries, are added by GEMMs and a log-sum-exp merge (``_dense_entries``). The 8k-token model
step of ``benchmarks/vs_hf_reference.py`` spent 2.8 s in the torch path's blocks and 0.8 s in the
compiled one (one thread). With backend "triton" it runs as Triton kernels instead (``_window_triton``, CUDA):
one program per query and head group, all of a pass in one launch.

Like flash attention, the forward keeps only each row's log-sum-exp and the backward rebuilds a
chunk's probabilities from it, so neither the probabilities nor the gathered [S, k, c] entries are
stored for backward (the backward forms the logits again, together with dP in the same GEMMs). The
kernel also returns each selected entry's head-summed probability, the CSA indexer's training
target, which it has at no extra cost.

Statistics (opt-in, for the trainer's log steps): given ``stats``, an ``AttentionStats``, the kernel
adds the mean softmax mass on the window keys, the compressed entries and the sink, and the max
logit, from the probabilities it computes anyway; without it the kernel does no extra work.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .._cpu_compiled import use_compiled
from ..checkpointing import products_not_kept
from .entries import CompressedKV, add_gathered_grad, gather_entries
from .stats import AttentionStats


_MIN_BLOCK = 32  # fewer queries per block and the per-block overhead dominates


def _record(stats: AttentionStats, parts: list[torch.Tensor], probs: torch.Tensor, n_win: int) -> None:
    """Masses and max logit of one chunk: parts are the masked logits [window keys, (extra,) sink],
    probs [B,C,H,window keys + extra + sink] their joint softmax."""
    totals = torch.stack([probs[..., :n_win].sum(), probs[..., n_win:-1].sum(), probs[..., -1].sum(),
                          torch.stack([p.amax() for p in parts[:-1]]).amax()])
    stats.add_masses(totals, probs[..., 0].numel(), len(parts) == 3)


class _Chunk:
    """One query chunk's logits, rebuilt identically by the forward and the backward pass.

    ``rows`` [B,C,R,c] are dotted with the chunk's keys and entries; the first ``masked`` rows are the
    scaled queries, whose logits get -inf where a key is not visible (the backward appends d_out as
    rows H.., so the logits and dP come from one GEMM each). ``window`` [B,C,R,K] and ``extra``
    [B,C,R,k|N] are fp32; ``keys`` [B,K,c] are the chunk's window rows of kv (starting at row ``lo``),
    ``values`` the extra entries' rows ([B,C,k,c] gathered, or all [B,N,c] for a mask).
    """

    def __init__(self, rows: torch.Tensor, kv: torch.Tensor, extra: Optional[CompressedKV], s: int, e: int,
                 past: int, window: int, masked: int) -> None:
        self.lo = max(0, past + s - window + 1)  # first key row any query of the chunk can see
        self.keys = kv[:, self.lo:past + e]  # [B,K,c]
        q_row = torch.arange(past + s, past + e, device=kv.device).unsqueeze(1)
        k_row = torch.arange(self.lo, past + e, device=kv.device).unsqueeze(0)
        visible = (k_row <= q_row) & (k_row > q_row - window)  # [C,K]
        self.window = torch.einsum("bqhc,bkc->bqhk", rows, self.keys).float()
        self.window[:, :, :masked].masked_fill_(~visible[:, None], float("-inf"))
        self.extra: Optional[torch.Tensor] = None
        if extra is None:
            return
        if extra.idx is not None:
            idx = extra.idx[:, s:e]  # [B,C,k]
            self.values = gather_entries(extra.kv, idx)  # [B,C,k,c]
            hidden = (idx < 0).unsqueeze(2)  # [B,C,1,k]
        else:
            self.values = extra.kv  # [B,N,c]
            hidden = ~extra.mask[:, s:e].unsqueeze(2)  # [B|1,C,1,N]
        self.extra = self.values_logits(rows).float()
        self.extra[:, :, :masked].masked_fill_(hidden, float("-inf"))

    def values_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B,C,R,c] dotted with each query's extra entries -> [B,C,R,k|N]."""
        if self.values.dim() == 4:
            return torch.einsum("bqhc,bqkc->bqhk", rows, self.values)
        return torch.einsum("bqhc,bnc->bqhn", rows, self.values)

    def values_times(self, probs: torch.Tensor) -> torch.Tensor:
        """sum_j probs_j v_j for probs [B,C,H,k|N] over the extra entries -> [B,C,H,c]."""
        if self.values.dim() == 4:
            return torch.einsum("bqhk,bqkc->bqhc", probs, self.values)
        return torch.einsum("bqhn,bnc->bqhc", probs, self.values)


class _WindowAttention(torch.autograd.Function):
    """Flash-style: forward keeps each row's log-sum-exp, backward rebuilds the probabilities.

    Nothing of size [S, keys] or the gathered [S, k, c] entries is kept for backward: only the
    inputs, the output and lse [B,S,H] fp32. ``impl`` picks the implementation (``_ops``): ``_window_cpu``'s
    per-query loops ("cpu": CPU, fp32), ``_window_triton``'s kernels ("triton") or blocks of queries as torch
    ops ("torch": ``_blocked_forward``/``_backward``).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
                idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], window: int, scale: float,
                query_chunk: int, stats: Optional[AttentionStats],
                impl: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, S, H, _ = q.shape
        out = q.new_empty(q.shape)
        lse = q.new_empty(B, S, H, dtype=torch.float32)
        mass = q.new_empty(B, S, idx.shape[-1], dtype=torch.float32) if idx is not None else None
        run = _ops(impl)[0]
        with products_not_kept():  # per-block scores the backward recomputes from lse: not for selective to keep
            run(q, kv, sink, entries, idx, mask, window, scale, query_chunk, stats, out, lse, mass)
        ctx.save_for_backward(q, kv, sink, entries, idx, mask, out, lse)
        ctx.window, ctx.scale, ctx.query_chunk, ctx.impl = window, scale, query_chunk, impl
        if mass is not None:
            ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor, _d_mass: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        run = _ops(ctx.impl)[1]
        grads = run(*ctx.saved_tensors, d_out, ctx.window, ctx.scale, ctx.query_chunk)  # d_q, d_kv, d_sink, d_entries
        return (*grads, None, None, None, None, None, None, None)


def _ops(impl: str) -> tuple:
    """(forward_op, backward_op) of an implementation; "cpu" and "triton" import numba/triton only when chosen."""
    if impl == "cpu":
        from ._window_cpu import backward_op, forward_op  # numba compiles on first use
        return forward_op, backward_op
    if impl == "triton":
        from ._window_triton import backward_op, forward_op
        return forward_op, backward_op
    return _blocked_forward, _blocked_backward


def _blocked_forward(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
                     idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], window: int, scale: float,
                     query_chunk: int, stats: Optional[AttentionStats], out: torch.Tensor, lse: torch.Tensor,
                     mass: Optional[torch.Tensor]) -> None:
    """Fills out, lse (and mass) one block of ``query_chunk`` queries at a time."""
    B, S, H, _ = q.shape
    past = kv.shape[1] - S
    extra = None if entries is None else CompressedKV(entries, idx=idx, mask=mask)
    sinks = sink.float().view(1, 1, H, 1)
    for s in range(0, S, query_chunk):
        e = min(s + query_chunk, S)
        chunk = _Chunk(q[:, s:e] * scale, kv, extra, s, e, past, window, H)  # scaling q leaves the sink as is
        parts = [chunk.window] + ([chunk.extra] if extra is not None else [])
        parts.append(sinks.expand(B, e - s, H, 1))
        logits = torch.cat(parts, dim=-1)  # [B,C,H,K (+k|N) + 1]
        lse[:, s:e] = logits.logsumexp(dim=-1)
        probs = (logits - lse[:, s:e, :, None]).exp()
        n_win = chunk.keys.shape[1]
        if stats is not None:
            _record(stats, parts, probs, n_win)
        o = torch.einsum("bqhk,bkc->bqhc", probs[..., :n_win].to(kv.dtype), chunk.keys)
        if extra is not None:
            ex_probs = probs[..., n_win:-1]
            o = o + chunk.values_times(ex_probs.to(kv.dtype))
            if mass is not None:
                mass[:, s:e] = ex_probs.sum(dim=2)
        out[:, s:e] = o


def _blocked_backward(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
                      idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], out: torch.Tensor,
                      lse: torch.Tensor, d_out: torch.Tensor, window: int, scale: float,
                      query_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(d_q, d_kv, d_sink, d_entries) one block of queries at a time."""
    B, S, H, _ = q.shape
    past = kv.shape[1] - S
    extra = None if entries is None else CompressedKV(entries, idx=idx, mask=mask)
    d_q = torch.empty_like(q)
    d_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    d_entries = None if entries is None else torch.zeros(entries.shape, dtype=torch.float32, device=kv.device)
    d_sink = torch.zeros(H, dtype=torch.float32, device=kv.device)
    sinks = sink.float().view(1, 1, H, 1)
    # delta = sum_j p_j dP_j = d_out . out per row: the softmax backward without the probabilities.
    delta = (d_out.float() * out.float()).sum(dim=-1)  # [B,S,H]
    for s in range(0, S, query_chunk):
        e = min(s + query_chunk, S)
        # Rows [q*scale ; d_out] against the same keys/values: the logits (rebuilt) and dP in one GEMM
        # each, and [dS ; P] against them for the key/value gradients (K = V).
        q_do = torch.cat([q[:, s:e] * scale, d_out[:, s:e]], dim=2)  # [B,C,2H,c]
        chunk = _Chunk(q_do, kv, extra, s, e, past, window, H)
        row_lse, row_delta = lse[:, s:e, :, None], delta[:, s:e, :, None]  # [B,C,H,1]
        d_sink -= ((sinks - row_lse).exp() * row_delta).sum(dim=(0, 1, 3))
        p_win = (chunk.window[:, :, :H] - row_lse).exp()  # [B,C,H,K]
        dp_win = chunk.window[:, :, H:]
        ds_p = torch.cat([p_win * (dp_win - row_delta), p_win], dim=2).to(kv.dtype)  # [B,C,2H,K]: dS ; P
        d_qc = torch.einsum("bqhk,bkc->bqhc", ds_p[:, :, :H], chunk.keys).float()
        d_kv[:, chunk.lo:past + e] += torch.einsum("bqhk,bqhc->bkc", ds_p, q_do)
        if extra is not None:
            p_ex = (chunk.extra[:, :, :H] - row_lse).exp()  # [B,C,H,k|N]
            dp_ex = chunk.extra[:, :, H:]
            ds_p = torch.cat([p_ex * (dp_ex - row_delta), p_ex], dim=2).to(kv.dtype)  # [B,C,2H,k|N]
            d_qc += chunk.values_times(ds_p[:, :, :H]).float()
            if idx is not None:
                grads = torch.einsum("bqhk,bqhc->bqkc", ds_p, q_do)  # [B,C,k,c]; 0 at -1 picks
                add_gathered_grad(d_entries, idx[:, s:e], grads)
            else:
                d_entries += torch.einsum("bqhn,bqhc->bnc", ds_p, q_do).float()
        d_q[:, s:e] = (d_qc * scale).to(q.dtype)
    d_entries = None if d_entries is None else d_entries.to(entries.dtype)
    return d_q, d_kv.to(kv.dtype), d_sink.to(sink.dtype), d_entries


def window_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, window: int, scale: float,
                     query_chunk: int, extra: Optional[CompressedKV] = None,
                     stats: Optional[AttentionStats] = None,
                     backend: str = "auto") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sliding-window MQA with an attention sink and optional compressed entries.

    q [B,S,H,c] -> (out [B,S,H,c], mass): ``mass`` [B,S,k] fp32, for selected entries (``extra.idx``)
    only, is each pick's softmax probability summed over heads (0 at -1 picks; no gradient), the
    CSA indexer's training target; None otherwise. ``backend`` (``model.attention.backend``): "auto" runs
    the compiled CPU loops on fp32 CPU tensors and torch ops elsewhere, "torch" always the torch ops,
    "cpu" always the compiled loops, "triton" the Triton kernels (``_window_triton``; CUDA tensors).
    """
    S, T = q.shape[1], kv.shape[1]
    if T < S:
        raise ValueError(f"kv has {T} rows but there are {S} queries; kv must end at the queries' positions")
    entries, idx, mask = (None, None, None) if extra is None else (extra.kv, extra.idx, extra.mask)
    if backend == "triton":
        impl = "triton"
    else:
        impl = "cpu" if use_compiled(backend, q, kv, sink, *(() if entries is None else (entries,))) else "torch"
    block = query_chunk if q.is_cuda else min(query_chunk, max(_MIN_BLOCK, window // 2))  # module docstring
    return _WindowAttention.apply(q, kv, sink, entries, idx, mask, window, scale, block, stats, impl)
