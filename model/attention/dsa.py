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
the chunking or a prefill/decode split. The sparse attention runs in the latent space (MLA's weight
absorption, as DeepSeek's sparse kernels do): queries q_nope W_uk ; q_rot against the picked tokens'
cached [latent ; RoPE key], one row per pick shared by all heads (MQA), the output mapped by W_uv.
So neither training nor decoding expands keys and values per head, and a pick costs r + rope values
of memory traffic, not H * (qk + v). Like flash attention the kernel keeps only the output and the
log-sum-exp for backward, which regathers each query chunk's picks: O(chunk * k) transient, nothing quadratic.

GLM-MoE-DSA's variant (MOSAIC_SPEC §4.8) is two options: ``index_rope: interleave`` and ``share_topk``,
a layer without an indexer that attends to the picks of the DSA layer before it (they pass through the
forward context, so a run of shared layers reuses the last indexer's picks).

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
from torch.autograd.function import once_differentiable

from moesaic.model.rope import apply_rope, rope_half_split

from .base import AttentionSpec, check_positive, mean_over_positions, register, require
from .context import ForwardContext
from .entries import add_gathered_grad, gather_entries
from .gqa import ELEMENT_BYTES
from .indexer import LightningIndexer
from .kv_formats import index_entry_bytes
from .mla import LatentCache, MLAAttention, MLASpec
from .stats import AttentionStats

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig

INDEX_NORM_EPS = 1e-6  # transformers' indexer k_norm: nn.LayerNorm(index_head_dim, eps=1e-6)
INDEX_ROPES = ("half", "interleave")
TOPK_KEY = "dsa.topk"  # ForwardContext.shared: the last DSA layer's picks, for a share_topk layer after it


@register
@dataclass
class DSASpec(MLASpec):
    kind: str = "dsa"
    index_heads: int = 16  # lightning-indexer heads n_I
    index_head_dim: int = 32  # lightning-indexer head width d_I (its first qk_rope_head_dim channels carry RoPE)
    index_topk: int = 16  # tokens each query attends to (V3.2: 2048)
    indexer_loss_coef: float = 0.01  # weight of the indexer's KL-to-attention training loss
    index_rope: str = "half"  # RoPE of the indexer's first channels: half (V3.2) | interleave (GLM-MoE-DSA)
    share_topk: bool = False  # no indexer: reuse the previous layer's picks (GLM's "shared" indexer layers)

    not_architecture = MLASpec.not_architecture | {"indexer_loss_coef"}

    def check(self, where: str, seq_len: int) -> None:
        super().check(where, seq_len)
        check_positive(where, self, ["q_lora_rank", "index_heads", "index_head_dim", "index_topk"])
        require(self.index_head_dim >= self.qk_rope_head_dim,
                f"{where}.index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
        require(self.indexer_loss_coef >= 0, f"{where}.indexer_loss_coef={self.indexer_loss_coef} must be >= 0")
        require(self.index_rope in INDEX_ROPES,
                f"{where}.index_rope='{self.index_rope}' must be one of {', '.join(INDEX_ROPES)}")

    def check_in_model(self, where: str, layer: int, specs: list[AttentionSpec], num_layers: int) -> None:
        """A share_topk layer is a decoder layer right after another dsa layer, whose picks it reuses."""
        if self.share_topk:
            require(0 < layer < num_layers and isinstance(specs[layer - 1], DSASpec),
                    f"{where}.share_topk=true (layer {layer}): the layer before it must be a dsa decoder layer, "
                    "whose picks it reuses")

    def index_key_bytes(self, fmt: str) -> float:
        """Cached indexer key bytes per token (none on a share_topk layer)."""
        return 0.0 if self.share_topk else index_entry_bytes(self.index_head_dim, fmt)

    def build(self, model: ModelConfig, layer_idx: int) -> DSAAttention:
        return DSAAttention(self, model, layer_idx)

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        return self.latent_dim() * ELEMENT_BYTES[fmt] + self.index_key_bytes(fmt)

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        return tokens * (self.latent_dim() * ELEMENT_BYTES[fmt] + self.index_key_bytes(index_fmt)), 0.0

    def flops_per_token(self, seq_len: int) -> float:
        """Latent-space MLA over the picks (per head, q.[c ; k_rot] and p.c), the indexer's forward-only scoring of
        every earlier token, and (with the loss) its rescoring of the picks with gradients."""
        picks = mean_over_positions(seq_len, lambda t: (t + 1).clamp(max=self.index_topk))
        index_key = 2 * self.index_heads * self.index_head_dim
        flops = 6 * self.num_heads * (self.latent_dim() + self.kv_lora_rank) * picks
        if self.share_topk:
            return flops
        flops += index_key * mean_over_positions(seq_len, lambda t: t + 1)
        return flops + (3 * index_key * picks if self.indexer_loss_coef > 0 else 0.0)


class TokenIndexer(LightningIndexer):
    """V3.2's indexer: one LayerNorm'd key per token; names follow transformers' ``DeepseekV32Indexer``."""

    def __init__(self, spec: DSASpec, hidden_size: int, backend: str) -> None:
        super().__init__(spec.q_lora_rank, hidden_size, spec.index_heads, spec.index_head_dim, spec.index_topk,
                         spec.query_chunk, backend)
        self.wk = nn.Linear(hidden_size, spec.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(spec.index_head_dim, eps=INDEX_NORM_EPS)
        self.interleave = spec.index_rope == "interleave"

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the leading 2 * cos.shape[-1] channels of x: half-split pairs (V3.2) or interleaved ones (GLM;
        transformers also moves them to evens-then-odds, for queries and keys alike, which leaves q.k as is)."""
        if not self.interleave:
            return rope_half_split(x, cos, sin)
        head, rest = x.split([2 * cos.shape[-1], x.shape[-1] - 2 * cos.shape[-1]], dim=-1)
        return torch.cat([apply_rope(head, cos, sin), rest], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """fp32 index keys [B,S,d_I] of x [B,S,D] (detached), rotated by cos/sin [S, rope/2]."""
        return self.rotate(self.k_norm(self.wk(x.detach())).float(), cos, sin)

    def queries(self, q_lat: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 rotated index queries [B,S,n_I,d_I] and head weights [B,S,n_I] (detached inputs)."""
        return self.rotate(self.raw_queries(q_lat), cos[:, None], sin[:, None]), self.head_weights(x)


class _SparseLatentAttention(torch.autograd.Function):
    """Flash-style over query chunks: the forward keeps only the output and each row's log-sum-exp; the backward
    regathers a chunk's picks, rebuilds its probabilities and adds the picks' gradients into one [B,T,d] buffer,
    so neither the gathered [S, k, d] rows nor per-chunk full-size gradients exist."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, latent: torch.Tensor, idx: torch.Tensor, scale: float, v_dim: int,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, H, _ = q.shape
        out = q.new_empty(B, S, H, v_dim)
        lse = q.new_empty(B, S, H, dtype=torch.float32)
        mass = q.new_empty(idx.shape, dtype=torch.float32)
        top = q.new_full((), float("-inf"), dtype=torch.float32)
        for s in range(0, S, chunk):
            picked, logits = _chunk_logits(q[:, s:s + chunk], latent, idx[:, s:s + chunk], scale)
            lse[:, s:s + chunk] = logits.logsumexp(dim=-1)
            probs = (logits - lse[:, s:s + chunk, :, None]).exp()  # [B,C,H,k]
            out[:, s:s + chunk] = torch.einsum("bchk,bckv->bchv", probs.to(latent.dtype), picked[..., :v_dim])
            mass[:, s:s + chunk] = probs.sum(dim=2)
            top = torch.maximum(top, logits.amax())
        ctx.save_for_backward(q, latent, idx, out, lse)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(mass, top)
        return out, mass, top

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: torch.Tensor, _d_mass: torch.Tensor,
                 _d_top: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, latent, idx, out, lse = ctx.saved_tensors
        v_dim = out.shape[-1]
        d_q = torch.empty_like(q)
        d_latent = torch.zeros(latent.shape, dtype=torch.float32, device=latent.device)
        delta = (d_out.float() * out.float()).sum(dim=-1)  # [B,S,H]: sum_j p_j dP_j, the softmax backward's term
        for s in range(0, q.shape[1], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            picked, logits = _chunk_logits(q[:, sl], latent, idx[:, sl], ctx.scale)  # [B,C,k,d], [B,C,H,k]
            probs = (logits - lse[:, sl, :, None]).exp()
            d_probs = torch.einsum("bchv,bckv->bchk", d_out[:, sl], picked[..., :v_dim]).float()
            d_logits = (probs * (d_probs - delta[:, sl, :, None]) * ctx.scale).to(q.dtype)  # [B,C,H,k]
            d_q[:, sl] = torch.einsum("bchk,bckd->bchd", d_logits, picked)
            d_picked = torch.einsum("bchk,bchd->bckd", d_logits, q[:, sl])  # [B,C,k,d]; 0 at -1 picks
            d_picked[..., :v_dim] += torch.einsum("bchk,bchv->bckv", probs.to(q.dtype), d_out[:, sl])
            add_gathered_grad(d_latent, idx[:, sl], d_picked)
        return d_q, d_latent.to(latent.dtype), None, None, None, None


def _chunk_logits(q: torch.Tensor, latent: torch.Tensor, idx: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's picked rows [B,C,k,d] (one per pick, shared by all heads) and fp32 logits [B,C,H,k] (-inf at -1)."""
    picked = gather_entries(latent, idx)
    logits = torch.einsum("bchd,bckd->bchk", q, picked).float() * scale
    return picked, logits.masked_fill_((idx < 0)[:, :, None], float("-inf"))


def sparse_attention(q: torch.Tensor, latent: torch.Tensor, idx: torch.Tensor, scale: float, v_dim: int,
                     query_chunk: int, stats: Optional[AttentionStats] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B,S,H,d] over the picked rows idx [B,S,k] (-1 = none; each row has one valid pick at least)
    of latent [B,T,d], the keys, whose first v_dim channels are the values (MQA) -> (out [B,S,H,v_dim], mass [B,S,k]
    fp32: each pick's probability summed over heads, no gradient), ``query_chunk`` queries at a time."""
    out, mass, top = _SparseLatentAttention.apply(q, latent, idx, scale, v_dim, query_chunk)
    if stats is not None:
        stats.add_max("max_logit", top)
    return out, mass


class DSAAttention(MLAAttention):
    def __init__(self, spec: DSASpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(spec, cfg, layer_idx)
        self.indexer = None if spec.share_topk else TokenIndexer(spec, cfg.hidden_size, cfg.attention.backend)
        self.indexer_loss_coef = spec.indexer_loss_coef

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> LatentCache:
        index_dim = 0 if self.indexer is None else self.indexer.head_dim
        return LatentCache(batch_size, self.spec.latent_dim(), index_dim, dtype=dtype, device=device)

    def attend(self, x: torch.Tensor, q: torch.Tensor, q_lat: Optional[torch.Tensor], latent: torch.Tensor,
               query_start: int, cos: torch.Tensor, sin: torch.Tensor,
               ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        assert q_lat is not None  # DSASpec.check: q_lora_rank > 0
        s = self.spec
        w_uk, w_uv = self.absorbed()  # [H, nope, r], [H, v, r]
        q_nope, q_rot = q.split([s.qk_nope_head_dim, s.qk_rope_head_dim], dim=-1)
        q_abs = torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk), q_rot], dim=-1)  # [B,S,H,r+rope]
        stats = ctx.stats_for(self.layer_idx)
        if self.indexer is None:  # share_topk: the previous layer's picks (check_in_model)
            o, _ = sparse_attention(q_abs, latent, ctx.shared[TOPK_KEY], self.scale, s.kv_lora_rank,
                                    s.query_chunk, stats)
            return torch.einsum("bshr,hvr->bshv", o, w_uv), x.new_zeros(())
        positions = torch.arange(query_start, query_start + x.shape[1], device=x.device)  # [S]
        keys = self.every_token(self.indexer.keys(x, cos, sin), ctx, query_start, LatentCache.extend_index)  # [B,T,d_I]
        q_i, w_i = self.indexer.queries(q_lat, x, cos, sin)  # [B,S,n_I,d_I], [B,S,n_I]
        idx, _ = self.indexer.select(q_i, w_i, keys, query_start, 1)  # [B,S,k] token positions, -1 = none
        ctx.shared[TOPK_KEY] = idx
        o, mass = sparse_attention(q_abs, latent, idx, self.scale, s.kv_lora_rank, s.query_chunk, stats)
        o = torch.einsum("bshr,hvr->bshv", o, w_uv)  # [B,S,H,v]
        if stats is not None:
            self.indexer.record_selection(stats, ctx.sequence, idx, positions, keys.shape[1], 1)
        if ctx.cache(self.layer_idx) is not None or self.indexer_loss_coef == 0:
            return o, x.new_zeros(())
        return o, self.indexer_loss_coef * self.indexer.kl_loss(ctx.sequence, q_i, w_i, keys, idx, mass)
