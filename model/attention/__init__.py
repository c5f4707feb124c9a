"""DeepSeek-V4 attention layers; ``build_attention`` picks the type of each layer from the config."""

from __future__ import annotations

from torch import nn

from moesaic.configs.schema import ModelConfig

from .backbone import SlidingWindowAttention
from .cache import CompressedCache, SWACache
from .compressed import CompressedSparseAttention, HeavilyCompressedAttention
from .kernels import CompressedKV, window_attention

# Layer type -> class taking (cfg, layer_idx).
ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "swa": SlidingWindowAttention,
    "csa": CompressedSparseAttention,
    "hca": HeavilyCompressedAttention,
}


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    kind = cfg.attention_type(layer_idx)
    if kind not in ATTENTION_CLASSES:
        raise NotImplementedError(f"attention type '{kind}' (layer {layer_idx}) is not implemented yet; "
                                  f"available: {', '.join(ATTENTION_CLASSES)}")
    return ATTENTION_CLASSES[kind](cfg, layer_idx)


__all__ = ["ATTENTION_CLASSES", "CompressedCache", "CompressedKV", "CompressedSparseAttention",
           "HeavilyCompressedAttention", "SWACache", "SlidingWindowAttention", "build_attention", "window_attention"]
