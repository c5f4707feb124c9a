"""The masked (HCA) compressed entries of ``window_attention`` as GEMMs over blocks of queries, merged with
a window-only softmax by log-sum-exp; the compiled CPU path runs the window as per-query loops
(``_window_cpu``) and the entries here.

HCA's entries are dense: every query of a 128-token span sees the same prefix of entries, so its
scores are a GEMM [queries x heads, c] x [c, entries] that BLAS runs several times faster than the
per-query loops, and their share of the work grows with S (S/128 entries per query against a fixed
window). Splitting one softmax into two parts is exact: with lse_w the window part's log-sum-exp
(sink included) and lse = logaddexp(lse_w, lse_e) the joint one, out = out_w exp(lse_w - lse) +
sum_n exp(s_n - lse) v_n. The backward needs no merge: each part's gradient uses the joint lse and
delta = d_out . out, so the loops' backward runs on the window alone and this module adds the entries'.
"""

from __future__ import annotations

from typing import Optional

import torch

from .entries import per_block

_BLOCK = 512  # queries per block: [512 x H, c] GEMM operands, and a staircase mask wastes < 4 entries a query


def _spans(mask: torch.Tensor, S: int) -> list[tuple[int, int, int]]:
    """(first query, end query, entries any of them sees: a prefix length n) per block, in one host sync."""
    N = mask.shape[-1]
    if N == 0:  # no entry closed yet
        return []
    entry = torch.arange(1, N + 1, device=mask.device)  # [N]
    last = (mask.any(dim=0) * entry).amax(dim=-1)  # [S]: 1 + each query's last visible entry
    counts = per_block(last, _BLOCK).amax(dim=1).tolist()
    return [(s, min(s + _BLOCK, S), n) for s, n in zip(range(0, S, _BLOCK), counts) if n > 0]


def forward(q: torch.Tensor, entries: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, scale: float,
            out: torch.Tensor, lse: torch.Tensor, totals: Optional[torch.Tensor]) -> None:
    """Adds the entries to the window-only out [B,S,H,c] and lse [B,S,H] in place (q [B,S,H,c], entries
    [B,N,c], mask [B|1,S,N]). totals, the loops' [window, compressed, sink, max logit] sums, are moved
    to the joint softmax."""
    B, S, H, c = q.shape
    for s, e, n in _spans(mask, S):
        values = entries[:, :n]  # [B,n,c]
        logits = torch.matmul((q[:, s:e] * scale).reshape(B, -1, c), values.transpose(1, 2))  # [B, C*H, n]
        logits = logits.view(B, e - s, H, n).masked_fill_(~mask[:, s:e, None, :n], float("-inf"))
        lse_w = lse[:, s:e]  # [B,C,H]
        joint = torch.logaddexp(lse_w, logits.logsumexp(dim=-1))  # [B,C,H]
        probs = (logits - joint[..., None]).exp_()  # [B,C,H,n]; 0 where hidden
        merged = torch.matmul(probs.view(B, -1, n), values).view(B, e - s, H, c)
        out[:, s:e] = out[:, s:e] * (lse_w - joint).exp_()[..., None] + merged
        if totals is not None:  # the loops' sums were normalised without the entries: move this block's over
            _renormalise(totals, sink.float(), lse_w, joint, logits)
        lse[:, s:e] = joint


def _renormalise(totals: torch.Tensor, sink: torch.Tensor, lse_w: torch.Tensor, joint: torch.Tensor,
                 logits: torch.Tensor) -> None:
    """totals [window, compressed, sink, max logit] (float64) of a block of rows from the window-only softmax
    (lse_w [B,C,H]) to the joint one (joint [B,C,H]), with the entries' logits [B,C,H,n]."""
    kept = (lse_w - joint).exp()  # [B,C,H]: the window part's share of the joint softmax
    sink_w, sink_joint = (sink - lse_w).exp(), (sink - joint).exp()  # [B,C,H]
    window_w = (1.0 - sink_w).sum()
    totals[0] += ((kept - sink_joint).sum() - window_w).double()
    totals[1] += (1.0 - kept).sum().double()
    totals[2] += (sink_joint.sum() - sink_w.sum()).double()
    totals[3] = torch.maximum(totals[3], logits.amax().double())


def backward(q: torch.Tensor, entries: torch.Tensor, mask: torch.Tensor, scale: float, lse: torch.Tensor,
             delta: torch.Tensor, d_out: torch.Tensor, d_q: torch.Tensor, d_entries: torch.Tensor) -> None:
    """Adds the entries' share to d_q [B,S,H,c] and d_entries [B,N,c]: dS = P (dP - delta) against the
    joint lse and delta = d_out . out [B,S,H] (the loops' backward computes it), with P and dP from one
    GEMM of the rows [q scale ; d_out] (K = V, as in the kernel)."""
    B, S, H, c = q.shape
    for s, e, n in _spans(mask, S):
        values = entries[:, :n]  # [B,n,c]
        rows = torch.cat([q[:, s:e] * scale, d_out[:, s:e]], dim=2)  # [B,C,2H,c]
        both = torch.matmul(rows.view(B, -1, c), values.transpose(1, 2)).view(B, e - s, 2 * H, n)  # logits ; dP
        probs = (both[:, :, :H] - lse[:, s:e, :, None]).masked_fill_(~mask[:, s:e, None, :n], float("-inf")).exp_()
        ds_p = torch.cat([probs * (both[:, :, H:] - delta[:, s:e, :, None]), probs], dim=2)  # [B,C,2H,n]: dS ; P
        d_q[:, s:e] += torch.matmul(ds_p[:, :, :H].reshape(B, -1, n), values).view(B, e - s, H, c) * scale
        d_entries[:, :n] += torch.matmul(ds_p.view(B, -1, n).transpose(1, 2), rows.view(B, -1, c))
