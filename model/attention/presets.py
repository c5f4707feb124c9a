"""Menus of whole-model presets for Python callers: DeepSeek-V4's SWA, CSA and HCA entries from V4's flat fields.

YAML configs write the menu out (configs/*.yaml); tests and benchmarks that build configs in
Python use these instead of spelling every entry.
"""

from __future__ import annotations

from moesaic.configs.schema import AttentionConfig

from .csa import CSASpec
from .hca import HCASpec
from .swa import SWASpec


def v4_attention(csa_ratio: int = 4, hca_ratio: int = 128, index_heads: int = 4, index_head_dim: int = 32,
                 index_topk: int = 16, indexer_loss_coef: float = 0.01, compress_rope_theta: float = 160000.0,
                 yarn_factor: float = 1.0, yarn_original_max_position: int = 65536, backend: str = "auto",
                 **backbone: object) -> AttentionConfig:
    """The V4 menu: entries "swa", "csa", "hca"; ``backbone``: the fields every entry shares (num_heads,
    window, ..., rope_theta of the SWA layers); the compressed ones use ``compress_rope_theta`` and YaRN."""
    swa = SWASpec(**backbone)
    backbone.pop("rope_theta", None)
    compressed = dict(backbone, rope_theta=compress_rope_theta, yarn_factor=yarn_factor,
                      yarn_original_max_position=yarn_original_max_position)
    return AttentionConfig(backend=backend, menu={
        "swa": swa,
        "csa": CSASpec(**compressed, ratio=csa_ratio, index_heads=index_heads, index_head_dim=index_head_dim,
                       index_topk=index_topk, indexer_loss_coef=indexer_loss_coef),
        "hca": HCASpec(**compressed, ratio=hca_ratio)})
