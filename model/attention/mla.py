"""MLA: DeepSeek-V3's multi-head latent attention (MOSAIC_SPEC §4.2, §5).

Queries come from a low-rank latent (``q_a_proj``, weighted RMSNorm, ``q_b_proj``); keys and values
from one per-token latent c (``kv_a_proj_with_mqa``, RMSNorm, ``kv_b_proj`` expanding it to every
head's no-RoPE key and value) plus one RoPE key shared by all heads. So a token's cache is the
normed latent and its rotated RoPE key, kv_lora_rank + qk_rope_head_dim values, whatever the head
count: that is what ``LatentCache`` stores, and the heads' keys and values are re-expanded from it
(not absorbed into q/o: the cache bytes are the latent's either way, and expansion keeps the exact
training-time arithmetic for the prefill + decode == full forward check).

Per head q = [q_nope ; q_rot] and k = [k_nope ; k_rot] are qk_nope + qk_rope wide and v is
v_head_dim wide; RoPE is interleaved (pairs 2i, 2i+1) on the trailing qk_rope channels, which is
transformers' ``apply_rotary_pos_emb_interleave`` up to a permutation applied to q and k alike. YaRN
follows transformers' V3 rules: the interpolated frequencies, cos/sin times the attention factor
mscale(f, yarn_mscale) / mscale(f, yarn_mscale_all_dim) (or mscale(f) without both), and the
softmax scale (nope + rope)^-1/2 times mscale(f, yarn_mscale_all_dim)^2.

Training attends with torch's fused kernel over query chunks as gqa does (no [S, S] tensor, only the
log-sum-exp kept for backward), V zero-padded to the q/k width since the fused CPU kernels need one
width. Under sequence parallelism a shard gathers the latents of every earlier shard (not the
expanded keys: H * (nope + v) values per token would be exchanged instead of the latent's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs import ConfigError
from moesaic.model.norm import RMSNorm
from moesaic.model.rope import RotaryEmbedding, apply_rope

from .base import AttentionLayer, AttentionSpec, HFReader, check_positive, mean_over_positions, register, require
from .cache import tensor_bytes
from .context import ForwardContext
from .gqa import ELEMENT_BYTES, gqa_attention, record_stats

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig

LATENT_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm ignore rms_norm_eps (MOSAIC_SPEC §4.1)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """transformers' ``yarn_get_mscale``: 0.1 * mscale * ln(factor) + 1 for factor > 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@register
@dataclass
class MLASpec(AttentionSpec):
    kind: str = "mla"
    num_heads: int = 4  # query heads H (every head has its own expanded key and value)
    q_lora_rank: int = 24  # query latent width; 0 = one q_proj straight from the input (no latent)
    kv_lora_rank: int = 32  # per-token KV latent width (cached)
    qk_nope_head_dim: int = 16  # per-head key/query channels without RoPE (expanded from the latent)
    qk_rope_head_dim: int = 8  # per-head query / shared key channels with RoPE (the key part is cached)
    v_head_dim: int = 16  # per-head value width
    rope_theta: float = 10000.0  # RoPE base
    yarn_factor: float = 1.0  # 1.0 disables YaRN (V3: 40)
    yarn_original_max_position: int = 4096  # YaRN: context the RoPE base was trained for
    yarn_beta_fast: float = 32.0  # YaRN: rotations above which frequencies are kept
    yarn_beta_slow: float = 1.0  # YaRN: rotations below which frequencies are interpolated
    yarn_mscale: float = 0.0  # YaRN mscale (0 = unset, as transformers reads a missing key)
    yarn_mscale_all_dim: float = 0.0  # YaRN mscale_all_dim: softmax scale x mscale(f, this)^2 (0 = unset)
    query_chunk: int = 512  # queries per kernel call

    not_architecture = frozenset({"kind", "query_chunk"})

    def check(self, where: str, seq_len: int) -> None:
        check_positive(where, self, ["num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                     "v_head_dim", "rope_theta", "query_chunk"])
        require(self.q_lora_rank >= 0, f"{where}.q_lora_rank={self.q_lora_rank} must be >= 0 (0 = no query latent)")
        require(self.qk_rope_head_dim % 2 == 0, f"{where}.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        require(self.yarn_factor >= 1.0, f"{where}.yarn_factor={self.yarn_factor} must be >= 1 (1 disables YaRN)")
        require(self.yarn_mscale >= 0 and self.yarn_mscale_all_dim >= 0,
                f"{where}.yarn_mscale / yarn_mscale_all_dim must be >= 0 (0 = unset)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def latent_dim(self) -> int:
        """Cached values per token: the KV latent and the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def rope_attention_factor(self) -> float:
        """YaRN's multiplier of cos/sin (transformers' ``attention_factor``)."""
        if self.yarn_factor <= 1:
            return 1.0
        if self.yarn_mscale and self.yarn_mscale_all_dim:
            return yarn_mscale(self.yarn_factor, self.yarn_mscale) / yarn_mscale(self.yarn_factor,
                                                                               self.yarn_mscale_all_dim)
        return yarn_mscale(self.yarn_factor)

    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.yarn_factor > 1 and self.yarn_mscale_all_dim:
            scale *= yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim) ** 2
        return scale

    def rope(self) -> RotaryEmbedding:
        return RotaryEmbedding(self.qk_rope_head_dim, self.rope_theta, self.yarn_factor,
                               self.yarn_original_max_position, self.yarn_beta_fast, self.yarn_beta_slow)

    def build(self, model: ModelConfig, layer_idx: int) -> MLAAttention:
        return MLAAttention(self, model, layer_idx)

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        return self.latent_dim() * ELEMENT_BYTES[fmt]

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        return tokens * self.dense_kv_bytes_per_token(fmt), 0.0

    def flops_per_token(self, seq_len: int) -> float:
        """q.k (qk width) and p.v (v width) per head over every earlier key, forward + 2x backward."""
        return 6 * self.num_heads * (self.qk_head_dim + self.v_head_dim) * mean_over_positions(seq_len, lambda t: t + 1)

    def sp_alignment(self, where: str) -> int:
        return 1  # a shard gathers every earlier shard's latents

    def to_hf(self, where: str) -> dict[str, Any]:
        raise ConfigError(f"{where}: kind {self.kind} has no transformers DeepSeek-V4 layer type")

    @classmethod
    def from_hf(cls, hf: HFReader) -> MLASpec:
        raise ConfigError(f"{hf.source}: a DeepSeek-V4 config.json has no {cls.kind} layers")


class LatentCache:
    """Decode state of an MLA layer: per token the normed KV latent and rotated RoPE key [B, T, r + rope]
    (and for DSA the indexer key [B, T, c_I])."""

    def __init__(self, batch_size: int, latent_dim: int, index_dim: int = 0, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.latent = torch.zeros(batch_size, 0, latent_dim, dtype=dtype, device=device)
        self.index_keys = torch.zeros(batch_size, 0, index_dim, dtype=torch.float32, device=device)
        self.pos = 0  # absolute position of the next token

    def extend(self, latent: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' latents [B,S,r+rope]; return every token's so far."""
        self.latent = torch.cat([self.latent, latent.detach().to(self.latent.dtype)], dim=1)
        self.pos += latent.shape[1]
        return self.latent

    def extend_index(self, keys: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' indexer keys [B,S,c_I]; return every token's so far."""
        self.index_keys = torch.cat([self.index_keys, keys.detach().float()], dim=1)
        return self.index_keys

    def kv_bytes(self) -> int:
        return tensor_bytes(self.latent) + tensor_bytes(self.index_keys)

    def state_bytes(self) -> int:
        return 0

    def nbytes(self) -> int:
        return self.kv_bytes()


class MLAAttention(AttentionLayer):
    """Tensor names are transformers' (``q_a_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ...)."""

    def __init__(self, spec: MLASpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(layer_idx)
        self.spec = spec
        H, D, r = spec.num_heads, cfg.hidden_size, spec.kv_lora_rank
        if spec.q_lora_rank:
            self.q_a_proj = nn.Linear(D, spec.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, H * spec.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * spec.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, spec.latent_dim(), bias=False)
        self.kv_a_layernorm = RMSNorm(r, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(r, H * (spec.qk_nope_head_dim + spec.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * spec.v_head_dim, D, bias=False)
        self.rope = spec.rope()
        self.rope_factor = spec.rope_attention_factor()
        self.scale = spec.softmax_scale()

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> LatentCache:
        return LatentCache(batch_size, self.spec.latent_dim(), dtype=dtype, device=device)

    def rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [S, rope/2] at positions [S], times YaRN's attention factor."""
        cos, sin = self.rope(positions)
        return cos * self.rope_factor, sin * self.rope_factor

    def queries(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rotated queries [B,S,H,nope+rope] and the query latent [B,S,q_lora_rank] (None without one)."""
        q_lat = self.q_a_layernorm(self.q_a_proj(x)) if self.spec.q_lora_rank else None
        q = (self.q_b_proj(q_lat) if q_lat is not None else self.q_proj(x)).unflatten(-1, (self.spec.num_heads, -1))
        nope, rot = q.split([self.spec.qk_nope_head_dim, self.spec.qk_rope_head_dim], dim=-1)
        return torch.cat([nope, apply_rope(rot, cos[:, None], sin[:, None])], dim=-1), q_lat

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Per token [normed latent ; rotated RoPE key] [B,S,r+rope]: what the cache stores."""
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.spec.kv_lora_rank, self.spec.qk_rope_head_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c), apply_rope(k_rot, cos, sin)], dim=-1)

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's key and value halves per head: W_uk [H, nope, r] and W_uv [H, v, r] (k_nope = W_uk c,
        v = W_uv c), for attention in the latent space."""
        s = self.spec
        w = self.kv_b_proj.weight.view(s.num_heads, s.qk_nope_head_dim + s.v_head_dim, s.kv_lora_rank)
        return w.split([s.qk_nope_head_dim, s.v_head_dim], dim=1)

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B,T,r+rope] -> per-head keys [B,T,H,nope+rope] and values [B,T,H,v]."""
        s = self.spec
        c, k_rot = latent.split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c).unflatten(-1, (s.num_heads, -1)).split([s.qk_nope_head_dim, s.v_head_dim], -1)
        k = torch.cat([k_nope, k_rot[:, :, None].expand(-1, -1, s.num_heads, -1)], dim=-1)
        return k, v

    def every_token(self, new: torch.Tensor, ctx: ForwardContext, query_start: int,
                    extend: Callable[[LatentCache, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Per-token rows [B,S,...] of the local tokens -> those of every token from position 0 to the last local
        one: after the cached past (``extend`` appends to the cache), or earlier shards' under SP."""
        cache = ctx.cache(self.layer_idx)
        if cache is not None:
            return extend(cache, new)
        if ctx.sequence.shards > 1:
            return ctx.sequence.gather(new)[:, :query_start + new.shape[1]]
        return new

    def attend(self, x: torch.Tensor, q: torch.Tensor, q_lat: Optional[torch.Tensor], latent: torch.Tensor,
               query_start: int, cos: torch.Tensor, sin: torch.Tensor,
               ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(o [B,S,H,v], aux loss) of queries q at positions query_start.. over every token from position 0
        (their latents [B,T,r+rope])."""
        k, v = self.expand(latent)  # [B,T,H,nope+rope], [B,T,H,v]
        width = max(q.shape[-1], v.shape[-1])  # one width for the fused kernels: zero channels add nothing
        q_, k_, v_ = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        o = gqa_attention(q_, k_, v_, query_start, 0, 0, self.scale, self.spec.query_chunk)[..., :v.shape[-1]]
        stats = ctx.stats_for(self.layer_idx)
        if stats is not None:
            record_stats(stats, q, k, query_start, 0, 0, self.scale, self.spec.query_chunk)
        return o, x.new_zeros(())

    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = ctx if ctx is not None else ForwardContext()
        cache = ctx.cache(self.layer_idx)
        query_start = cache.pos if cache is not None else ctx.sequence.offset(x.shape[1])
        cos, sin = self.rotation(torch.arange(query_start, query_start + x.shape[1], device=x.device))  # [S, rope/2]
        q, q_lat = self.queries(x, cos, sin)  # [B,S,H,nope+rope]
        latent = self.every_token(self.latents(x, cos, sin), ctx, query_start, LatentCache.extend)  # [B,T,r+rope]
        o, aux = self.attend(x, q, q_lat, latent, query_start, cos, sin, ctx)
        return self.o_proj(o.flatten(2)), aux
