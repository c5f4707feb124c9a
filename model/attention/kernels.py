"""The core attention of every DeepSeek-V4 layer: one softmax over window keys, compressed entries and a sink.

``window_attention(q, kv, sink, window, scale, query_chunk, extra=None)`` is the only kernel the
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

Memory is linear in S: queries are processed in chunks of ``query_chunk``; a chunk of C queries
scores only its C + window - 1 candidate keys and its own extra entries, never S x S.

Statistics (opt-in, for the trainer's log steps): given ``stats``, an ``AttentionStats``, the kernel
adds the mean softmax mass on the window keys, the compressed entries and the sink, and the max
logit, from the probabilities it computes anyway; without it the kernel does no extra work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class AttentionStats:
    """Named statistics of one attention layer, accumulated on the device while attached.

    ``means[name] = (sum, count)`` averages over whatever the count counts (query-heads for the
    kernel's masses); ``maxima[name]`` is a running max. Layers add their own names (CSA: the
    indexer's selection); the trainer reduces them over ranks at log steps, without a sync here.
    """

    def __init__(self) -> None:
        self.means: dict[str, tuple[torch.Tensor, int]] = {}
        self.maxima: dict[str, torch.Tensor] = {}

    def add_mean(self, name: str, total: torch.Tensor, count: int) -> None:
        old_total, old_count = self.means.get(name, (0.0, 0))
        self.means[name] = (total.detach().float() + old_total, old_count + count)

    def add_max(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.maxima[name] = value if name not in self.maxima else torch.maximum(self.maxima[name], value)


def _record(stats: AttentionStats, parts: list[torch.Tensor], probs: torch.Tensor, n_win: int) -> None:
    """Masses and max logit of one chunk: parts are the masked logits [window keys, (extra,) sink],
    probs [B,C,H,window keys + extra + sink] their joint softmax."""
    query_heads = probs[..., 0].numel()
    stats.add_mean("mass_window", probs[..., :n_win].sum(), query_heads)
    if len(parts) == 3:
        stats.add_mean("mass_compressed", probs[..., n_win:-1].sum(), query_heads)
    stats.add_mean("mass_sink", probs[..., -1].sum(), query_heads)
    stats.add_max("max_logit", torch.stack([p.amax() for p in parts[:-1]]).amax())


@dataclass
class CompressedKV:
    """Compressed key=value entries a CSA/HCA layer adds to each query's window keys (see module doc)."""

    kv: torch.Tensor  # [B, N, c]
    idx: Optional[torch.Tensor] = None  # [B, S, k] long, -1 = unused slot
    mask: Optional[torch.Tensor] = None  # [B or 1, S, N] bool, True = visible

    def __post_init__(self) -> None:
        if (self.idx is None) == (self.mask is None):
            raise ValueError("CompressedKV needs exactly one of idx (selected entries) or mask (visible entries)")


def _extra_scores(q: torch.Tensor, extra: CompressedKV, s: int,
                  e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of queries q [B,C,H,c] (rows s..e) against their extra entries.

    Returns (scores [B,C,H,K], visible [B|1,C,1,K], values [B,C,K,c] or [B,N,c]).
    """
    if extra.idx is not None:
        idx = extra.idx[:, s:e]  # [B,C,k]
        valid = idx >= 0
        rows = idx.clamp(min=0)
        batch = torch.arange(idx.shape[0], device=idx.device).view(-1, 1, 1)
        values = extra.kv[batch, rows]  # [B,C,k,c]
        scores = torch.einsum("bqhc,bqkc->bqhk", q, values)
        return scores, valid.unsqueeze(2), values
    scores = torch.einsum("bqhc,bnc->bqhn", q, extra.kv)
    return scores, extra.mask[:, s:e].unsqueeze(2), extra.kv


def window_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, window: int, scale: float,
                     query_chunk: int, extra: Optional[CompressedKV] = None,
                     stats: Optional[AttentionStats] = None) -> torch.Tensor:
    """Sliding-window MQA with an attention sink and optional compressed entries; q [B,S,H,c] -> [B,S,H,c]."""
    B, S, H, _ = q.shape
    T = kv.shape[1]
    past = T - S  # rows of kv before the first query
    if past < 0:
        raise ValueError(f"kv has {T} rows but there are {S} queries; kv must end at the queries' positions")
    outs = []
    for s in range(0, S, query_chunk):
        e = min(s + query_chunk, S)
        lo = max(0, past + s - window + 1)  # first key row any query of the chunk can see
        keys = kv[:, lo:past + e]  # [B,K,c]
        qc = q[:, s:e] * scale  # [B,C,H,c]; scaling q scales every key logit but not the sink
        scores = torch.einsum("bqhc,bkc->bqhk", qc, keys)  # [B,C,H,K]
        q_row = torch.arange(past + s, past + e, device=kv.device).unsqueeze(1)
        k_row = torch.arange(lo, past + e, device=kv.device).unsqueeze(0)
        visible = (k_row <= q_row) & (k_row > q_row - window)  # [C,K]
        parts = [scores.float().masked_fill(~visible[:, None], float("-inf"))]
        if extra is not None:
            ex_scores, ex_visible, ex_values = _extra_scores(qc, extra, s, e)
            parts.append(ex_scores.float().masked_fill(~ex_visible, float("-inf")))
        parts.append(sink.float().view(1, 1, H, 1).expand(B, e - s, H, 1))
        probs = torch.cat(parts, dim=-1).softmax(dim=-1)
        n_win = keys.shape[1]
        if stats is not None:
            _record(stats, parts, probs, n_win)
        probs = probs.to(kv.dtype)
        out = torch.einsum("bqhk,bkc->bqhc", probs[..., :n_win], keys)
        if extra is not None:
            ex_probs = probs[..., n_win:-1]
            pattern = "bqhk,bqkc->bqhc" if extra.idx is not None else "bqhn,bnc->bqhc"
            out = out + torch.einsum(pattern, ex_probs, ex_values)
        outs.append(out)
    return torch.cat(outs, dim=1)
