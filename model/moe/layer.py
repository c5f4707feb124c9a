"""The MoE FFN: router -> dispatcher -> routed experts -> combine, plus the shared expert(s).

Dropless: every token reaches all k of its experts. Submodule names follow the official
checkpoint (``ffn.gate``, ``ffn.experts``, ``ffn.shared_experts``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig
from moesaic.model.ffn import SwiGLU
from moesaic.model.sequence import WHOLE, WholeSequence

from .dispatcher import LocalDispatcher
from .experts import GroupedExperts
from .mlp_router import MLPRouter
from .router import Router


def expert_seed(layer_idx: int, num_experts: int) -> int:
    """Base seed of a layer's expert init: the run seed (torch.initial_seed(), set identically on
    every rank before the model is built) plus a per-layer block of num_experts ids, offset by
    one block so that no expert draws the same stream as the global generator."""
    return torch.initial_seed() + (layer_idx + 1) * num_experts


class MoE(nn.Module):
    """y = sum_j g_j * Expert_j(x) + Shared(x), over each token's k routed experts."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        moe = cfg.moe
        self.gate = MLPRouter(cfg, layer_idx) if moe.router == "mlp" else Router(cfg, layer_idx)
        self.dispatcher = LocalDispatcher(moe.num_experts)
        self.experts = GroupedExperts(
            moe.num_experts, cfg.hidden_size, moe.intermediate_size, moe.swiglu_limit,
            init_std=cfg.init_std, seed=expert_seed(layer_idx, moe.num_experts), activation=cfg.ffn_activation)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, moe.shared_intermediate_size or moe.intermediate_size * moe.num_shared_experts,
                   moe.swiglu_limit, cfg.ffn_activation)
            if moe.num_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                sequence: WholeSequence = WHOLE,
                router_input: Optional[torch.Tensor] = None,
                carry: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> (y [B, S, D], aux_loss scalar).

        input_ids [B, S] picks the experts of hash-routed layers; learned routing ignores it.
        ``sequence``: the positions x holds (a shard under SP), for the router's sequence aux loss.
        ``router_input`` [B, S, D]: what the router scores instead of x (Gemma 4 routes from the un-normed
        stream while its experts read a normed copy, ``model/dense_moe.py``).
        ``carry``: the forward's state shared between layers, for routers that hand state on (``mlp_router.py``).
        """
        batch, seq, dim = x.shape
        route = self.gate(x if router_input is None else router_input, input_ids, sequence, carry)
        tokens = x.reshape(batch * seq, dim)  # [T, D]
        expert_x, counts, state = self.dispatcher.dispatch(tokens, route.topk_idx)
        y = self.dispatcher.combine(self.experts(expert_x, counts), route.gates, state)  # [T, D]
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)
        return y.view(batch, seq, dim), route.aux_loss
