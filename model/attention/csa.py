"""CSA: the lightning indexer's top-k of overlapping m-token entries join the window (MODEL_SPEC §3).

m is small (4 in V4) and entries overlap; the indexer (indexer.py) picks the top-k visible entries
per query, passed to the kernel as indices, so the kernel gathers k entries per query: O(S k) memory.

Indexer training signal (V3.2's sparse-stage KL, UNCONFIRMED for V4; see ``indexer.py``): the
target is the main attention's probability on each selected entry, summed over heads, which the
kernel returns from the softmax it computes anyway (so the loss is formed after the kernel, through
the ``AuxLoss`` the hook returns). The indexer's own scores are recomputed differentiably for the
selected entries only (``indexer.selected_scores``: per query chunk, regathering the keys in
backward; selection itself runs without autograd), so neither an [S, N] block nor the [S, k, c_I]
gathered keys are kept for backward. With a decode cache the layer is in inference and returns no
aux loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from moesaic.configs.schema import ModelConfig
from moesaic.model.sequence import WholeSequence

from .backbone import AuxLoss
from .base import HFReader, check_positive, mean_over_positions, register, require
from .cache import CompressedStream, SWACache
from .compressed import CompressedAttention, CompressedSpec
from .context import ForwardContext
from .entries import CompressedKV
from .indexer import Indexer
from .kv_formats import index_entry_bytes
from .stats import AttentionStats


@register
@dataclass
class CSASpec(CompressedSpec):
    kind: str = "csa"
    index_heads: int = 4  # lightning-indexer heads n_I
    index_head_dim: int = 32  # lightning-indexer head width c_I
    index_topk: int = 16  # compressed entries selected per query
    indexer_loss_coef: float = 0.01  # weight of the indexer's KL-to-attention training loss

    hf_layer_type = "compressed_sparse_attention"
    hf_rate_key = "compress_rate_csa"
    not_architecture = CompressedSpec.not_architecture | {"indexer_loss_coef"}
    hf_names = {**CompressedSpec.hf_names, "indexer.wq_b.weight": "compressor.indexer.q_b_proj.weight",
                "indexer.weights_proj.weight": "compressor.indexer.scorer.weights_proj.weight",
                "indexer.compressor.wkv.weight": "compressor.indexer.kv_proj.weight",
                "indexer.compressor.wgate.weight": "compressor.indexer.gate_proj.weight",
                "indexer.compressor.ape": "compressor.indexer.position_bias",
                "indexer.compressor.norm.weight": "compressor.indexer.kv_norm.weight"}

    def check(self, where: str, seq_len: int) -> None:
        super().check(where, seq_len)
        check_positive(where, self, ["index_heads", "index_head_dim", "index_topk"])
        require(self.index_head_dim >= self.rope_head_dim,
                f"{where}.index_head_dim={self.index_head_dim} must be >= rope_head_dim={self.rope_head_dim}")
        require(self.index_topk <= seq_len // self.ratio,
                f"{where}.index_topk={self.index_topk} exceeds the {seq_len // self.ratio} compressed entries of a "
                f"data.seq_len={seq_len} sequence (must be <= seq_len / ratio)")
        require(self.indexer_loss_coef >= 0, f"{where}.indexer_loss_coef={self.indexer_loss_coef} must be >= 0")

    def build(self, model: ModelConfig, layer_idx: int) -> CompressedSparseAttention:
        return CompressedSparseAttention(self, model, layer_idx)

    def entry_bytes(self, fmt: str, index_fmt: str) -> float:
        return super().entry_bytes(fmt, index_fmt) + index_entry_bytes(self.index_head_dim, index_fmt)

    def extra_keys(self, seq_len: int) -> float:
        return mean_over_positions(seq_len, lambda t: self.visible_entries(t).clamp(max=self.index_topk))

    def extra_flops(self, seq_len: int) -> float:
        """The indexer's forward-only scoring of every visible entry, and of its picks with grads for its loss
        (the loss's target mass comes from the kernel)."""
        index_key = 2 * self.index_heads * self.index_head_dim
        flops = index_key * mean_over_positions(seq_len, self.visible_entries)
        if self.indexer_loss_coef > 0:
            flops += 3 * index_key * self.extra_keys(seq_len)
        return flops

    def to_hf(self, where: str) -> dict[str, Any]:
        return {**super().to_hf(where), "index_n_heads": self.index_heads, "index_head_dim": self.index_head_dim,
                "index_topk": self.index_topk}

    @classmethod
    def from_hf(cls, hf: HFReader) -> CSASpec:
        return cls(**cls.compressed_from_hf(hf), index_heads=int(hf.get("index_n_heads")),
                   index_head_dim=int(hf.get("index_head_dim")), index_topk=int(hf.get("index_topk")))


class CompressedSparseAttention(CompressedAttention):
    overlap = True

    def __init__(self, spec: CSASpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(spec, cfg, layer_idx)
        self.indexer = Indexer(spec, cfg.hidden_size, cfg.rms_norm_eps, self.rope, self.backend)
        self.indexer_loss_coef = spec.indexer_loss_coef

    def _streams(self, batch_size: int, device: torch.device | str | None,
                 dtype: torch.dtype) -> tuple[CompressedStream, Optional[CompressedStream]]:
        main, _ = super()._streams(batch_size, device, dtype)
        return main, CompressedStream(self.indexer.compressor, batch_size, torch.float32, device)

    def compressed_entries(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                           cache: Optional[SWACache], ctx: ForwardContext,
                           stats: Optional[AttentionStats]) -> tuple[Optional[CompressedKV], Optional[AuxLoss]]:
        entries = self._main_entries(x, cache, ctx)  # [B,N,c]
        if cache is None:
            keys = self._whole(self.indexer.keys, x, ctx)  # [B,N,c_I]
        else:
            keys = cache.index.absorb(self.indexer.compressor, x.detach(), cache.pos)
        q_i, w_i = self.indexer.queries(qr, x, positions)  # [B,S,H_I,c_I], [B,S,H_I]: for selection and loss
        idx, _ = self.indexer.select(q_i, w_i, keys, ctx.start(x.shape[1], cache), self.ratio)  # [B,S,k]
        if stats is not None:
            self._record_selection(stats, ctx.sequence, idx, positions, keys.shape[1])
        extra = CompressedKV(entries, idx=idx)
        if cache is not None or self.indexer_loss_coef == 0:
            return extra, None
        return extra, lambda mass: self.indexer_loss_coef * self._indexer_loss(ctx.sequence, q_i, w_i, keys, idx, mass)

    def _record_selection(self, stats: AttentionStats, sequence: WholeSequence, idx: torch.Tensor,
                          positions: torch.Tensor, num_entries: int) -> None:
        self.indexer.record_selection(stats, sequence, idx, positions, num_entries, self.ratio)

    def _indexer_loss(self, sequence: WholeSequence, q_i: torch.Tensor, w_i: torch.Tensor, keys: torch.Tensor,
                      idx: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        return self.indexer.kl_loss(sequence, q_i, w_i, keys, idx, mass)
