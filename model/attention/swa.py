"""SWA: the V4 backbone alone, attention over the last ``window`` keys and a sink (MODEL_SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backbone import V4Attention, V4Spec
from .base import HFReader, register

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig


@register
@dataclass
class SWASpec(V4Spec):
    kind: str = "swa"

    hf_layer_type = "sliding_attention"

    def build(self, model: ModelConfig, layer_idx: int) -> V4Attention:
        return V4Attention(self, model, layer_idx)

    def to_hf(self, where: str) -> dict[str, Any]:
        main = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.rope_head_dim / self.head_dim}
        return {**super().to_hf(where), "rope_theta": self.rope_theta, "rope_parameters": {"main": main}}

    @classmethod
    def from_hf(cls, hf: HFReader) -> SWASpec:
        return cls(**cls.backbone_from_hf(hf), rope_theta=hf.rope["rope_theta"])
