"""One decoder layer: pre-norm attention and FFN sublayers, each added back to the residual stream.

The two sublayers are separate methods so that mHC (hc_mult > 1) can later replace the plain
``x + sublayer(x)`` residual with its stream mixing around the same calls.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig

from .attention import build_attention
from .ffn import SwiGLU
from .norm import RMSNorm


class Block(nn.Module):
    """attn_norm -> attn -> residual; ffn_norm -> ffn (dense SwiGLU or MoE) -> residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.ffn_type(layer_idx) == "moe"
        if self.is_moe:
            from .moe import MoE  # imported lazily: dense-only models must not depend on the MoE package

            self.ffn: nn.Module = MoE(cfg, layer_idx)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, cfg.moe.swiglu_limit)

    def attn_sublayer(self, x: torch.Tensor, cache: Optional[object] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn(self.attn_norm(x), cache)

    def ffn_sublayer(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ffn_norm(x)
        if self.is_moe:
            return self.ffn(h, input_ids)
        return self.ffn(h), h.new_zeros(())

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor,
                cache: Optional[object] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,D], input_ids [B,S] (for hash routing) -> (x [B,S,D], aux_loss of both sublayers)."""
        h, attn_aux = self.attn_sublayer(x, cache)
        x = x + h
        h, ffn_aux = self.ffn_sublayer(x, input_ids)
        return x + h, attn_aux + ffn_aux
