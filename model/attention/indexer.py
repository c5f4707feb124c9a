"""DeepSeek-V4 lightning indexer: picks the top-k CSA entries each query attends to (MODEL_SPEC §3.2).

Index keys come from the indexer's own overlapping compressor (width c_I); index queries from the
query latent q_lat. The relevance of entry s to query t is

    I[t, s] = sum_h (w[t, h] * n_I^-1/2) * ReLU(q[t, h] . K[s]) * c_I^-1/2,   w = weights_proj(x),

masked to the causally complete entries w < floor((t+1)/m) (§3.4). ReLU makes exact ties (score 0)
common, so the top-k breaks ties toward the lower entry index (§13.4): a query's selection then
never depends on the sequence length, the query chunking or a prefill/decode split.

Training signal (the V3.2 DSA recipe, chosen here and UNCONFIRMED for V4, §3.4): the indexer sees
detached inputs, so it gets no gradient from the LM loss and gives none to the backbone; it is
trained by ``indexer_kl_loss``, a KL from the (detached) main attention to the indexer's softmax,
restricted to the selected entries (V3.2's sparse stage; its dense warm-up is not implemented).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .._cpu_compiled import use_compiled
from ..checkpointing import products_not_kept
from ..rope import RotaryEmbedding
from ..sequence import WholeSequence
from .compressor import Compressor, CompressorState, rope_tail
from .entries import add_gathered_grad, gather_entries
from .stats import AttentionStats

if TYPE_CHECKING:
    from .csa import CSASpec

_FUSED_QUERIES = 32  # queries per chunk on the compiled CPU path: their [32 H, N] dots stay in cache


def _fused_topk(dots: torch.Tensor, w: torch.Tensor, limit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU: (entries [R, k] long, scores [R, k]) of ``_topk_cpu.relu_weighted_topk`` for dots [R, H, n],
    w [R, H] and limit [R] (numba is imported on first use)."""
    from ._topk_cpu import relu_weighted_topk

    entries, scores = dots.new_empty(dots.shape[0], k, dtype=torch.long), dots.new_empty(dots.shape[0], k)
    relu_weighted_topk(dots.numpy(), w.contiguous().numpy(), limit.contiguous().numpy(), entries.numpy(),
                       scores.numpy())
    return entries, scores


def _sortable_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 [same shape] ordered as fp32 x (no NaN): equal floats, -0.0 and +0.0 included, get equal values."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip magnitude bits


def _order_keys(scores: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys [same shape] that order (score descending, then entry ascending) as plain integers:
    the score's order in the high 32 bits, the reversed entry number in the low 32 bits."""
    return (_sortable_bits(scores) << 32) | (0xFFFFFFFF - entries)


def _entries_of(keys: torch.Tensor) -> torch.Tensor:
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _exact_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Entries [B, s, k] of the k largest scores of score [B, s, n], ties going to the lower entry, ordered
    by (score descending, entry ascending): the same picks as a stable descending sort.

    A float topk picks arbitrarily among entries tied at the k-th score, so the top-k runs over unique
    int64 keys that hold both orders; checking for ties first and redoing only those rows would make the
    host wait for the device at every chunk.
    """
    entry = torch.arange(score.shape[-1], device=score.device)
    return _entries_of(_order_keys(score, entry).topk(k, dim=-1).values)


class LightningIndexer(nn.Module):
    """What V4's CSA indexer and V3.2's DSA indexer (dsa.py) share: index queries from the query latent,
    per-head weights, the exact chunked top-k, the differentiable rescoring of the picks for the KL
    loss and the selection statistics. Subclasses supply the keys and the RoPE of the queries."""

    def __init__(self, q_lora_rank: int, hidden_size: int, n_heads: int, head_dim: int, topk: int,
                 query_chunk: int, backend: str) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.query_chunk = n_heads, head_dim, topk, query_chunk
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.backend = backend  # model.attention.backend: the compiled CPU selection, the torch ops or Triton

    def raw_queries(self, q_lat: torch.Tensor) -> torch.Tensor:
        """fp32 unrotated index queries [B, S, H, c_I] of q_lat [B, S, q_lora_rank] (detached input)."""
        return self.wq_b(q_lat.detach()).float().unflatten(-1, (self.n_heads, self.head_dim))

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 head weights w [B, S, H] of x (detached), carrying the n_I^-1/2 * c_I^-1/2 scale."""
        return self.weights_proj(x.detach()).float() * (self.n_heads * self.head_dim) ** -0.5

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Unmasked index scores I [B, S, N] from ``queries`` output and keys [B, N, c_I]."""
        return LightningIndexer._scores_t(q, w, keys.float().transpose(1, 2).contiguous())

    @staticmethod
    def _scores_t(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
        """``scores`` from transposed fp32 keys [B, c_I, N] (a contiguous [c_I, N] block is the fast GEMM operand)."""
        B, S, H, c = q.shape
        dots = torch.matmul(q.reshape(B, S * H, c), keys_t).relu_()  # [B, S*H, N]
        scores = torch.matmul(w.reshape(B * S, 1, H), dots.view(B * S, H, -1))  # [B*S, 1, N]: head-weighted sum
        return scores.view(B, S, -1)

    @torch.no_grad()
    @products_not_kept()  # selective checkpointing would otherwise keep every chunk's scores
    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, start: int,
               ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k causally visible entries per query (no gradient: the loss rescores the picks).

        q, w: ``queries`` at positions start .. start + S - 1; keys [B, N, c_I]. The first position comes
        as a host int, so each chunk's range of visible entries is known without reading the device.
        Returns (topk_idx [B, S, k] long, -1 where fewer than k entries are visible;
        topk_scores [B, S, k], -inf at those -1 picks), k = min(index_topk, N), in descending score
        order. Scores are built ``query_chunk`` queries at a time and only against the entries some
        query of the chunk can see, so memory is O(chunk * H * N) and the work half of S x N; q and w
        come projected for all queries at once, so chunking cannot change any score. On CPU the
        ReLU, head sum, mask and top-k of 32-query chunks are one compiled pass (``_topk_cpu``).
        """
        k = min(self.topk, keys.shape[1])
        B, S, H, c = q.shape
        visible = (torch.arange(start, start + S, device=q.device) + 1) // ratio  # [S] entries each query may use
        fused = use_compiled(self.backend, q)
        chunk = _FUSED_QUERIES if fused else self.query_chunk
        starts = range(0, S, chunk)
        spans = [((start + lo + 1) // ratio, (start + min(lo + chunk, S)) // ratio) for lo in starts]  # (fewest,
        # most) entries visible to a query of the chunk: visibility grows with the position
        top_idx = torch.full((B, S, k), -1, dtype=torch.long, device=q.device)
        top_scores = torch.full((B, S, k), float("-inf"), device=q.device)
        keys_t = keys.float().transpose(1, 2).contiguous()  # [B, c_I, N]
        if fused:
            buffer = q.new_empty(B * chunk * H * keys.shape[1])  # one chunk's dots, reused: stays in cache
        for lo, (first, n) in zip(starts, spans):
            hi, n = lo + chunk, min(n, keys.shape[1])
            if n == 0:
                continue
            if fused:
                s = min(hi, S) - lo
                dots = torch.bmm(q[:, lo:hi].reshape(B, s * H, c), keys_t[..., :n],
                                 out=buffer[:B * s * H * n].view(B, s * H, n))  # [B, s*H, n]
                picked, scores = _fused_topk(dots.view(B * s, H, n), w[:, lo:hi].reshape(B * s, H),
                                             visible[lo:hi].repeat(B), k)  # [B*s, k] each
                top_idx[:, lo:hi], top_scores[:, lo:hi] = picked.view(B, s, k), scores.view(B, s, k)
                continue
            if self.backend == "triton":
                from ._indexer_triton import indexer_scores  # triton is imported only when chosen

                score = indexer_scores(q[:, lo:hi], w[:, lo:hi], keys_t[..., :n])  # [B, s, n]
            else:
                score = self._scores_t(q[:, lo:hi], w[:, lo:hi], keys_t[..., :n])  # [B, s, n]
            # Entries below the chunk's smallest limit are visible to all its queries: mask only the rest.
            first = min(first, n)
            entry = torch.arange(first, n, device=keys.device)  # [n - first]
            score[..., first:].masked_fill_(entry >= visible[lo:hi, None], float("-inf"))
            picked = _exact_topk(score, min(k, n))  # [B, s, <=k]
            top_scores[:, lo:hi, :picked.shape[-1]] = score.gather(-1, picked)
            top_idx[:, lo:hi, :picked.shape[-1]] = picked.masked_fill(picked >= visible[lo:hi, None], -1)
        return top_idx, top_scores

    @torch.no_grad()
    def record_selection(self, stats: AttentionStats, sequence: WholeSequence, idx: torch.Tensor,
                         positions: torch.Tensor, num_entries: int, ratio: int) -> None:
        """The selection statistics for a log step (docs/metrics.md), from idx [B,S,k] at positions [S].

        index_distance: tokens from a pick's last token to the query, mean over picks; index_coverage:
        fraction of the (sequence, entry) pairs picked by at least one query of the sequence;
        index_overlap: fraction of a query's picks that the previous query also picked.
        """
        valid = idx >= 0  # [B,S,k]
        distance = positions.view(1, -1, 1) - ((idx + 1) * ratio - 1)  # [B,S,k]; entry w ends at (w+1)m-1
        stats.add_mean("index_distance", distance.masked_fill(~valid, 0).sum(), valid.sum())
        hits = idx.new_zeros(idx.shape[0], num_entries + 1)  # [B, N + 1]; column N collects the -1 picks
        hits.scatter_(1, idx.masked_fill(~valid, num_entries).flatten(1), 1)
        covered = sequence.sum(hits[:, :num_entries]) > 0  # [B, N]: picked anywhere in the sequence
        stats.add_mean("index_coverage", covered.sum(), covered.numel())
        rows = torch.cat([sequence.preceding(idx, 1), idx], dim=1)  # [B, S (+1 from the previous shard), k]
        shared = idx.new_zeros(())
        for lo in range(0, rows.shape[1] - 1, self.query_chunk):  # [chunk, k, k] comparisons at a time
            prev, cur = rows[:, lo:lo + self.query_chunk], rows[:, lo + 1:lo + 1 + self.query_chunk]
            shared = shared + ((cur.unsqueeze(-1) == prev[:, :cur.shape[1]].unsqueeze(-2)).any(-1) & (cur >= 0)).sum()
        stats.add_mean("index_overlap", shared, (rows[:, 1:] >= 0).sum())

    def kl_loss(self, sequence: WholeSequence, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                idx: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """KL from the main attention's head-summed mass on the picks (mass [B,S,k]) to the indexer's softmax
        over them (q, w: the index queries and head weights of the selection; keys [B,N,c_I])."""
        index_scores = selected_scores(q, w, keys, idx, self.query_chunk)  # [B,S,k]
        valid = idx >= 0
        queries = sequence.sum(valid.any(dim=-1).sum())  # the mean runs over the whole sequence
        return indexer_kl_loss(index_scores, mass, valid, queries)


class Indexer(LightningIndexer):
    """Lightning indexer of one CSA layer: keys from its own compressor; names follow the official checkpoints."""

    def __init__(self, spec: CSASpec, hidden_size: int, eps: float, rope: RotaryEmbedding, backend: str) -> None:
        super().__init__(spec.q_lora_rank, hidden_size, spec.index_heads, spec.index_head_dim, spec.index_topk,
                         spec.query_chunk, backend)
        self.rope_dim, self.ratio = spec.rope_head_dim, spec.ratio
        self.compressor = Compressor(hidden_size, spec.index_head_dim, spec.ratio, True, rope, spec.rope_head_dim, eps)
        self.rope = rope

    def keys(self, x: torch.Tensor, start: int = 0, before: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Index keys [B, S//m, c_I] of x [B, S, D] (input detached: see the module docstring).

        ``start``/``before``: x's position and preceding window, as in ``Compressor.forward``.
        """
        return self.compressor(x.detach(), start, None if before is None else before.detach()).float()

    def queries(self, q_lat: torch.Tensor, x: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 index queries q [B, S, H, c_I], rotated at ``positions`` [S], and head weights w [B, S, H]."""
        cos, sin = self.rope(positions)  # [S, rope_dim/2]
        q = rope_tail(self.raw_queries(q_lat), cos[:, None], sin[:, None], self.rope_dim)  # [B, S, H, c_I]
        return q, self.head_weights(x)

    def forward(self, q_lat: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training / stateless prefill over positions 0..S-1: (topk_idx, topk_scores, keys)."""
        keys = self.keys(x)  # [B, S//m, c_I]
        positions = torch.arange(x.shape[1], device=x.device)  # [S]
        return (*self.select(*self.queries(q_lat, x, positions), keys, 0, self.ratio), keys)

    @torch.no_grad()
    def step(self, state: CompressorState, keys: torch.Tensor, q_lat_t: torch.Tensor, x_t: torch.Tensor,
             pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode the token at ``pos``: advance the compressor, append a key if a window closed, select.

        state/keys [B, N, c_I] are the indexer's decode cache (from ``compressor.prefill`` or
        ``compressor.new_state`` and an empty [B, 0, c_I]). Returns (topk_idx [B, 1, k],
        topk_scores [B, 1, k], keys) where keys includes the entry this token closed, if any.
        """
        new_key = self.compressor.step(state, x_t, pos)  # [B, 1, c_I] or None
        if new_key is not None:
            keys = torch.cat([keys, new_key.to(keys.dtype)], dim=1)  # [B, N+1, c_I]
        positions = torch.tensor([pos], device=x_t.device)  # [1]
        return (*self.select(*self.queries(q_lat_t, x_t, positions), keys, pos, self.ratio), keys)


class _SelectedScores(torch.autograd.Function):
    """``Indexer.scores`` at the picks only, chunk by chunk; backward regathers the keys, so neither the
    [S, k, c_I] gathered keys nor per-chunk full-size gradients exist (each chunk's gradient is
    written into one [S, ...] buffer)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor,
                chunk: int) -> torch.Tensor:
        scores = q.new_empty(idx.shape, dtype=torch.float32)
        for s in range(0, q.shape[1], chunk):
            dots = torch.einsum("bshc,bskc->bshk", q[:, s:s + chunk], gather_entries(keys, idx[:, s:s + chunk]))
            scores[:, s:s + chunk] = torch.einsum("bshk,bsh->bsk", dots.relu(), w[:, s:s + chunk])
        ctx.save_for_backward(q, w, keys, idx)
        ctx.chunk = chunk
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, d_scores: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, w, keys, idx = ctx.saved_tensors
        d_q, d_w, d_keys = torch.empty_like(q), torch.empty_like(w), torch.zeros_like(keys)
        for s in range(0, q.shape[1], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            picked = gather_entries(keys, idx[:, sl])  # [B,C,k,c_I]
            dots = torch.einsum("bshc,bskc->bshk", q[:, sl], picked)  # [B,C,H,k]
            d_w[:, sl] = torch.einsum("bshk,bsk->bsh", dots.relu(), d_scores[:, sl])
            d_dots = (dots > 0) * w[:, sl, :, None] * d_scores[:, sl, None, :]  # [B,C,H,k]
            d_q[:, sl] = torch.einsum("bshk,bskc->bshc", d_dots, picked)
            add_gathered_grad(d_keys, idx[:, sl], torch.einsum("bshk,bshc->bskc", d_dots, q[:, sl]))
        return d_q, d_w, d_keys, None, None


def selected_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """``Indexer.scores`` for the picks only, differentiable: q [B,S,H,c_I], w [B,S,H], keys [B,N,c_I],
    idx [B,S,k] (-1 picks give garbage, to be masked) -> [B,S,k] fp32, built ``chunk`` queries at a time."""
    return _SelectedScores.apply(q, w, keys.float(), idx, chunk)


def indexer_kl_loss(index_scores: torch.Tensor, main_probs: torch.Tensor, valid: torch.Tensor,
                    queries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(p_main || softmax(index_scores)) over the selected entries, averaged over queries.

    index_scores [B, S, k] (``select``'s topk_scores), main_probs [B, S, k]: the main attention's
    probability mass on each selected entry, summed over heads; it is detached and renormalised over
    the valid selected entries (V3.2's L1-normalised head sum). valid [B, S, k] bool. Queries with
    no valid entry are skipped; the mean runs over the others, or over ``queries`` of them (a count
    over the whole sequence when these are a shard of it). Gradient reaches index_scores only.
    """
    has_any = valid.any(dim=-1)  # [B, S]
    logits = index_scores.float().masked_fill(~valid, float("-inf"))  # [B, S, k]
    logits = logits.masked_fill(~has_any.unsqueeze(-1), 0.0)  # all-invalid rows: finite, unused
    log_q = logits.log_softmax(dim=-1).masked_fill(~valid, 0.0)  # [B, S, k]
    p = main_probs.detach().float().masked_fill(~valid, 0.0)  # [B, S, k]
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # [B, S]; 0 on skipped rows
    return kl.sum() / (has_any.sum() if queries is None else queries).clamp_min(1)
