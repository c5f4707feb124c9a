"""DSA: DeepSeek-V3.2's sparse attention, MLA over the tokens a lightning indexer picks (MOSAIC_SPEC §4.3-4.7).

The indexer scores every earlier token t' for query t as

    I[t, t'] = sum_h (w[t, h] * n_I^-1/2) * ReLU(q[t, h] . k[t'] * d_I^-1/2),   w = weights_proj(x),

with index queries from the MLA query latent (``wq_b``), one index key per token (``wk``, then a
LayerNorm with bias), half-split RoPE on the first qk_rope channels of both (the main attention's
frequencies). Each query then attends (MLA, mla.py) only to its top ``index_topk`` causal tokens,
itself included; with fewer visible tokens it sees all of them, as dense MLA. Unlike V4's CSA
(indexer.py, csa.py) keys are per token (no compression), there is no sliding window and no sink.

Selection reuses the CSA indexer's chunked exact top-k with ratio 1 (``LightningIndexer.select``):
ties go to the earlier token, no [S, S] score block is stored, and a query's picks never depend on
the chunking or a prefill/decode split. The sparse attention gathers each query chunk's picked keys
and values and is recomputed in backward (``torch.utils.checkpoint``), so only the inputs are kept:
memory O(S * k) transient per chunk, nothing quadratic.

Training signal (V3.2's sparse stage, as CSA's): the indexer sees detached inputs and is trained only
by ``indexer_loss_coef`` x KL(head-summed main attention mass on the picks || softmax of its scores
on them); the LM loss never reaches it, and its loss reaches nothing else. The decode cache holds
the MLA latent, the RoPE key and the index key per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moesaic.model.rope import rope_half_split

from .base import check_positive, mean_over_positions, register, require
from .context import ForwardContext
from .entries import gather_entries
from .gqa import ELEMENT_BYTES
from .indexer import LightningIndexer
from .kv_formats import index_entry_bytes
from .mla import LatentCache, MLAAttention, MLASpec
from .stats import AttentionStats

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig

INDEX_NORM_EPS = 1e-6  # transformers' indexer k_norm: nn.LayerNorm(index_head_dim, eps=1e-6)


@register
@dataclass
class DSASpec(MLASpec):
    kind: str = "dsa"
    index_heads: int = 16  # lightning-indexer heads n_I
    index_head_dim: int = 32  # lightning-indexer head width d_I (its first qk_rope_head_dim channels carry RoPE)
    index_topk: int = 16  # tokens each query attends to (V3.2: 2048)
    indexer_loss_coef: float = 0.01  # weight of the indexer's KL-to-attention training loss

    not_architecture = MLASpec.not_architecture | {"indexer_loss_coef"}

    def check(self, where: str, seq_len: int) -> None:
        super().check(where, seq_len)
        check_positive(where, self, ["q_lora_rank", "index_heads", "index_head_dim", "index_topk"])
        require(self.index_head_dim >= self.qk_rope_head_dim,
                f"{where}.index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
        require(self.indexer_loss_coef >= 0, f"{where}.indexer_loss_coef={self.indexer_loss_coef} must be >= 0")

    def build(self, model: ModelConfig, layer_idx: int) -> DSAAttention:
        return DSAAttention(self, model, layer_idx)

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        return self.latent_dim() * ELEMENT_BYTES[fmt] + index_entry_bytes(self.index_head_dim, fmt)

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        per_token = self.latent_dim() * ELEMENT_BYTES[fmt] + index_entry_bytes(self.index_head_dim, index_fmt)
        return tokens * per_token, 0.0

    def flops_per_token(self, seq_len: int) -> float:
        """MLA over the picks, the indexer's forward-only scoring of every earlier token, and (with the loss) its
        rescoring of the picks with gradients."""
        picks = mean_over_positions(seq_len, lambda t: (t + 1).clamp(max=self.index_topk))
        index_key = 2 * self.index_heads * self.index_head_dim
        flops = 6 * self.num_heads * (self.qk_head_dim + self.v_head_dim) * picks
        flops += index_key * mean_over_positions(seq_len, lambda t: t + 1)
        return flops + (3 * index_key * picks if self.indexer_loss_coef > 0 else 0.0)


class TokenIndexer(LightningIndexer):
    """V3.2's indexer: one LayerNorm'd key per token; names follow transformers' ``DeepseekV32Indexer``."""

    def __init__(self, spec: DSASpec, hidden_size: int, backend: str) -> None:
        super().__init__(spec.q_lora_rank, hidden_size, spec.index_heads, spec.index_head_dim, spec.index_topk,
                         spec.query_chunk, backend)
        self.wk = nn.Linear(hidden_size, spec.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(spec.index_head_dim, eps=INDEX_NORM_EPS)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """fp32 index keys [B,S,d_I] of x [B,S,D] (detached), rotated by cos/sin [S, rope/2]."""
        return rope_half_split(self.k_norm(self.wk(x.detach())).float(), cos, sin)

    def queries(self, q_lat: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 rotated index queries [B,S,n_I,d_I] and head weights [B,S,n_I] (detached inputs)."""
        return rope_half_split(self.raw_queries(q_lat), cos[:, None], sin[:, None]), self.head_weights(x)


def _sparse_chunk(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, scale: float,
                  v_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query chunk: q [B,C,H,dqk] over its picks idx [B,C,k] (-1 = none) of kv [B,T,H*(dqk+v)] ->
    (out [B,C,H,v], head-summed probabilities [B,C,k] fp32 (no gradient), max logit)."""
    H = q.shape[2]
    picked = gather_entries(kv, idx).unflatten(-1, (H, -1))  # [B,C,k,H,dqk+v]
    keys, values = picked.split([q.shape[-1], v_dim], dim=-1)
    logits = torch.einsum("bchd,bckhd->bchk", q, keys).float() * scale  # [B,C,H,k]
    logits = logits.masked_fill((idx < 0)[:, :, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    out = torch.einsum("bchk,bckhd->bchd", probs.to(values.dtype), values)
    return out, probs.detach().sum(dim=2), logits.detach().amax()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float,
                     query_chunk: int, stats: Optional[AttentionStats] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B,S,H,dqk] over the picked rows idx [B,S,k] (-1 = none; each row has one valid pick at
    least) of k [B,T,H,dqk], v [B,T,H,v] -> (out [B,S,H,v], mass [B,S,k] fp32: each pick's probability summed
    over heads, no gradient). Chunks of ``query_chunk`` queries, recomputed in backward (module docstring)."""
    kv = torch.cat([k, v], dim=-1).flatten(2)  # [B,T,H*(dqk+v)]: one gather for both
    run = (lambda *a: checkpoint(_sparse_chunk, *a, use_reentrant=False)) if torch.is_grad_enabled() else _sparse_chunk
    outs, masses, top = [], [], q.new_full((), float("-inf"), dtype=torch.float32)
    for s in range(0, q.shape[1], query_chunk):
        out, mass, max_logit = run(q[:, s:s + query_chunk], kv, idx[:, s:s + query_chunk], scale, v.shape[-1])
        outs.append(out)
        masses.append(mass)
        top = torch.maximum(top, max_logit)
    if stats is not None:
        stats.add_max("max_logit", top)
    return torch.cat(outs, dim=1), torch.cat(masses, dim=1)


class DSAAttention(MLAAttention):
    def __init__(self, spec: DSASpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(spec, cfg, layer_idx)
        self.indexer = TokenIndexer(spec, cfg.hidden_size, cfg.attention.backend)
        self.indexer_loss_coef = spec.indexer_loss_coef

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> LatentCache:
        return LatentCache(batch_size, self.spec.latent_dim(), self.indexer.head_dim, dtype=dtype, device=device)

    def attend(self, x: torch.Tensor, q: torch.Tensor, q_lat: Optional[torch.Tensor], k: torch.Tensor,
               v: torch.Tensor, query_start: int, cos: torch.Tensor, sin: torch.Tensor,
               ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        assert q_lat is not None  # DSASpec.check: q_lora_rank > 0
        positions = torch.arange(query_start, query_start + x.shape[1], device=x.device)  # [S]
        keys = self.every_token(self.indexer.keys(x, cos, sin), ctx, query_start, LatentCache.extend_index)  # [B,T,d_I]
        q_i, w_i = self.indexer.queries(q_lat, x, cos, sin)  # [B,S,n_I,d_I], [B,S,n_I]
        idx, _ = self.indexer.select(q_i, w_i, keys, positions, 1)  # [B,S,k] token positions, -1 = none
        stats = ctx.stats_for(self.layer_idx)
        o, mass = sparse_attention(q, k, v, idx, self.scale, self.spec.query_chunk, stats)
        if stats is not None:
            self.indexer.record_selection(stats, ctx.sequence, idx, positions, keys.shape[1], 1)
        if ctx.cache(self.layer_idx) is not None or self.indexer_loss_coef == 0:
            return o, x.new_zeros(())
        return o, self.indexer_loss_coef * self.indexer.kl_loss(ctx.sequence, q_i, w_i, keys, idx, mass)
