"""Gemma 4's FFN, ffn type "dense+moe" (MOSAIC_SPEC §1.6, 26B-A4B): a dense MLP and a MoE side by side.

With r the block's stream entering the FFN sublayer and ffn_norm the block's pre-FFN norm:

    m1 = post_dense_norm(dense(ffn_norm(r)))
    m2 = post_moe_norm(moe(moe_norm(r), router_input=r))    # Gemma routes from the *un-normed* r
    y  = m1 + m2                                            # the block adds post_ffn_norm(y) with sandwich_norm

The MoE is a plain ``moesaic.model.moe.MoE`` (its router, experts and shared experts, if any), so
expert parallelism (parallel/ep.py) shards it like any other. The outer norm is the block's
``post_ffn_norm``, i.e. ``model.sandwich_norm`` (Gemma 4 sets both); without it y is added as is.

moesaic name (under layers.{i}.)   transformers Gemma 4 name (under model.layers.{i}.)          shape
ffn_norm.weight                    pre_feedforward_layernorm.weight                             [D]
ffn.dense.w1 / w3 / w2 .weight     mlp.gate_proj / up_proj / down_proj .weight                  [I,D] [I,D] [D,I]
ffn.post_dense_norm.weight         post_feedforward_layernorm_1.weight                          [D]
ffn.moe_norm.weight                pre_feedforward_layernorm_2.weight                           [D]
ffn.moe.gate.weight                router.proj.weight                                           [E, D]
ffn.moe.gate.scale                 router.scale                          (moe.router_input_norm) [D]
ffn.moe.gate.per_expert_scale      router.per_expert_scale               (moe.per_expert_scale)  [E]
ffn.moe.experts.w1 / w3            experts.gate_up_proj[:, :I_moe] / [:, I_moe:]                 [E, I_moe, D]
ffn.moe.experts.w2                 experts.down_proj                                             [E, D, I_moe]
ffn.post_moe_norm.weight           post_feedforward_layernorm_2.weight                          [D]
post_ffn_norm.weight               post_feedforward_layernorm.weight     (model.sandwich_norm)   [D]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig
from moesaic.model.sequence import WHOLE, WholeSequence

from .ffn import SwiGLU
from .moe import MoE
from .norm import RMSNorm


class DenseMoE(nn.Module):
    """y = post_dense_norm(dense(h)) + post_moe_norm(moe(moe_norm(r), router_input=r)), h = ffn_norm(r)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.dense = SwiGLU(dim, cfg.dense_width(layer_idx), cfg.moe.swiglu_limit, cfg.ffn_activation)
        self.post_dense_norm = RMSNorm(dim, eps)
        self.moe_norm = RMSNorm(dim, eps)
        self.moe = MoE(cfg, layer_idx)
        self.post_moe_norm = RMSNorm(dim, eps)

    def forward(self, h: torch.Tensor, r: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                sequence: WholeSequence = WHOLE) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B,S,D] the dense MLP's (normed) input, r [B,S,D] the un-normed stream -> (y [B,S,D], aux_loss)."""
        routed, aux_loss = self.moe(self.moe_norm(r), input_ids, sequence, router_input=r)
        return self.post_dense_norm(self.dense(h)) + self.post_moe_norm(routed), aux_loss
