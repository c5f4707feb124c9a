"""CCA: ZAYA1's Compressed Convolutional Attention (MOSAIC_SPEC §3.2-3.3), global or sliding.

Queries and keys are projected to narrow widths (H and n_kv heads of head_dim), mixed over the last
tokens by a two-stage causal convolution (depthwise over ``conv_kernel`` steps, then a full
head_dim x head_dim mix inside each head over ``mix_kernel`` steps) plus a "qk-mean" residual, and
half of the value channels come from the previous token (``v_proj_delayed``). q and k are L2
normalised to sqrt(head_dim), keys times a learned per-KV-head temperature ``temp``, then half-split
RoPE and GQA attention over the compressed heads (gqa.py's chunked kernel: linear memory). Tensor
names are transformers' (``ZayaAttention``: ``qkv_proj.`` is dropped, see ``hf_names``).

The convolution's taps and the value shift reach back P = t0 + t1 - 2 tokens (v: 1), so every
computation here reads a "halo" of the rows just before the local tokens: zeros at the sequence
start, the previous shard's last rows under sequence parallelism (one exchange), or the decode
cache's rows. Both stages are written as sums over lags of the raw inputs, so a lag that reaches
into an earlier packed document (``ForwardContext.doc_ends``) is dropped exactly as the zero padding
at a sequence start drops it: with ``doc_reset`` every document is computed as if it started the
sequence (transformers leaks the previous document's last tokens there; ``doc_reset: false`` matches it).

Decode state: K and V (as gqa), the last P raw [q ; k] projections, the last delayed value
projection and the tokens seen of the current document; the constant part is counted with the KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs import ConfigError
from moesaic.model.rope import RotaryEmbedding, half_split_inv_freq, rope_half_split

from .base import AttentionLayer, AttentionSpec, HFReader, causal_keys, check_positive, register, require
from .cache import tensor_bytes
from .context import ForwardContext
from .gqa import ELEMENT_BYTES, GQACache, gqa_attention, record_stats, visible_kv

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig


@register
@dataclass
class CCASpec(AttentionSpec):
    kind: str = "cca"
    num_heads: int = 4  # compressed query heads H
    num_kv_heads: int = 2  # compressed key/value heads; divides num_heads; num_kv_heads * head_dim even
    head_dim: int = 32  # width of every q, k and v head
    window: int = 0  # keys per query, the query itself included; 0 = all earlier keys (ZAYA "hybrid")
    conv_kernel: int = 2  # depthwise convolution taps over time (transformers cca_time0)
    mix_kernel: int = 2  # in-head mixing convolution taps over time (transformers cca_time1)
    rope_theta: float = 10000.0  # RoPE base (ZAYA1: 5e6 global, 1e4 sliding)
    rope_fraction: float = 0.5  # share of each head's channels carrying half-split RoPE
    doc_reset: bool = True  # restart the convolution and value shift at document starts (false: transformers)
    query_chunk: int = 512  # queries per kernel call, bounds the [chunk, keys] mask and scores

    not_architecture = frozenset({"kind", "query_chunk", "doc_reset"})
    hf_names = {f"{name}.weight": f"qkv_proj.{name}.weight"
                for name in ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed")} | {
        "conv_qk_depthwise.weight": "qkv_proj.conv_qk_depthwise.weight",
        "conv_qk_depthwise.bias": "qkv_proj.conv_qk_depthwise.bias",
        "conv_qk_grouped.weight": "qkv_proj.conv_qk_grouped.weight",
        "conv_qk_grouped.bias": "qkv_proj.conv_qk_grouped.bias",
        "temp": "qk_norm.temp", "o_proj.weight": "o_proj.weight"}

    def check(self, where: str, seq_len: int) -> None:
        check_positive(where, self, ["num_heads", "num_kv_heads", "head_dim", "conv_kernel", "mix_kernel",
                                     "query_chunk", "rope_theta"])
        require(self.num_heads % self.num_kv_heads == 0,
                f"{where}.num_kv_heads={self.num_kv_heads} must divide {where}.num_heads={self.num_heads}")
        require(self.num_kv_heads * self.head_dim % 2 == 0,
                f"{where}: num_kv_heads * head_dim = {self.num_kv_heads * self.head_dim} must be even (half of "
                f"the value channels come from the previous token)")
        require(self.window >= 0, f"{where}.window={self.window} must be >= 0 (0 = global)")
        require(0 < self.rope_fraction <= 1 and int(self.head_dim * self.rope_fraction) % 2 == 0,
                f"{where}.rope_fraction={self.rope_fraction} must be in (0, 1] and give an even number of "
                f"rotary channels of head_dim={self.head_dim}")

    @property
    def lookback(self) -> int:
        """Tokens before t the convolution reads for q, k at t (transformers' conv state length)."""
        return self.conv_kernel + self.mix_kernel - 2

    @property
    def channels(self) -> int:
        """Convolved channels: every query and key head, C = (H + n_kv) * head_dim."""
        return (self.num_heads + self.num_kv_heads) * self.head_dim

    def state_bytes(self, fmt: str) -> float:
        """The constant decode state of one sequence: ``lookback`` raw [q ; k] rows and one delayed value row."""
        return (self.channels * self.lookback + self.num_kv_heads * self.head_dim // 2) * ELEMENT_BYTES[fmt]

    def build(self, model: ModelConfig, layer_idx: int) -> CCAAttention:
        return CCAAttention(self, model, layer_idx)

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        return 2 * self.num_kv_heads * self.head_dim * ELEMENT_BYTES[fmt]

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        """K and V of the kept tokens plus the constant convolution / value-shift state."""
        kept = min(self.window, tokens) if self.window else tokens
        return kept * self.dense_kv_bytes_per_token(fmt) + self.state_bytes(fmt), 0.0

    def flops_per_token(self, seq_len: int) -> float:
        """q.k and p.v over the keys each query sees, as gqa (the convolution counts as a projection)."""
        keys = causal_keys(seq_len, self.window)
        return 12 * self.num_heads * self.head_dim * keys

    def sp_alignment(self, where: str) -> int:
        return 1  # the convolution's and value shift's halo comes from the preceding shard

    def to_hf(self, where: str) -> dict[str, Any]:
        raise ConfigError(f"{where}: kind cca has no transformers DeepSeek-V4 layer type")

    @classmethod
    def from_hf(cls, hf: HFReader) -> CCASpec:
        raise ConfigError(f"{hf.source}: a DeepSeek-V4 config.json has no cca layers")


class CCACache(GQACache):
    """gqa's K/V plus the halo of the next tokens: raw [q ; k] rows, the delayed value row, document progress."""

    def __init__(self, spec: CCASpec, batch_size: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(batch_size, spec.window, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
        self.halo = Halo(torch.zeros(batch_size, spec.lookback, spec.channels, dtype=dtype, device=device),
                         torch.zeros(batch_size, 1, spec.num_kv_heads * spec.head_dim // 2, dtype=dtype,
                                     device=device),
                         torch.full((batch_size,), spec.lookback + 1, dtype=torch.long, device=device))

    def state_bytes(self) -> int:
        return tensor_bytes(self.halo.qk) + tensor_bytes(self.halo.v)

    def kv_bytes(self) -> int:
        """K/V rows plus the constant state, as ``CCASpec.kv_bytes`` counts them."""
        return super().kv_bytes() + self.state_bytes()

    def nbytes(self) -> int:
        return self.kv_bytes()


class Halo(NamedTuple):
    """What the local tokens read from before them."""

    qk: torch.Tensor  # [B, lookback, C] raw [q ; k] projections of the tokens just before
    v: torch.Tensor  # [B, 1, n_kv*hd/2] v_proj_delayed of the token just before
    doc_pos: torch.Tensor  # [B] long: tokens of the first local token's document before it (capped)


def tokens_into_document(ends: Optional[torch.Tensor], doc_pos: torch.Tensor, cap: int) -> Optional[torch.Tensor]:
    """Per local token [B,S]: how many tokens of its own document precede it, at least up to ``cap``.

    ends [B,S] marks document ends (a token after one starts a new document); doc_pos [B] counts the
    first local token's; None (documents unknown) when ends is None.
    """
    if ends is None:
        return None
    S = ends.shape[1]
    idx = torch.arange(S, device=ends.device)
    starts = F.pad(ends[:, :-1], (1, 0))  # [B,S]: the previous token ended a document
    last_start = torch.where(starts, idx, -doc_pos[:, None]).cummax(dim=1).values
    return (idx - last_start).clamp(max=cap)


class CCAAttention(AttentionLayer):
    def __init__(self, spec: CCASpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(layer_idx)
        self.spec = spec
        H, n_kv, hd, D = spec.num_heads, spec.num_kv_heads, spec.head_dim, cfg.hidden_size
        C = spec.channels
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, n_kv * hd, bias=False)
        self.v_proj_current = nn.Linear(D, n_kv * hd // 2, bias=False)
        self.v_proj_delayed = nn.Linear(D, n_kv * hd // 2, bias=False)
        # Modules for their transformers layout and init; the forward applies their weights lag by lag.
        self.conv_qk_depthwise = nn.Conv1d(C, C, spec.conv_kernel, groups=C)
        self.conv_qk_grouped = nn.Conv1d(C, C, spec.mix_kernel, groups=H + n_kv)
        # Inverse temperature of the keys; transformers starts it at 0 (uniform attention, no gradient into the
        # keys), so moesaic starts at 1: logits sqrt(head_dim) * cos(q, k) / sqrt(head_dim).
        self.temp = nn.Parameter(torch.ones(n_kv))
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        inv_freq = half_split_inv_freq(hd, spec.rope_theta, spec.rope_fraction, False)
        self.rope = RotaryEmbedding(2 * inv_freq.numel(), spec.rope_theta, inv_freq=inv_freq)
        self.scale = 1.0 / math.sqrt(hd)

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> CCACache:
        return CCACache(self.spec, batch_size, dtype=dtype, device=device)

    def _halo(self, qk: torch.Tensor, v_delayed: torch.Tensor, ends: Optional[torch.Tensor], ctx: ForwardContext,
              cache: Optional[CCACache]) -> Halo:
        """The rows before the local ones: the cache's, else the preceding shard's (zeros at the start)."""
        if cache is not None:
            return cache.halo
        P, rows = self.spec.lookback, max(self.spec.lookback, 1)
        parts = [qk, v_delayed] + ([ends[..., None].to(qk.dtype)] if ends is not None else [])
        tails = torch.cat([p[:, -rows:] for p in parts], dim=-1)  # [B, <=rows, C + Cv (+1)]: all a next shard reads
        prev = ctx.sequence.preceding(tails, rows)  # [B, <=rows, C + Cv (+1)]
        prev = F.pad(prev, (0, 0, rows - prev.shape[1], 0))  # [B, rows, ...]: zeros before the sequence
        C = qk.shape[-1]
        doc_pos = torch.full(qk.shape[:1], rows, dtype=torch.long, device=qk.device)
        if ends is not None:  # tokens after the halo's last document end
            idx = torch.arange(rows, device=qk.device)
            doc_pos = rows - 1 - torch.where(prev[..., -1] > 0.5, idx, -1).amax(dim=1)
        return Halo(prev[:, rows - P:, :C], prev[:, -1:, C:C + v_delayed.shape[-1]], doc_pos)

    def _convolve(self, qk: torch.Tensor, halo: torch.Tensor, into_doc: Optional[torch.Tensor]) -> torch.Tensor:
        """Both causal convolution stages over raw rows [halo ; qk] [B, P+S, C] -> [B,S,C], as sums over lags so
        that a lag reaching past the token's document start (into_doc < lag) reads zeros."""
        spec, S = self.spec, qk.shape[1]
        P, t0, t1 = spec.lookback, spec.conv_kernel, spec.mix_kernel
        rows = torch.cat([halo, qk], dim=1)

        def lag(j: int) -> torch.Tensor:  # x_{t-j} for every local t, zero across a document start: [B,S,C]
            x = rows[:, P - j:P - j + S]
            return x if into_doc is None or j == 0 else x * (into_doc >= j)[..., None].to(x.dtype)

        lags = [lag(j) for j in range(P + 1)]
        dw, dw_bias = self.conv_qk_depthwise.weight[:, 0], self.conv_qk_depthwise.bias  # [C, t0], [C]
        groups = spec.num_heads + spec.num_kv_heads
        mix = self.conv_qk_grouped.weight.view(groups, spec.head_dim, spec.head_dim, t1)  # [G, out, in, t1]
        out = self.conv_qk_grouped.bias.expand(*qk.shape[:2], -1)  # [B,S,C]
        for m in range(t1):  # the depthwise stage's output at t - m, then its in-head mix
            mid = dw_bias + sum(dw[:, t0 - 1 - i] * lags[m + i] for i in range(t0))  # [B,S,C]
            mixed = torch.einsum("bsgi,goi->bsgo", mid.unflatten(-1, (groups, -1)), mix[..., t1 - 1 - m])
            out = out + mixed.flatten(2)
        return out

    def project(self, x: torch.Tensor, ctx: ForwardContext,
                cache: Optional[CCACache]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CCA projection (MOSAIC_SPEC §3.2) of x [B,S,D] -> q [B,S,H,hd], k, v [B,S,n_kv,hd]."""
        spec = self.spec
        B, S, _ = x.shape
        H, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, k = self.q_proj(x), self.k_proj(x)  # [B,S,H*hd], [B,S,n_kv*hd]
        qk = torch.cat([q, k], dim=-1)  # [B,S,C]
        v_delayed = self.v_proj_delayed(x)  # [B,S,n_kv*hd/2]
        ends = ctx.doc_ends if spec.doc_reset else None
        halo = self._halo(qk, v_delayed, ends, ctx, cache)
        into_doc = tokens_into_document(ends, halo.doc_pos, max(spec.lookback, 1))
        # qk-mean residual: query head h pairs with KV head h // (H / n_kv)
        q_res = 0.5 * (q.view(B, S, H, hd) + k.view(B, S, n_kv, hd).repeat_interleave(H // n_kv, dim=2))
        k_res = q_res.view(B, S, n_kv, H // n_kv, hd).mean(dim=3)
        conv = self._convolve(qk, halo.qk, into_doc)
        q = conv[..., :H * hd].view(B, S, H, hd) + q_res
        k = conv[..., H * hd:].view(B, S, n_kv, hd) + k_res
        previous = torch.cat([halo.v, v_delayed[:, :-1]], dim=1)  # [B,S,n_kv*hd/2]: the token before's
        if into_doc is not None:
            previous = previous * (into_doc >= 1)[..., None].to(previous.dtype)
        v = torch.cat([self.v_proj_current(x), previous], dim=-1).view(B, S, n_kv, hd)
        if cache is not None:
            rows = torch.cat([halo.qk, qk], dim=1)
            doc_pos = halo.doc_pos + S if into_doc is None else torch.where(ends[:, -1], 0, into_doc[:, -1] + 1)
            cache.halo = Halo(rows[:, rows.shape[1] - spec.lookback:].detach(), v_delayed[:, -1:].detach(),
                              doc_pos.clamp(max=spec.lookback + 1))
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = ctx if ctx is not None else ForwardContext()
        S, hd = x.shape[1], self.spec.head_dim
        cache = ctx.cache(self.layer_idx)
        query_start = cache.pos if cache is not None else ctx.sequence.offset(S)
        q, k, v = self.project(x, ctx, cache)
        eps = torch.finfo(q.dtype).eps
        q = q * (math.sqrt(hd) / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (math.sqrt(hd) / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * self.temp[:, None].to(k.dtype)
        cos, sin = self.rope(torch.arange(query_start, query_start + S, device=x.device))  # [S, rot/2]
        q, k = rope_half_split(q, cos[:, None], sin[:, None]), rope_half_split(k, cos[:, None], sin[:, None])
        k, v, key_start = visible_kv(k, v, ctx, cache, self.spec.window, query_start)
        o = gqa_attention(q, k, v, query_start, key_start, self.spec.window, self.scale, self.spec.query_chunk)
        stats = ctx.stats_for(self.layer_idx)
        if stats is not None:
            record_stats(stats, q, k, query_start, key_start, self.spec.window, self.scale, self.spec.query_chunk)
        return self.o_proj(o.flatten(2)), x.new_zeros(())
