"""HCA: dense attention over every causally visible entry of m' tokens each (MODEL_SPEC §4).

m' is large (128 in V4) and entries do not overlap. Every visible entry joins the softmax, passed
to the kernel as a [1, S, N] visibility mask: N = S/m' is small, so the mask and the kernel's
per-chunk [chunk, N] logits stay near-linear in S; an index list of all visible entries would cost
S x N x c gathered values instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moesaic.configs.schema import ModelConfig

from .backbone import AuxLoss
from .base import HFReader, mean_over_positions, register
from .cache import SWACache
from .compressed import CompressedAttention, CompressedSpec
from .context import ForwardContext
from .entries import CompressedKV
from .stats import AttentionStats


def visible_entries(positions: torch.Tensor, num_entries: int, ratio: int) -> torch.Tensor:
    """[1, S, N] bool: entry w is visible to the query at position t iff w < (t + 1) // ratio."""
    entry = torch.arange(num_entries, device=positions.device)
    return (entry < ((positions + 1) // ratio).unsqueeze(-1)).unsqueeze(0)


@register
@dataclass
class HCASpec(CompressedSpec):
    kind: str = "hca"
    ratio: int = 128  # tokens per compressed entry m'

    hf_layer_type = "heavily_compressed_attention"
    hf_rate_key = "compress_rate_hca"

    def build(self, model: ModelConfig, layer_idx: int) -> HeavilyCompressedAttention:
        return HeavilyCompressedAttention(self, model, layer_idx)

    def extra_keys(self, seq_len: int) -> float:
        return mean_over_positions(seq_len, self.visible_entries)

    @classmethod
    def from_hf(cls, hf: HFReader) -> HCASpec:
        return cls(**cls.compressed_from_hf(hf))


class HeavilyCompressedAttention(CompressedAttention):
    overlap = False

    def compressed_entries(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                           cache: Optional[SWACache], ctx: ForwardContext,
                           stats: Optional[AttentionStats]) -> tuple[Optional[CompressedKV], Optional[AuxLoss]]:
        entries = self._main_entries(x, cache, ctx)  # [B,N,c]
        return CompressedKV(entries, mask=visible_entries(positions, entries.shape[1], self.ratio)), None
