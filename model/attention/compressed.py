"""CSA and HCA: the V4 backbone with compressed KV entries in the same softmax (MODEL_SPEC §3, §4).

Both layer types add entries of a ``Compressor`` (one shared K = V head, like the window keys) to
each query's sliding window; entry w reads tokens up to (w+1)m-1, so query t may use it iff
w < floor((t+1)/m) (§3.4). Entries are computed once per sequence and masked per query; queries
t < m-1 see none and rely on the window and the sink.

* HCA (m' large, no overlap): every visible entry joins the softmax, passed to the kernel as a
  [1, S, N] visibility mask. N = S/m' is small (S/128), so the mask and the kernel's per-chunk
  [chunk, N] logits stay near-linear in S; an index list of all visible entries would cost
  S x N x c gathered values instead.
* CSA (m small, overlapping windows): the lightning indexer picks the top-k visible entries per
  query, passed as indices, so the kernel gathers k entries per query: O(S k) memory.

Indexer training signal (V3.2's sparse-stage KL, UNCONFIRMED for V4; see ``indexer.py``): the
target is the main attention's probability on each selected entry, summed over heads, which the
kernel returns from the softmax it computes anyway (so the loss is formed after the kernel, through
the ``AuxLoss`` the hook returns). The indexer's own
scores are recomputed differentiably for the selected entries only (``indexer.selected_scores``:
per query chunk, regathering the keys in backward; selection itself runs without autograd), so
neither an [S, N] block nor the [S, k, c_I] gathered keys are kept for backward. With a decode
cache the layer is in inference and returns no aux loss.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from moesaic.configs.schema import ModelConfig

from .backbone import AuxLoss, SlidingWindowAttention
from .cache import CompressedCache, CompressedStream, SWACache
from .compressor import Compressor
from .indexer import Indexer, indexer_kl_loss, selected_scores
from .kernels import CompressedKV


def visible_entries(positions: torch.Tensor, num_entries: int, ratio: int) -> torch.Tensor:
    """[1, S, N] bool: entry w is visible to the query at position t iff w < (t + 1) // ratio."""
    entry = torch.arange(num_entries, device=positions.device)
    return (entry < ((positions + 1) // ratio).unsqueeze(-1)).unsqueeze(0)


class _CompressedAttention(SlidingWindowAttention):
    """Backbone + one compressor producing this layer's main entries (head_dim wide, K = V)."""

    compressed = True  # compress_rope_theta + YaRN for q, kv and entries alike
    overlap: bool

    def __init__(self, cfg: ModelConfig, layer_idx: int, ratio: int) -> None:
        super().__init__(cfg, layer_idx)
        self.ratio = ratio
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, ratio, self.overlap, self.rope, self.rope_dim,
                                     cfg.rms_norm_eps)

    def _streams(self, batch_size: int, device: torch.device | str | None,
                 dtype: torch.dtype) -> tuple[CompressedStream, Optional[CompressedStream]]:
        """Decode streams: main entries, and (CSA) indexer keys."""
        return CompressedStream(self.compressor, batch_size, dtype, device), None

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> CompressedCache:
        return CompressedCache(batch_size, self.window, self.head_dim, *self._streams(batch_size, device, dtype),
                               dtype=dtype, device=device)

    def _whole(self, compress: Callable[[torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor],
               x: torch.Tensor) -> torch.Tensor:
        """The whole sequence's entries [B, N, ...] from ``compress`` (``Compressor.forward``'s signature).

        x [B,S,D] are this module's tokens: under sequence parallelism a shard, which starts at a
        window boundary and whose first entry (overlapping compressors) reads the window before it.
        """
        seq = self.sequence
        before = seq.preceding(x, self.ratio) if self.overlap else None
        return seq.gather(compress(x, seq.offset(x.shape[1]), before))

    def _main_entries(self, x: torch.Tensor, cache: Optional[SWACache]) -> torch.Tensor:
        """Entries visible so far [B, N, c]: the whole sequence's, or the cache's after absorbing x."""
        if cache is None:
            return self._whole(self.compressor, x)
        assert isinstance(cache, CompressedCache), "a CSA/HCA layer needs the cache from its own make_cache"
        return cache.main.absorb(self.compressor, x, cache.pos)


class HeavilyCompressedAttention(_CompressedAttention):
    """HCA: dense attention over all causally visible entries of m' tokens each (MODEL_SPEC §4)."""

    overlap = False

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, cfg.attention.hca_ratio)

    def compressed_entries(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                           cache: Optional[SWACache]) -> tuple[Optional[CompressedKV], Optional[AuxLoss]]:
        entries = self._main_entries(x, cache)  # [B,N,c]
        return CompressedKV(entries, mask=visible_entries(positions, entries.shape[1], self.ratio)), None


class CompressedSparseAttention(_CompressedAttention):
    """CSA: the indexer's top-k of the overlapping m-token entries join the window (MODEL_SPEC §3)."""

    overlap = True

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, cfg.attention.csa_ratio)
        self.indexer = Indexer(cfg, self.rope)
        self.indexer_loss_coef = cfg.attention.indexer_loss_coef

    def _streams(self, batch_size: int, device: torch.device | str | None,
                 dtype: torch.dtype) -> tuple[CompressedStream, Optional[CompressedStream]]:
        main, _ = super()._streams(batch_size, device, dtype)
        return main, CompressedStream(self.indexer.compressor, batch_size, torch.float32, device)

    def compressed_entries(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                           cache: Optional[SWACache]) -> tuple[Optional[CompressedKV], Optional[AuxLoss]]:
        entries = self._main_entries(x, cache)  # [B,N,c]
        if cache is None:
            keys = self._whole(self.indexer.keys, x)  # [B,N,c_I]
        else:
            keys = cache.index.absorb(self.indexer.compressor, x.detach(), cache.pos)
        q_i, w_i = self.indexer.queries(qr, x, positions)  # [B,S,H_I,c_I], [B,S,H_I]: for selection and loss
        idx, _ = self.indexer.select(q_i, w_i, keys, positions, self.ratio)  # [B,S,k]
        if self.stats is not None:
            self._record_selection(idx, positions, keys.shape[1])
        extra = CompressedKV(entries, idx=idx)
        if cache is not None or self.indexer_loss_coef == 0:
            return extra, None
        return extra, lambda mass: self.indexer_loss_coef * self._indexer_loss(q_i, w_i, keys, idx, mass)

    @torch.no_grad()
    def _record_selection(self, idx: torch.Tensor, positions: torch.Tensor, num_entries: int) -> None:
        """The indexer's selection statistics for a log step (docs/metrics.md), from idx [B,S,k] at positions [S].

        index_distance: tokens from a pick's last token to the query, mean over picks; index_coverage:
        fraction of the (sequence, entry) pairs picked by at least one query of the sequence;
        index_overlap: fraction of a query's picks that the previous query also picked.
        """
        valid = idx >= 0  # [B,S,k]
        distance = positions.view(1, -1, 1) - ((idx + 1) * self.ratio - 1)  # [B,S,k]; entry w ends at (w+1)m-1
        self.stats.add_mean("index_distance", distance.masked_fill(~valid, 0).sum(), valid.sum())
        hits = idx.new_zeros(idx.shape[0], num_entries + 1)  # [B, N + 1]; column N collects the -1 picks
        hits.scatter_(1, idx.masked_fill(~valid, num_entries).flatten(1), 1)
        covered = self.sequence.sum(hits[:, :num_entries]) > 0  # [B, N]: picked anywhere in the sequence
        self.stats.add_mean("index_coverage", covered.sum(), covered.numel())
        rows = torch.cat([self.sequence.preceding(idx, 1), idx], dim=1)  # [B, S (+1 from the previous shard), k]
        shared = idx.new_zeros(())
        for lo in range(0, rows.shape[1] - 1, self.query_chunk):  # [chunk, k, k] comparisons at a time
            prev, cur = rows[:, lo:lo + self.query_chunk], rows[:, lo + 1:lo + 1 + self.query_chunk]
            shared = shared + ((cur.unsqueeze(-1) == prev[:, :cur.shape[1]].unsqueeze(-2)).any(-1) & (cur >= 0)).sum()
        self.stats.add_mean("index_overlap", shared, (rows[:, 1:] >= 0).sum())

    def _indexer_loss(self, q_i: torch.Tensor, w_i: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor,
                      mass: torch.Tensor) -> torch.Tensor:
        """KL from the main attention's head-summed mass on the selected entries (the kernel's ``mass``
        [B,S,k]) to the indexer's softmax over them (index queries q_i, w_i from ``Indexer.queries``)."""
        index_scores = selected_scores(q_i, w_i, keys, idx, self.query_chunk)  # [B,S,k]
        valid = idx >= 0
        queries = self.sequence.sum(valid.any(dim=-1).sum())  # the mean runs over the whole sequence
        return indexer_kl_loss(index_scores, mass, valid, queries)
