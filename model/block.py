"""One decoder layer: pre-norm attention and FFN sublayers, each added back to the residual stream.

With hc_mult = 1 the residual is plain, ``x + sublayer(x)`` on x [B,S,D]. With hc_mult = n > 1 it
is mHC (``mhc.py``) on n streams x [B,S,n,D]: each sublayer reads a weighted collapse of the
streams and its output is spread back with the stream mixing; the mapping parameters carry the
official names (``hc_attn_fn``/``_base``/``_scale``, ``hc_ffn_*``).

Gemma 4's block options (MOSAIC_SPEC §1.6), each off by default:

* ``model.sandwich_norm``: each sublayer's output is RMS-normed (``post_attn_norm``, ``post_ffn_norm``)
  before the residual add, or before ``mhc.expand`` with mHC;
* per-layer embeddings (``model.ple_dim``, ``ple.py``): ``h + ple(h, ple_i)`` after the FFN residual add;
* ``model.layer_scalar``: the whole output stream times the frozen buffer ``layer_scalar`` [1], last.

ZAYA1's (MOSAIC_SPEC §3.4): ``model.residual_scale`` replaces both residual adds with ``residual.py``'s scaled
add (``post_attention_residual_scale``, ``post_mlp_residual_scale``); with ``model.fp32_residual`` the stream
stays fp32 and each sublayer reads a copy in its weights' dtype.

moesaic name (under layers.{i}.)   transformers Gemma 4 name (under model.layers.{i}.)   shape
attn_norm.weight                   input_layernorm.weight                                [D]
post_attn_norm.weight              post_attention_layernorm.weight                       [D]
ffn_norm.weight                    pre_feedforward_layernorm.weight                      [D]
ffn.w1 / w3 / w2 .weight           mlp.gate_proj / up_proj / down_proj .weight (dense)   [I,D] [I,D] [D,I]
post_ffn_norm.weight               post_feedforward_layernorm.weight                     [D]
layer_scalar                       layer_scalar (buffer)                                 [1]
(ffn of "dense+moe" layers: ``dense_moe.py``; ple.*: ``ple.py``)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig

from . import mhc
from .attention import AttentionSpec, ForwardContext
from .checkpointing import recomputing, run_checkpointed
from .ffn import SwiGLU
from .norm import RMSNorm
from .ple import PerLayerInput
from .residual import ResidualScale


class Block(nn.Module):
    """attn_norm -> attn -> residual; ffn_norm -> ffn (dense, MoE or dense+MoE) -> residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, attention: AttentionSpec) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = attention.build(cfg, layer_idx)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn_type = cfg.ffn_type(layer_idx)
        # The MoE package is imported lazily: dense-only models must not depend on it.
        if self.ffn_type == "moe":
            from .moe import MoE

            self.ffn: nn.Module = MoE(cfg, layer_idx)
        elif self.ffn_type == "dense+moe":
            from .dense_moe import DenseMoE

            self.ffn = DenseMoE(cfg, layer_idx)
        else:
            self.ffn = SwiGLU(dim, cfg.dense_width(layer_idx), cfg.moe.swiglu_limit, cfg.ffn_activation)
        self.post_attn_norm = RMSNorm(dim, eps) if cfg.sandwich_norm else None
        self.post_attention_residual_scale = ResidualScale(dim) if cfg.residual_scale else None
        self.post_mlp_residual_scale = ResidualScale(dim) if cfg.residual_scale else None
        self.fp32_residual = cfg.fp32_residual
        self.post_ffn_norm = RMSNorm(dim, eps) if cfg.sandwich_norm else None
        is_mtp = layer_idx >= cfg.num_layers
        self.ple = PerLayerInput(dim, cfg.ple_dim, eps, cfg.ffn_activation) if cfg.ple_dim and not is_mtp else None
        # A buffer, not a Parameter: loaded from checkpoints and saved, but never trained (as transformers).
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.layer_scalar else None, persistent=True)
        self.hc = mhc.HCSpec.from_config(cfg)
        if self.hc.n > 1:
            self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = mhc.sublayer_parameters(
                self.hc, dim, cfg.init_std)
            self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = mhc.sublayer_parameters(
                self.hc, dim, cfg.init_std)
        self.checkpointing = "none"  # activation checkpointing, set from outside (checkpointing.py)

    def attn_sublayer(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        h, aux_loss = self.attn(self.attn_norm(x.to(self.attn_norm.weight.dtype)), ctx)
        return (h if self.post_attn_norm is None else self.post_attn_norm(h)), aux_loss

    def ffn_sublayer(self, x: torch.Tensor, input_ids: torch.Tensor,
                     ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ffn_norm(x.to(self.ffn_norm.weight.dtype))
        if self.ffn_type == "moe":
            h, aux_loss = self.ffn(h, input_ids, ctx.sequence, carry=ctx.shared)
        elif self.ffn_type == "dense+moe":
            h, aux_loss = self.ffn(h, x, input_ids, ctx.sequence)  # Gemma routes from the un-normed x
        else:
            h, aux_loss = self.ffn(h), h.new_zeros(())
        return (h if self.post_ffn_norm is None else self.post_ffn_norm(h)), aux_loss

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, ctx: ForwardContext,
                ple: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,D] (or mHC streams [B,S,n,D]), input_ids [B,S] (for hash routing), ple [B,S,P] this layer's
        per-layer embedding (blocks with PLE only) -> (x, aux_loss of both sublayers)."""
        if self.checkpointing != "none" and torch.is_grad_enabled():
            return run_checkpointed(self._forward, self.checkpointing, x, input_ids, ctx, ple)
        return self._forward(x, input_ids, ctx, ple)

    def _forward(self, x: torch.Tensor, input_ids: torch.Tensor, ctx: ForwardContext,
                 ple: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if recomputing():  # the statistics were taken in the forward
            ctx = replace(ctx, stats=None)
        if self.hc.n > 1:
            x, aux_loss = self._forward_mhc(x, input_ids, ctx)
        else:
            h, attn_aux = self.attn_sublayer(x, ctx)
            x = x + h if self.post_attention_residual_scale is None else self.post_attention_residual_scale(h, x)
            h, ffn_aux = self.ffn_sublayer(x, input_ids, ctx)
            x = x + h if self.post_mlp_residual_scale is None else self.post_mlp_residual_scale(h, x)
            aux_loss = attn_aux + ffn_aux
        if self.ple is not None:
            x = self.ple(x, ple.unsqueeze(2) if self.hc.n > 1 else ple)  # [B,S,1,P]: the same for every stream
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x, aux_loss

    def _forward_mhc(self, x: torch.Tensor, input_ids: torch.Tensor,
                     ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        h, post, comb = mhc.sublayer_collapse(x, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.hc)
        h, attn_aux = self.attn_sublayer(h, ctx)
        x = mhc.expand(h, x, post, comb, self.hc.backend)  # [B,S,n,D]
        h, post, comb = mhc.sublayer_collapse(x, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.hc)
        h, ffn_aux = self.ffn_sublayer(h, input_ids, ctx)
        return mhc.expand(h, x, post, comb, self.hc.backend), attn_aux + ffn_aux
