"""The V4 attention menu (swa, csa, hca entries) for tests, from V4's shared fields and its compressed settings."""

from __future__ import annotations

from moesaic.configs.schema import AttentionConfig
from moesaic.model.attention.csa import CSASpec
from moesaic.model.attention.hca import HCASpec
from moesaic.model.attention.swa import SWASpec


def v4_attention(csa_ratio: int = 4, hca_ratio: int = 128, index_heads: int = 4, index_head_dim: int = 32,
                 index_topk: int = 16, indexer_loss_coef: float = 0.01, compress_rope_theta: float = 160000.0,
                 yarn_factor: float = 1.0, yarn_original_max_position: int = 65536, backend: str = "auto",
                 **backbone) -> AttentionConfig:
    """``backbone``: the fields every entry shares (num_heads, window, ..., rope_theta of the SWA layers)."""
    swa = SWASpec(**backbone)
    backbone.pop("rope_theta", None)
    compressed = dict(backbone, rope_theta=compress_rope_theta, yarn_factor=yarn_factor,
                      yarn_original_max_position=yarn_original_max_position)
    return AttentionConfig(backend=backend, menu={
        "swa": swa,
        "csa": CSASpec(**compressed, ratio=csa_ratio, index_heads=index_heads, index_head_dim=index_head_dim,
                       index_topk=index_topk, indexer_loss_coef=indexer_loss_coef),
        "hca": HCASpec(**compressed, ratio=hca_ratio)})
