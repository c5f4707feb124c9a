"""DeepSeek-V4 attention backbone (MODEL_SPEC §2); by itself it is the SWA-only layer type.

Per layer: low-rank queries (wq_a -> q_norm -> wq_b, then an unweighted per-head RMS norm), one
shared KV head with K = V (wkv -> kv_norm), interleaved RoPE on the trailing ``rope_head_dim``
channels of q and kv, one softmax over the sliding window (+ compressed entries) + a per-head
sink, de-rotation of the output's RoPE channels by -position(query), and a grouped low-rank
output projection (wo_a block-diagonal over ``o_groups``, then wo_b). Parameter names follow the
official checkpoint.

Compressed layers (CSA/HCA) subclass ``SlidingWindowAttention``: they set ``compressed = True``
(which selects ``compress_rope_theta`` + YaRN), override ``compressed_entries`` to return a
``CompressedKV`` for the kernel (see ``kernels.py`` for the interface) plus a function that turns
the kernel's per-entry attention mass into their aux loss (CSA's indexer loss needs it), and
override ``make_cache`` if they keep more decode state than the window.

Statistics: while the trainer sets ``stats`` to an ``AttentionStats`` (log steps only), the kernel
adds its softmax masses and max logit to it; compressed layers add their own fields to the same
object in ``compressed_entries`` (it is None otherwise, and then nothing extra is computed).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig
from moesaic.model.norm import RMSNorm, rms_normalize
from moesaic.model.rope import RotaryEmbedding, rope_tail
from moesaic.model.sequence import WHOLE, WholeSequence

from .cache import SWACache
from .kernels import AttentionStats, CompressedKV, window_attention

AuxLoss = Callable[[Optional[torch.Tensor]], torch.Tensor]
"""A layer's aux loss given the kernel's head-summed mass on the selected entries [B,S,k] (or None);
``compressed_entries`` returns None instead when the layer has no aux loss."""


class SlidingWindowAttention(nn.Module):
    """V4 attention over the last ``window`` keys; forward(x [B,S,D], cache) -> (out [B,S,D], aux_loss)."""

    compressed = False  # CSA/HCA subclasses set True: compress_rope_theta with YaRN instead of rope_theta
    stats: Optional[AttentionStats] = None  # set by the trainer for the forwards it wants statistics of
    sequence: WholeSequence = WHOLE  # a shard of it under sequence parallelism (moesaic.model.sequence)

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        a = cfg.attention
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim, self.rope_dim = a.num_heads, a.head_dim, a.rope_head_dim
        self.o_groups, self.o_lora_rank = a.o_groups, a.o_lora_rank
        self.window, self.query_chunk = a.window, a.query_chunk
        self.eps = cfg.rms_norm_eps
        self.softmax_scale = 1.0 / math.sqrt(a.head_dim)

        self.wq_a = nn.Linear(cfg.hidden_size, a.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(a.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(a.q_lora_rank, a.num_heads * a.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, a.head_dim, bias=False)
        self.kv_norm = RMSNorm(a.head_dim, cfg.rms_norm_eps)
        # Official layout: wo_a.weight [g * d_g, H * c / g] holds g stacked block-diagonal blocks.
        self.wo_a = nn.Linear(a.num_heads * a.head_dim // a.o_groups, a.o_groups * a.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(a.o_groups * a.o_lora_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(a.num_heads, dtype=torch.float32))

        if self.compressed:
            self.rope = RotaryEmbedding(a.rope_head_dim, a.compress_rope_theta, a.yarn_factor,
                                        a.yarn_original_max_position, a.yarn_beta_fast, a.yarn_beta_slow)
        else:
            self.rope = RotaryEmbedding(a.rope_head_dim, a.rope_theta)

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> SWACache:
        """Empty decode state for this layer."""
        return SWACache(batch_size, self.window, self.head_dim, dtype=dtype, device=device)

    def compressed_entries(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                           cache: Optional[SWACache]) -> tuple[Optional[CompressedKV], Optional[AuxLoss]]:
        """Hook for CSA/HCA: extra entries for the kernel and their ``AuxLoss``; SWA has neither.

        x [B,S,D] is the normed layer input, qr [B,S,q_lora_rank] the query latent (indexer input),
        q [B,S,H,c] the rotated queries, positions [S] their absolute positions.
        """
        return None, None

    def window_keys(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [B,S,c] preceded by the window's keys on preceding shards (none on one device) -> [B, past + S, c]."""
        return torch.cat([self.sequence.preceding(kv, self.window - 1), kv], dim=1)

    def forward(self, x: torch.Tensor, cache: Optional[SWACache] = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        start = cache.pos if cache is not None else self.sequence.offset(S)
        positions = torch.arange(start, start + S, device=x.device)
        cos, sin = self.rope(positions)  # [S, rope_dim/2]

        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.num_heads, self.head_dim))  # [B,S,H,c]
        q = rope_tail(rms_normalize(q, self.eps), cos[:, None], sin[:, None], self.rope_dim)
        kv = rope_tail(self.kv_norm(self.wkv(x)), cos, sin, self.rope_dim)  # [B,S,c]

        extra, aux_loss = self.compressed_entries(x, qr, q, positions, cache)
        if cache is not None:
            keys = cache.extend(kv)  # [B, past + S, c]
        else:
            keys = self.window_keys(kv)
        o, mass = window_attention(q, keys, self.attn_sink, self.window, self.softmax_scale, self.query_chunk,
                                   extra, self.stats)
        o = rope_tail(o, cos[:, None], sin[:, None], self.rope_dim, inverse=True)  # [B,S,H,c]

        o = o.reshape(B, S, self.o_groups, -1)  # [B,S,g,H*c/g]
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)  # [g, d_g, H*c/g]
        o = torch.einsum("bsgd,grd->bsgr", o, wo_a)  # [B,S,g,d_g]
        return self.wo_b(o.flatten(2)), x.new_zeros(()) if aux_loss is None else aux_loss(mass)
