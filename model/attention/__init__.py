"""Attention layer types behind one registry (base.py): each type is one module registering its spec.

``build_attention(cfg, layer_idx)`` builds a layer from the menu entry ``model.layer_types`` names.
Importing this package registers the built-in types (SWA, CSA, HCA, GQA, CCA, MLA, DSA, elastic).
"""

from __future__ import annotations

from moesaic.configs.schema import ModelConfig

from . import swa, csa, hca, gqa, cca, mla, dsa  # noqa: F401, I001  (registers the built-in types, in menu order)
from . import elastic  # noqa: F401, I001  (after the types its modes use)
from .base import (AttentionLayer, AttentionSpec, layer_specs, parse_entry, register, registered, resolve_menu,
                   spec_for_hf)
from .cache import CompressedCache, SWACache
from .context import ForwardContext
from .entries import CompressedKV
from .kernels import window_attention
from .stats import AttentionStats, StatsSink


def build_attention(cfg: ModelConfig, layer_idx: int) -> AttentionLayer:
    return layer_specs(cfg)[layer_idx].build(cfg, layer_idx)


__all__ = ["AttentionLayer", "AttentionSpec", "AttentionStats", "CompressedCache", "CompressedKV", "ForwardContext",
           "SWACache", "StatsSink", "build_attention", "layer_specs", "parse_entry", "register", "registered",
           "resolve_menu", "spec_for_hf", "window_attention"]
