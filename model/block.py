"""One decoder layer: pre-norm attention and FFN sublayers, each added back to the residual stream.

With hc_mult = 1 the residual is plain, ``x + sublayer(x)`` on x [B,S,D]. With hc_mult = n > 1 it
is mHC (``mhc.py``) on n streams x [B,S,n,D]: each sublayer reads a weighted collapse of the
streams and its output is spread back with the stream mixing; the mapping parameters carry the
official names (``hc_attn_fn``/``_base``/``_scale``, ``hc_ffn_*``).
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig

from . import mhc
from .attention import AttentionSpec, ForwardContext
from .ffn import SwiGLU
from .norm import RMSNorm


class Block(nn.Module):
    """attn_norm -> attn -> residual; ffn_norm -> ffn (dense SwiGLU or MoE) -> residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, attention: AttentionSpec) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = attention.build(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.ffn_type(layer_idx) == "moe"
        if self.is_moe:
            from .moe import MoE  # imported lazily: dense-only models must not depend on the MoE package

            self.ffn: nn.Module = MoE(cfg, layer_idx)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, cfg.moe.swiglu_limit)
        self.hc = mhc.HCSpec.from_config(cfg)
        if self.hc.n > 1:
            self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = mhc.sublayer_parameters(
                self.hc, cfg.hidden_size, cfg.init_std)
            self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = mhc.sublayer_parameters(
                self.hc, cfg.hidden_size, cfg.init_std)

    def attn_sublayer(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn(self.attn_norm(x), ctx)

    def ffn_sublayer(self, x: torch.Tensor, input_ids: torch.Tensor,
                     ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ffn_norm(x)
        if self.is_moe:
            return self.ffn(h, input_ids, ctx.sequence)
        return self.ffn(h), h.new_zeros(())

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,D] (or mHC streams [B,S,n,D]), input_ids [B,S] (for hash routing) -> (x, aux_loss of both sublayers)."""
        if self.hc.n > 1:
            return self._forward_mhc(x, input_ids, ctx)
        h, attn_aux = self.attn_sublayer(x, ctx)
        x = x + h
        h, ffn_aux = self.ffn_sublayer(x, input_ids, ctx)
        return x + h, attn_aux + ffn_aux

    def _forward_mhc(self, x: torch.Tensor, input_ids: torch.Tensor,
                     ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        pre, post, comb = mhc.sublayer_mappings(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.hc)
        h, attn_aux = self.attn_sublayer(mhc.collapse(x, pre), ctx)
        x = mhc.expand(h, x, post, comb)  # [B,S,n,D]
        pre, post, comb = mhc.sublayer_mappings(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.hc)
        h, ffn_aux = self.ffn_sublayer(mhc.collapse(x, pre), input_ids, ctx)
        return mhc.expand(h, x, post, comb), attn_aux + ffn_aux
