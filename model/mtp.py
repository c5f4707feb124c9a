"""Multi-token prediction (MODEL_SPEC §7): extra blocks that each predict one token further ahead.

MTP depth d (1-based, ``model.mtp_layers`` of them, chained as in DeepSeek-V3) takes the previous
depth's state at position t (the main model's residual streams for d = 1, before the final
collapse) and the embedding of input token t + d, and predicts token t + d + 1:

    x = e_proj(enorm(embed(token t+d))) + h_proj(hnorm(h_t))      (e broadcast to every mHC stream)
    x = V4 block(x)                                   (model.mtp_layer_type attention, V4: SWA; + MoE)
    logits = head(norm(collapse(x)))                               (own collapse and norm, shared head)

as the official ``MTPBlock``, whose names the parameters keep (``mtp.{i}.e_proj``, ``enorm``,
``hnorm``, ``norm``, ``hc_head_*`` and the block's own). The embedding and the head are the main
model's, passed in rather than registered, so they are neither duplicated nor saved twice.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig

from . import mhc
from .attention import AttentionSpec, ForwardContext
from .block import Block
from .norm import RMSNorm


class MTPBlock(Block):
    """The MTP block of depth index + 1; its block has layer index num_layers + index (attention + MoE)."""

    def __init__(self, cfg: ModelConfig, index: int, attention: AttentionSpec) -> None:
        super().__init__(cfg, cfg.num_layers + index, attention)
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.e_proj = nn.Linear(dim, dim, bias=False)
        self.h_proj = nn.Linear(dim, dim, bias=False)
        self.enorm = RMSNorm(dim, eps)
        self.hnorm = RMSNorm(dim, eps)
        self.norm = RMSNorm(dim, eps)
        if self.hc.n > 1:
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = mhc.head_parameters(self.hc, dim, cfg.init_std)

    def predict(self, h: torch.Tensor, next_ids: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B,S,(n,)D] state at t, next_ids [B,S] tokens t+d -> (normed hidden [B,S,D] for the shared head,
        state [B,S,(n,)D], aux_loss); the caller fuses the head into the loss, as for the main model.

        ``embed``: the main model's token embedding (``Transformer.embed_tokens``, scaled with embed_scale)."""
        e = self.e_proj(self.enorm(embed(next_ids)))  # [B,S,D]
        x = self.h_proj(self.hnorm(h)) + (e.unsqueeze(2) if self.hc.n > 1 else e)
        if ctx.doc_ends is not None:  # this depth's tokens are next_ids: the main sequence's ends from position d on
            ctx = dataclasses.replace(ctx, doc_ends=ctx.doc_ends[:, -next_ids.shape[1]:])
        x, aux_loss = self(x, next_ids, ctx)
        out = mhc.head_collapse(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.hc) \
            if self.hc.n > 1 else x
        return self.norm(out), x, aux_loss
