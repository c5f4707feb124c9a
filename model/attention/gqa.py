"""GQA: grouped-query attention over separate K and V heads, global or sliding, with optional KV sharing.

The baseline every other design is measured against (Qwen3-MoE: per-head q/k RMS norms, half-split
RoPE, scale head_dim^-1/2), and with its options Gemma 4's two layer kinds (MOSAIC_SPEC §1.3):
scale 1.0, a weight-free v norm, ``k_eq_v`` (V from the raw K projection) and proportional RoPE
on global layers; and Laguna's (§2.2): a softplus output ``gate`` per head or per element, read
from the layer input and applied to each head's output before ``o_proj`` (a learned per-head
"budget" that can switch heads off), partial RoPE and YaRN, whose attention factor scales the
rotated channels of q and k only. Every menu entry has its own ``num_heads``, so layers of one
model may differ in query heads while sharing one KV shape (Laguna's per-layer head counts).
Query head h reads KV head h // (num_heads / num_kv_heads) (transformers'
``repeat_kv``). Tensor names are transformers' (``q_proj``, ``k_norm``, ``g_proj``, ...).

Cross-layer KV sharing (``kv_source``): a layer may read the K/V of an earlier layer instead of
computing its own (Gemma 4's last layers). Every own-KV layer leaves its K/V (after norm and RoPE,
after the decode cache or the sequence-parallel exchange) in the forward context; a sharing layer
reads them there, so gradients reach the source from every consumer, a shared layer holds no cache
and no K/V weights, and under SP the exchanged keys are reused, not fetched again.

The kernel runs torch's fused scaled-dot-product attention over query chunks, each against only
the keys its queries can see, with a [chunk, keys] mask: no [S, S] tensor, and the fused kernels
keep only the log-sum-exp for backward. The mask is a strided view of one row (the chunk's queries
run in reverse order, so visibility depends on row + column), so what backward keeps per chunk is
O(chunk + keys), not a [chunk, keys] tensor: memory is linear in S for sliding and global layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs import ConfigError
from moesaic.model.norm import RMSNorm, rms_normalize
from moesaic.model.rope import RotaryEmbedding, half_split_inv_freq, rope_half_split

from .base import (AttentionLayer, AttentionSpec, HFReader, causal_keys, check_positive, register,
                   require)
from .cache import tensor_bytes
from .context import ForwardContext
from .stats import AttentionStats

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig

ROPE_TYPES = ("default", "proportional")
GATES = ("none", "head", "element")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


@register
@dataclass
class GQASpec(AttentionSpec):
    kind: str = "gqa"
    num_heads: int = 4  # query heads H
    num_kv_heads: int = 2  # key/value heads; divides num_heads
    head_dim: int = 32  # width of every q, k and v head
    window: int = 0  # keys per query, the query itself included; 0 = all earlier keys (global)
    qk_norm: bool = True  # weighted per-head RMS norm of q and k before RoPE (Qwen3, Gemma 4)
    v_norm: bool = False  # weight-free per-head RMS norm of v (Gemma 4)
    k_eq_v: bool = False  # no v_proj: V is the raw K projection (v-normed, no RoPE; Gemma 4 global layers)
    scale: float = 0.0  # logit scale; 0 = head_dim^-1/2 (Gemma 4: 1.0)
    rope_theta: float = 10000.0  # RoPE base
    rope_fraction: float = 1.0  # share of each head's channels carrying RoPE (partial rotary factor)
    rope_type: str = "default"  # default | proportional (whole head, zero frequencies past the fraction; Gemma 4)
    kv_source: int = -1  # -1: own K/V; else an earlier decoder layer whose K/V this layer reads
    gate: str = "none"  # softplus output gate from the layer input (Laguna): none | head | element
    yarn_factor: float = 1.0  # YaRN context extension of the rotary frequencies; 1.0 disables it
    yarn_original_max_position: int = 4096  # YaRN: context the RoPE base was trained for
    yarn_beta_fast: float = 32.0  # YaRN: rotations above which frequencies are kept
    yarn_beta_slow: float = 1.0  # YaRN: rotations below which frequencies are interpolated
    yarn_attention_factor: float = 0.0  # YaRN: multiplier of the rotated q/k channels; 0 = 0.1 ln(factor) + 1
    query_chunk: int = 512  # queries per kernel call, bounds the [chunk, keys] mask and scores

    not_architecture = frozenset({"kind", "query_chunk"})

    @property
    def shares_kv(self) -> bool:
        return self.kv_source >= 0

    def check(self, where: str, seq_len: int) -> None:
        check_positive(where, self, ["num_heads", "num_kv_heads", "head_dim", "query_chunk", "rope_theta"])
        require(self.num_heads % self.num_kv_heads == 0,
                f"{where}.num_kv_heads={self.num_kv_heads} must divide {where}.num_heads={self.num_heads}")
        require(self.window >= 0, f"{where}.window={self.window} must be >= 0 (0 = global)")
        require(self.scale >= 0, f"{where}.scale={self.scale} must be >= 0 (0 = head_dim^-1/2)")
        require(self.rope_type in ROPE_TYPES, f"{where}.rope_type='{self.rope_type}' must be one of "
                                              f"{', '.join(ROPE_TYPES)}")
        require(0 < self.rope_fraction <= 1 and self.rotary_dim() % 2 == 0,
                f"{where}.rope_fraction={self.rope_fraction} must be in (0, 1] and give an even number of "
                f"rotary channels of head_dim={self.head_dim}")
        require(self.kv_source >= -1, f"{where}.kv_source={self.kv_source} must be -1 (own K/V) or a layer index")
        require(self.gate in GATES, f"{where}.gate='{self.gate}' must be one of {', '.join(GATES)}")
        require(self.yarn_factor >= 1.0, f"{where}.yarn_factor={self.yarn_factor} must be >= 1 (1 disables YaRN)")
        require(self.yarn_factor == 1.0 or self.rope_type == "default",
                f"{where}.yarn_factor={self.yarn_factor} needs rope_type='default' (not '{self.rope_type}')")
        check_positive(where, self, ["yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow"])
        require(self.yarn_attention_factor >= 0,
                f"{where}.yarn_attention_factor={self.yarn_attention_factor} must be >= 0 (0 = 0.1 ln(factor) + 1)")

    def check_in_model(self, where: str, layer: int, specs: list[AttentionSpec], num_layers: int) -> None:
        """A sharing layer reads an earlier own-KV gqa decoder layer whose keys it can use unchanged."""
        if not self.shares_kv:
            return
        src = self.kv_source
        require(layer < num_layers, f"{where}.kv_source={src}: MTP blocks cannot share a decoder layer's K/V")
        require(src < layer, f"{where}.kv_source={src} must be an earlier layer than layer {layer} that uses it")
        source = specs[src]
        require(isinstance(source, GQASpec) and not source.shares_kv,
                f"{where}.kv_source={src}: layer {src} must compute its own K/V with a gqa entry")
        assert isinstance(source, GQASpec)
        mine, theirs = self.architecture(), source.architecture()
        for name in ("num_kv_heads", "head_dim", "rope_theta", "rope_fraction", "rope_type", "yarn_factor",
                     "yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow", "yarn_attention_factor"):
            require(mine.get(name) == theirs.get(name),
                    f"{where}.{name}={getattr(self, name)} differs from layer {src}'s ({getattr(source, name)}), "
                    f"whose K/V it reads (kv_source={src})")
        require(source.window == 0 or 0 < self.window <= source.window,
                f"{where}.window={self.window} sees keys that layer {src} (window={source.window}) does not keep")

    def architecture(self) -> dict[str, Any]:
        """YaRN by its effective attention factor (0 = derived, or the same value spelled out, are one model);
        its fields are left out where YaRN is off."""
        out = super().architecture()
        out["yarn_attention_factor"] = self.rope_scaling()
        if self.yarn_factor == 1.0:
            for name in ("yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow"):
                del out[name]
        return out

    def own_kv(self) -> GQASpec:
        return dataclasses.replace(self, kv_source=-1)

    def rotary_dim(self) -> int:
        """Channels of a head that RoPE rotates."""
        return self.head_dim if self.rope_type == "proportional" else int(self.head_dim * self.rope_fraction)

    def rope_scaling(self) -> float:
        """The multiplier of cos and sin (transformers' ``attention_scaling``): YaRN's attention factor, else 1."""
        if self.yarn_factor == 1.0:
            return 1.0
        return self.yarn_attention_factor or 0.1 * math.log(self.yarn_factor) + 1.0

    def rotary(self) -> RotaryEmbedding:
        inv_freq = half_split_inv_freq(self.head_dim, self.rope_theta, self.rope_fraction,
                                       self.rope_type == "proportional")
        return RotaryEmbedding(2 * inv_freq.numel(), self.rope_theta, self.yarn_factor, self.yarn_original_max_position,
                               self.yarn_beta_fast, self.yarn_beta_slow, inv_freq=inv_freq)

    def gate_width(self) -> int:
        """Outputs of ``g_proj`` per token: one gate per head or per head channel (0: no gate)."""
        return {"none": 0, "head": self.num_heads, "element": self.num_heads * self.head_dim}[self.gate]

    def softmax_scale(self) -> float:
        return self.scale if self.scale > 0 else 1.0 / math.sqrt(self.head_dim)

    def build(self, model: ModelConfig, layer_idx: int) -> GQAAttention:
        return GQAAttention(self, model, layer_idx)

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        """One K and one V vector per KV head; a sharing layer stores nothing."""
        return 0.0 if self.shares_kv else 2 * self.num_kv_heads * self.head_dim * ELEMENT_BYTES[fmt]

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        kept = min(self.window, tokens) if self.window else tokens
        return kept * self.dense_kv_bytes_per_token(fmt), 0.0

    def flops_per_token(self, seq_len: int) -> float:
        """q.k and p.v over the keys each query sees: 2 x head_dim each, per head, forward + 2x backward."""
        keys = causal_keys(seq_len, self.window)
        return 12 * self.num_heads * self.head_dim * keys

    def sp_alignment(self, where: str) -> int:
        return 1  # keys of earlier shards are exchanged (window tails, or all of them for global layers)

    def to_hf(self, where: str) -> dict[str, Any]:
        raise ConfigError(f"{where}: kind gqa has no transformers DeepSeek-V4 layer type")

    @classmethod
    def from_hf(cls, hf: HFReader) -> GQASpec:
        raise ConfigError(f"{hf.source}: a DeepSeek-V4 config.json has no gqa layers")


class SharedKV(NamedTuple):
    """What an own-KV layer leaves in the forward context for the layers that share its K/V."""

    k: torch.Tensor  # [B, T, n_kv, hd] keys after norm and RoPE
    v: torch.Tensor  # [B, T, n_kv, hd]
    key_start: int  # absolute position of k[:, 0]
    query_start: int  # absolute position of the first local query (this forward's tokens)


def shared_kv_key(layer_idx: int) -> str:
    return f"gqa.kv.{layer_idx}"


class GQACache:
    """Decode state of an own-KV layer: K and V [B, T, n_kv, hd] of the last ``window`` tokens (all if 0)."""

    def __init__(self, batch_size: int, window: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.k = torch.zeros(batch_size, 0, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.window = window
        self.pos = 0  # absolute position of the next token

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append the new tokens' k, v [B,S,n_kv,hd]; return [past ; new] keys and values, and the position of
        the first key."""
        key_start = self.pos - self.k.shape[1]
        keys, values = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        keep = min(self.window, keys.shape[1]) if self.window else keys.shape[1]
        self.k, self.v = keys[:, -keep:].detach(), values[:, -keep:].detach()
        self.pos += k.shape[1]
        return keys, values, key_start

    def kv_bytes(self) -> int:
        """Bytes of the cached vectors: min(window, tokens seen) K and V rows."""
        return tensor_bytes(self.k) + tensor_bytes(self.v)

    def state_bytes(self) -> int:
        return 0

    def nbytes(self) -> int:
        return self.kv_bytes()


def _visible(query_start: int, queries: int, key_start: int, keys: int, window: int,
             device: torch.device) -> Optional[torch.Tensor]:
    """[queries, keys] bool mask (True = attend) of causal (and windowed) visibility; None when all visible."""
    last_q, last_k = query_start + queries - 1, key_start + keys - 1
    if last_k <= query_start and (not window or key_start > last_q - window):
        return None
    qpos = torch.arange(query_start, query_start + queries, device=device).unsqueeze(-1)  # [Q, 1]
    kpos = torch.arange(key_start, key_start + keys, device=device)  # [K]
    mask = kpos <= qpos
    return mask & (kpos > qpos - window) if window else mask


def visible_kv(k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: Optional[GQACache], window: int,
               query_start: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The local tokens' k, v [B,S,n_kv,hd] extended by every earlier key the local queries may see: the cached
    past, or the preceding shards' (window tails, or all of them for a global layer) under SP. Returns keys,
    values and the absolute position of the first key."""
    if cache is not None:
        return cache.extend(k, v)
    if ctx.sequence.shards == 1:
        return k, v, query_start
    kv = torch.stack([k, v], dim=2)  # [B,S,2,n_kv,hd]: one exchange for both
    if window:
        kv = torch.cat([ctx.sequence.preceding(kv, window - 1), kv], dim=1)
        key_start = query_start + k.shape[1] - kv.shape[1]
    else:  # a global layer needs every earlier key: all shards', up to this one's end
        kv, key_start = ctx.sequence.gather(kv)[:, :query_start + k.shape[1]], 0
    k, v = kv.unbind(dim=2)
    return k, v, key_start


class _Chunk(NamedTuple):
    queries: slice  # of the local queries
    keys: slice  # of the keys, the ones these queries can see
    mask: Optional[torch.Tensor]  # [queries, keys] bool (True = attend); None when all are visible


def _chunks(queries: int, keys: int, query_start: int, key_start: int, window: int, query_chunk: int,
            device: torch.device) -> list[_Chunk]:
    """Query i sits at position query_start + i, key j at key_start + j; chunks of query_chunk queries."""
    out = []
    for lo in range(0, queries, query_chunk):
        hi = min(queries, lo + query_chunk)
        first = max(0, query_start + lo - window + 1 - key_start) if window else 0  # first visible key
        last = min(keys, query_start + hi - key_start)  # one past the last visible key
        mask = _visible(query_start + lo, hi - lo, key_start + first, last - first, window, device)
        out.append(_Chunk(slice(lo, hi), slice(first, last), mask))
    return out


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start: int, key_start: int,
                  window: int, scale: float, query_chunk: int) -> torch.Tensor:
    """Causal (windowed when window > 0) attention of q [B,S,H,hd] over k, v [B,T,n_kv,hd] -> [B,S,H,hd].

    Each chunk of queries is scored only against the keys it can see (``_chunks``).
    """
    outs = []
    for qs, ks, mask in _chunks(q.shape[1], k.shape[1], query_start, key_start, window, query_chunk, q.device):
        queries, flip = q[:, qs], mask is not None
        if flip:  # rows reversed: visibility is a function of row + column, a [queries + keys] buffer's strided view
            queries, mask = queries.flip(1), _reversed_mask(query_start + qs.stop - 1 - (key_start + ks.start),
                                                            qs.stop - qs.start, ks.stop - ks.start, window, q)
        o = F.scaled_dot_product_attention(
            queries.transpose(1, 2), k[:, ks].transpose(1, 2), v[:, ks].transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)  # [B,chunk,H,hd]
        outs.append(o.flip(1) if flip else o)
    return torch.cat(outs, dim=1)


def _reversed_mask(last: int, queries: int, keys: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """Additive [queries, keys] mask of a chunk whose query rows come in reverse order, ``last`` = the position of
    its last query minus that of its first key. Row i' (query at first-key offset last - i') sees key j iff
    i' + j <= last (and > last - window), so the mask is a stride-(1, 1) view of one [queries + keys - 1] row:
    the fused kernel keeps that view for backward, not a [queries, keys] tensor per chunk."""
    row = like.new_full((queries + keys - 1,), float("-inf"))
    row[max(0, last - window + 1) if window else 0:last + 1] = 0
    return row.as_strided((queries, keys), (1, 1))


@torch.no_grad()
def record_stats(stats: AttentionStats, q: torch.Tensor, k: torch.Tensor, query_start: int, key_start: int,
                 window: int, scale: float, query_chunk: int) -> None:
    """Log-step statistics: the largest logit, and the softmax mass on the sequence's first token (the
    "attention sink" position, which V4's learned sink replaces), averaged over query-heads."""
    B, S, H, _ = q.shape
    group = H // k.shape[2]
    first_mass, max_logit = q.new_zeros((), dtype=torch.float32), q.new_full((), float("-inf"), dtype=torch.float32)
    for qs, ks, mask in _chunks(S, k.shape[1], query_start, key_start, window, query_chunk, q.device):
        keys = k[:, ks].repeat_interleave(group, dim=2).float()  # [B,K,H,hd]
        logits = torch.einsum("bqhd,bkhd->bhqk", q[:, qs].float(), keys) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        max_logit = torch.maximum(max_logit, logits.max())
        if key_start + ks.start == 0:
            first_mass = first_mass + logits.softmax(dim=-1)[..., 0].sum()
    stats.add_mean("mass_first", first_mass, B * S * H)
    stats.add_max("max_logit", max_logit)


class GQAAttention(AttentionLayer):
    def __init__(self, spec: GQASpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(layer_idx)
        self.spec = spec
        self.eps = cfg.rms_norm_eps
        self.scale = spec.softmax_scale()
        H, n_kv, hd, D = spec.num_heads, spec.num_kv_heads, spec.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if spec.qk_norm else None
        own = not spec.shares_kv
        self.k_proj = nn.Linear(D, n_kv * hd, bias=False) if own else None
        self.v_proj = nn.Linear(D, n_kv * hd, bias=False) if own and not spec.k_eq_v else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if own and spec.qk_norm else None
        self.g_proj = nn.Linear(D, spec.gate_width(), bias=False) if spec.gate != "none" else None
        self.rope = spec.rotary()
        self.rope_scaling = spec.rope_scaling()

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Optional[GQACache]:
        """A sharing layer keeps nothing: it reads its source's K/V, cached by the source."""
        if self.spec.shares_kv:
            return None
        return GQACache(batch_size, self.spec.window, self.spec.num_kv_heads, self.spec.head_dim, dtype=dtype,
                        device=device)

    def _own_kv(self, x: torch.Tensor, ctx: ForwardContext, cos: torch.Tensor, sin: torch.Tensor,
                query_start: int) -> SharedKV:
        """This layer's K/V over every key its queries may see: cached past, or earlier shards' keys under SP."""
        assert self.k_proj is not None
        raw = self.k_proj(x).unflatten(-1, (self.spec.num_kv_heads, -1))  # [B,S,n_kv,hd]
        k = rope_half_split(self.k_norm(raw) if self.k_norm is not None else raw, cos[:, None], sin[:, None])
        v = self.v_proj(x).unflatten(-1, (self.spec.num_kv_heads, -1)) if self.v_proj is not None else raw
        if self.spec.v_norm:
            v = rms_normalize(v, self.eps)
        k, v, key_start = visible_kv(k, v, ctx, ctx.cache(self.layer_idx), self.spec.window, query_start)
        shared = SharedKV(k, v, key_start, query_start)
        ctx.shared[shared_kv_key(self.layer_idx)] = shared
        return shared

    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = ctx if ctx is not None else ForwardContext()
        B, S, _ = x.shape
        if self.spec.shares_kv:
            kv = ctx.shared[shared_kv_key(self.spec.kv_source)]
            query_start = kv.query_start
        else:
            cache = ctx.cache(self.layer_idx)
            query_start = cache.pos if cache is not None else ctx.sequence.offset(S)
        cos, sin = self.rope(torch.arange(query_start, query_start + S, device=x.device))  # [S, rot/2]
        if self.rope_scaling != 1.0:
            cos, sin = cos * self.rope_scaling, sin * self.rope_scaling
        q = self.q_proj(x).unflatten(-1, (self.spec.num_heads, -1))  # [B,S,H,hd]
        q = rope_half_split(self.q_norm(q) if self.q_norm is not None else q, cos[:, None], sin[:, None])
        if not self.spec.shares_kv:
            kv = self._own_kv(x, ctx, cos, sin, query_start)
        o = gqa_attention(q, kv.k, kv.v, query_start, kv.key_start, self.spec.window, self.scale,
                          self.spec.query_chunk)
        stats = ctx.stats_for(self.layer_idx)
        if stats is not None:
            record_stats(stats, q, kv.k, query_start, kv.key_start, self.spec.window, self.scale,
                         self.spec.query_chunk)
        if self.g_proj is not None:
            o = o * self._gate(x, stats)
        return self.o_proj(o.flatten(2)), x.new_zeros(())

    def _gate(self, x: torch.Tensor, stats: Optional[AttentionStats]) -> torch.Tensor:
        """softplus(g_proj(x)) in fp32, cast to x's dtype, as [B,S,H,1] (per head) or [B,S,H,hd] (per element).

        Log steps record its mean and its largest value, and the share of gates below 0.1 (heads
        nearly switched off)."""
        g = F.softplus(self.g_proj(x).float())  # [B,S,H] or [B,S,H*hd]
        if stats is not None:
            with torch.no_grad():
                stats.add_mean("gate_mean", g.sum(), g.numel())
                stats.add_mean("gate_closed", (g < 0.1).sum(), g.numel())
                stats.add_max("gate_max", g.max())
        return g.to(x.dtype).unflatten(-1, (self.spec.num_heads, -1))
