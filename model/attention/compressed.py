"""What CSA and HCA share: the V4 backbone with compressed KV entries in the same softmax (MODEL_SPEC §3, §4).

Both layer types add entries of a ``Compressor`` (one shared K = V head, like the window keys) to
each query's sliding window; entry w reads tokens up to (w+1)m-1, so query t may use it iff
w < floor((t+1)/m) (§3.4). Entries are computed once per sequence and masked per query; queries
t < m-1 see none and rely on the window and the sink. HCA (hca.py) attends to every visible
entry; CSA (csa.py) to the lightning indexer's top-k of them. Compressed layers use their own RoPE
base with YaRN (``rope_theta`` and ``yarn_*`` of their spec) for q, kv and entries alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from moesaic.configs.schema import ModelConfig
from moesaic.model.rope import RotaryEmbedding

from .backbone import V4Attention, V4Spec
from .base import HFReader, require
from .cache import CompressedCache, CompressedStream, SWACache
from .compressor import Compressor
from .context import ForwardContext
from .kv_formats import main_entry_bytes


@dataclass
class CompressedSpec(V4Spec):
    """The backbone plus a compressor of ``ratio`` tokens per entry and the compressed layers' RoPE."""

    ratio: int = 4  # tokens per compressed entry m
    rope_theta: float = 160000.0  # RoPE base (+ YaRN) of compressed layers
    yarn_factor: float = 1.0  # 1.0 disables YaRN; V4 uses 16
    yarn_original_max_position: int = 65536  # YaRN: context the RoPE base was trained for
    yarn_beta_fast: float = 32.0  # YaRN: rotations above which frequencies are kept
    yarn_beta_slow: float = 1.0  # YaRN: rotations below which frequencies are interpolated

    hf_rate_key: ClassVar[str]  # the legacy config.json key of this type's ratio (compress_rate_<kind>)
    hf_names = {**V4Spec.hf_names, "compressor.wkv.weight": "compressor.kv_proj.weight",
                "compressor.wgate.weight": "compressor.gate_proj.weight", "compressor.ape": "compressor.position_bias",
                "compressor.norm.weight": "compressor.kv_norm.weight"}

    def check(self, where: str, seq_len: int) -> None:
        super().check(where, seq_len)
        require(self.ratio > 1, f"{where}.ratio={self.ratio} must be > 1")
        require(self.yarn_factor >= 1.0, f"{where}.yarn_factor={self.yarn_factor} must be >= 1 (1 disables YaRN)")
        require(seq_len % self.ratio == 0, f"data.seq_len={seq_len} must be divisible by {where}.ratio={self.ratio}")

    def entry_bytes(self, fmt: str, index_fmt: str) -> float:
        """Cached bytes per compressed entry."""
        return main_entry_bytes(self.head_dim, self.rope_head_dim, fmt)

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        window, _ = super().kv_bytes(tokens, fmt, index_fmt)
        return window, (tokens // self.ratio) * self.entry_bytes(fmt, index_fmt)

    def visible_entries(self, t: torch.Tensor) -> torch.Tensor:
        """Entries visible to queries at positions t (a tensor): floor((t + 1) / ratio)."""
        return torch.div(t + 1, self.ratio, rounding_mode="floor")

    def sp_alignment(self, where: str) -> int:
        return self.ratio  # each shard compresses its own windows, so it starts at a window boundary

    def rope(self) -> RotaryEmbedding:
        return RotaryEmbedding(self.rope_head_dim, self.rope_theta, self.yarn_factor, self.yarn_original_max_position,
                               self.yarn_beta_fast, self.yarn_beta_slow)

    def to_hf(self, where: str) -> dict[str, Any]:
        compress: dict[str, Any] = {"rope_type": "default"}
        if self.yarn_factor > 1.0:
            compress = {"rope_type": "yarn", "factor": self.yarn_factor,
                        "original_max_position_embeddings": self.yarn_original_max_position,
                        "beta_fast": self.yarn_beta_fast, "beta_slow": self.yarn_beta_slow, "attention_factor": 1.0}
        compress.update(rope_theta=self.rope_theta, partial_rotary_factor=self.rope_head_dim / self.head_dim)
        return {**super().to_hf(where), "compress_rope_theta": self.rope_theta,
                "rope_parameters": {"compress": compress},
                "max_position_embeddings": int(self.yarn_factor * self.yarn_original_max_position),
                "compress_rates": {self.hf_layer_type: self.ratio}}

    @classmethod
    def compressed_from_hf(cls, hf: HFReader) -> dict[str, Any]:
        """The fields every compressed type reads from config.json, for its ``from_hf``."""
        yarn = {k: v for k, v in hf.rope.items() if k.startswith("yarn_")}
        ratio = int(hf.get(cls.hf_rate_key, hf.rates.get(cls.hf_layer_type, cls().ratio)))
        return {**cls.backbone_from_hf(hf), **yarn, "rope_theta": hf.rope["compress_rope_theta"], "ratio": ratio}


class CompressedAttention(V4Attention):
    """Backbone + one compressor producing this layer's main entries (head_dim wide, K = V)."""

    overlap: bool  # CSA's entries overlap the previous window (MODEL_SPEC §3.1); HCA's do not

    def __init__(self, spec: CompressedSpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(spec, cfg, layer_idx, spec.rope())
        self.ratio = spec.ratio
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, spec.ratio, self.overlap, self.rope,
                                     self.rope_dim, cfg.rms_norm_eps)

    def _streams(self, batch_size: int, device: torch.device | str | None,
                 dtype: torch.dtype) -> tuple[CompressedStream, Optional[CompressedStream]]:
        """Decode streams: main entries, and (CSA) indexer keys."""
        return CompressedStream(self.compressor, batch_size, dtype, device), None

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> CompressedCache:
        return CompressedCache(batch_size, self.window, self.head_dim, *self._streams(batch_size, device, dtype),
                               dtype=dtype, device=device)

    def _whole(self, compress: Callable[[torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor],
               x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The whole sequence's entries [B, N, ...] from ``compress`` (``Compressor.forward``'s signature).

        x [B,S,D] are this module's tokens: under sequence parallelism a shard, which starts at a
        window boundary and whose first entry (overlapping compressors) reads the window before it.
        """
        seq = ctx.sequence
        before = seq.preceding(x, self.ratio) if self.overlap else None
        return seq.gather(compress(x, seq.offset(x.shape[1]), before))

    def _main_entries(self, x: torch.Tensor, cache: Optional[SWACache], ctx: ForwardContext) -> torch.Tensor:
        """Entries visible so far [B, N, c]: the whole sequence's, or the cache's after absorbing x."""
        if cache is None:
            return self._whole(self.compressor, x, ctx)
        assert isinstance(cache, CompressedCache), "a CSA/HCA layer needs the cache from its own make_cache"
        return cache.main.absorb(self.compressor, x, cache.pos)
