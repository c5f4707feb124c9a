"""DeepSeek-V4 attention backbone (MODEL_SPEC §2): the fields and the layer module SWA, CSA and HCA share.

Per layer: low-rank queries (wq_a -> q_norm -> wq_b, then an unweighted per-head RMS norm), one
shared KV head with K = V (wkv -> kv_norm), interleaved RoPE on the trailing ``rope_head_dim``
channels of q and kv, one softmax over the sliding window (+ compressed entries) + a per-head
sink, de-rotation of the output's RoPE channels by -position(query), and a grouped low-rank
output projection (wo_a block-diagonal over ``o_groups``, then wo_b). Parameter names follow the
official checkpoint.

``V4Spec`` holds the backbone's config fields and answers for them (validation, window KV bytes,
window FLOPs, HF names and config keys); the types' specs (swa.py, csa.py, hca.py) extend it.
Compressed layers (CSA/HCA) subclass ``V4Attention``: their rope follows their spec (compressed
rope_theta + YaRN), they override ``compressed_entries`` to return a ``CompressedKV`` for the
kernel (see ``kernels.py`` for the interface) plus a function that turns the kernel's per-entry
attention mass into their aux loss (CSA's indexer loss needs it), and override ``make_cache`` if
they keep more decode state than the window.

Statistics: on the forwards the trainer passes a ``StatsSink`` to (log steps only), the kernel adds
its softmax masses and max logit to the layer's ``AttentionStats``; compressed layers add their own
fields in ``compressed_entries`` (it is None otherwise, and then nothing extra is computed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from moesaic.model.norm import RMSNorm, rms_normalize
from moesaic.model.rope import RotaryEmbedding, rope_tail

from .base import AttentionLayer, AttentionSpec, HFReader, causal_keys, check_positive, require
from .cache import SWACache
from .context import ForwardContext
from .entries import CompressedKV
from .kernels import window_attention
from .kv_formats import main_entry_bytes
from .stats import AttentionStats

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig

AuxLoss = Callable[[Optional[torch.Tensor]], torch.Tensor]
"""A layer's aux loss given the kernel's head-summed mass on the selected entries [B,S,k] (or None);
``compressed_entries`` returns None instead when the layer has no aux loss."""


@dataclass
class V4Spec(AttentionSpec):
    """The V4 backbone's fields, shared by SWA, CSA and HCA entries."""

    num_heads: int = 4  # query heads H (all share one K=V head)
    head_dim: int = 64  # shared K=V head width c; the trailing rope_head_dim dims carry RoPE
    rope_head_dim: int = 16  # trailing channels of each head that carry RoPE
    q_lora_rank: int = 64  # query low-rank bottleneck d_c'
    o_groups: int = 2  # grouped low-rank output projection g
    o_lora_rank: int = 64  # per-group output rank d_g
    window: int = 32  # sliding-window keys per query, the query itself included
    rope_theta: float = 10000.0  # RoPE base
    query_chunk: int = 1024  # queries processed per chunk, bounds activation memory

    not_architecture = frozenset({"kind", "query_chunk"})
    hf_names = {"wq_a.weight": "q_a_proj.weight", "q_norm.weight": "q_a_norm.weight",
                "wq_b.weight": "q_b_proj.weight", "wkv.weight": "kv_proj.weight", "kv_norm.weight": "kv_norm.weight",
                "wo_a.weight": "o_a_proj.weight", "wo_b.weight": "o_b_proj.weight", "attn_sink": "sinks"}

    def check(self, where: str, seq_len: int) -> None:
        check_positive(where, self, ["num_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window",
                                     "query_chunk", "rope_theta"])
        require(self.rope_head_dim % 2 == 0 and 0 < self.rope_head_dim <= self.head_dim,
                f"{where}.rope_head_dim={self.rope_head_dim} must be even and in (0, head_dim={self.head_dim}]")
        require(self.num_heads % self.o_groups == 0,
                f"{where}.o_groups={self.o_groups} must divide {where}.num_heads={self.num_heads}")

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        return min(self.window, tokens) * self.dense_kv_bytes_per_token(fmt), 0.0

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        return main_entry_bytes(self.head_dim, self.rope_head_dim, fmt)

    def flops_per_token(self, seq_len: int) -> float:
        """Score and value products over the keys each query really sees (window, plus ``extra_keys``)."""
        per_key = 12 * self.num_heads * self.head_dim  # q.k and p.v: 2*c each, fwd + 2x for bwd, per head
        keys = causal_keys(seq_len, self.window)
        return per_key * (keys + self.extra_keys(seq_len)) + self.extra_flops(seq_len)

    def extra_keys(self, seq_len: int) -> float:
        """Mean compressed entries a query attends to besides its window (none for the backbone alone)."""
        return 0.0

    def extra_flops(self, seq_len: int) -> float:
        """FLOPs per token outside the attention products (CSA: the indexer)."""
        return 0.0

    def sp_alignment(self, where: str) -> int:
        return 1  # window keys before a shard come from the preceding shards (``sequence.preceding``)

    def to_hf(self, where: str) -> dict[str, Any]:
        partial = self.rope_head_dim / self.head_dim
        require(int(self.head_dim * partial) == self.rope_head_dim,
                f"{where}.rope_head_dim={self.rope_head_dim} is not representable as a partial_rotary_factor "
                f"of head_dim={self.head_dim}")
        return {"num_attention_heads": self.num_heads, "num_key_value_heads": 1, "head_dim": self.head_dim,
                "qk_rope_head_dim": self.rope_head_dim, "partial_rotary_factor": partial,
                "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
                "sliding_window": self.window}

    @classmethod
    def backbone_from_hf(cls, hf: HFReader) -> dict[str, Any]:
        """The backbone's fields from config.json, for the types' ``from_hf``."""
        return {"num_heads": int(hf.get("num_attention_heads")), "head_dim": int(hf.get("head_dim")),
                "rope_head_dim": hf.rope["rope_head_dim"], "q_lora_rank": int(hf.get("q_lora_rank")),
                "o_groups": int(hf.get("o_groups")), "o_lora_rank": int(hf.get("o_lora_rank")),
                "window": int(hf.get("sliding_window"))}


class V4Attention(AttentionLayer):
    """V4 attention over the last ``window`` keys; the SWA layer as it is, the base of CSA and HCA."""

    def __init__(self, spec: V4Spec, cfg: ModelConfig, layer_idx: int, rope: Optional[RotaryEmbedding] = None) -> None:
        super().__init__(layer_idx)
        self.num_heads, self.head_dim, self.rope_dim = spec.num_heads, spec.head_dim, spec.rope_head_dim
        self.o_groups, self.o_lora_rank = spec.o_groups, spec.o_lora_rank
        self.window, self.query_chunk = spec.window, spec.query_chunk
        self.backend = cfg.attention.backend
        self.eps = cfg.rms_norm_eps
        self.softmax_scale = 1.0 / math.sqrt(spec.head_dim)

        self.wq_a = nn.Linear(cfg.hidden_size, spec.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(spec.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(spec.q_lora_rank, spec.num_heads * spec.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, spec.head_dim, bias=False)
        self.kv_norm = RMSNorm(spec.head_dim, cfg.rms_norm_eps)
        # Official layout: wo_a.weight [g * d_g, H * c / g] holds g stacked block-diagonal blocks.
        self.wo_a = nn.Linear(spec.num_heads * spec.head_dim // spec.o_groups, spec.o_groups * spec.o_lora_rank,
                              bias=False)
        self.wo_b = nn.Linear(spec.o_groups * spec.o_lora_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(spec.num_heads, dtype=torch.float32))
        self.rope = rope if rope is not None else RotaryEmbedding(spec.rope_head_dim, spec.rope_theta)

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> SWACache:
        """Empty decode state for this layer."""
        return SWACache(batch_size, self.window, self.head_dim, dtype=dtype, device=device)

    def compressed_entries(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                           cache: Optional[SWACache], ctx: ForwardContext,
                           stats: Optional[AttentionStats]) -> tuple[Optional[CompressedKV], Optional[AuxLoss]]:
        """Hook for CSA/HCA: extra entries for the kernel and their ``AuxLoss``; SWA has neither.

        x [B,S,D] is the normed layer input, qr [B,S,q_lora_rank] the query latent (indexer input),
        q [B,S,H,c] the rotated queries, positions [S] their absolute positions.
        """
        return None, None

    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = ctx if ctx is not None else ForwardContext()  # a layer on its own: the whole sequence, no cache
        B, S, _ = x.shape
        cache = ctx.cache(self.layer_idx)
        positions = ctx.positions(S, x.device, cache)
        cos, sin = self.rope(positions)  # [S, rope_dim/2]
        stats = ctx.stats_for(self.layer_idx)

        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.num_heads, self.head_dim))  # [B,S,H,c]
        q = rope_tail(rms_normalize(q, self.eps), cos[:, None], sin[:, None], self.rope_dim)
        kv = rope_tail(self.kv_norm(self.wkv(x)), cos, sin, self.rope_dim)  # [B,S,c]

        extra, aux_loss = self.compressed_entries(x, qr, q, positions, cache, ctx, stats)
        if cache is not None:
            keys = cache.extend(kv)  # [B, past + S, c]
        else:  # kv preceded by the window's keys on preceding shards (none on one device)
            keys = torch.cat([ctx.sequence.preceding(kv, self.window - 1), kv], dim=1)  # [B, past + S, c]
        o, mass = window_attention(q, keys, self.attn_sink, self.window, self.softmax_scale, self.query_chunk,
                                   extra, stats, self.backend)
        o = rope_tail(o, cos[:, None], sin[:, None], self.rope_dim, inverse=True)  # [B,S,H,c]

        o = o.reshape(B, S, self.o_groups, -1)  # [B,S,g,H*c/g]
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)  # [g, d_g, H*c/g]
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a)  # [B,S,g,d_g]
        return self.wo_b(o.flatten(2)), x.new_zeros(()) if aux_loss is None else aux_loss(mass)
