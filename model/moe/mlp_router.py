"""ZAYA1's MLP router (MOSAIC_SPEC §3.5): a small MLP over a router state that each MoE layer hands to the next,
and a skip expert.

    r      = down_proj(x) (+ previous layer's r * router_states_scale)     # [B,S,R]; r goes on to the next layer
    probs  = softmax(out_proj(gelu(fc2(gelu(fc1(norm(r)))))))              # [B,S,E+1], the last class "skip"
    chosen = top-k of probs + balancing_biases [E+1]                        # selection only, as the linear router
    gates  = probs at the chosen classes (not renormalised unless norm_topk_prob), x routed_scaling_factor

A token that chooses the skip class gets gate 0 at expert 0 (transformers computes it there too, so the
output is exact) and counts towards no expert's load. The state is per token and the router runs where
its tokens live (replicated under expert parallelism, before the all-to-all), so the carry never leaves
its token's rank; under sequence parallelism it is per local token too. transformers' ``balancing_biases``
[E+1] is a buffer here too: its first E entries are ``expert_bias`` (updated by the trainer like the linear
router's); the skip class's last entry is kept as initialised or loaded (its update rule is not published).

moesaic name (under ffn.gate.)   transformers name (under mlp.gate.)   shape
down_proj.weight / .bias         down_proj.weight / .bias              [R, D] / [R]
router_states_scale              router_states_scale                   [R] (layers after the first MoE layer)
norm.weight                      router_mlp.norm.weight                [R]
fc1 / fc2 .weight / .bias        router_mlp.fc1 / fc2 .weight / .bias  [R, R] / [R]
out_proj.weight                  router_mlp.out_proj.weight            [E+1, R]
balancing_biases                 balancing_biases                      [E+1] (fp32 buffer)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs.schema import ModelConfig
from moesaic.model.norm import RMSNorm
from moesaic.model.sequence import WHOLE, WholeSequence

from .router import _FP32_BUFFERS, Router, RouterOutput

STATE_KEY = "moe.router_state"


class MLPRouter(Router):
    fp32_buffers = tuple(name for name in _FP32_BUFFERS if name != "expert_bias") + ("balancing_biases",)

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        del self.weight  # the MLP replaces the linear scorer
        del self.expert_bias  # a view of balancing_biases (the property below)
        D, R, E = cfg.hidden_size, cfg.moe.router_hidden_size, cfg.moe.num_experts
        self.down_proj = nn.Linear(D, R)
        # Decoder layers only (MTP blocks run on shifted tokens); the first MoE layer has no state to receive.
        self.carries = layer_idx < cfg.num_layers
        receives = self.carries and any(cfg.ffn_type(i) == "moe" for i in range(layer_idx))
        self.router_states_scale = nn.Parameter(torch.ones(R)) if receives else None
        self.norm = RMSNorm(R, cfg.rms_norm_eps)
        self.fc1, self.fc2 = nn.Linear(R, R), nn.Linear(R, R)
        self.out_proj = nn.Linear(R, E + 1, bias=False)
        # transformers starts the skip class's bias at -1: the skip is rarely chosen until trained otherwise.
        self.register_buffer("balancing_biases", torch.cat([torch.zeros(E), torch.full((1,), -1.0)]),
                             persistent=True)

    @property
    def expert_bias(self) -> torch.Tensor:
        """The experts' selection bias [E] (the linear router's buffer; here a view of balancing_biases)."""
        return self.balancing_biases[:self.num_experts]

    @expert_bias.setter
    def expert_bias(self, value: torch.Tensor) -> None:  # ``update_bias``'s in-place ``+=`` assigns it back
        self.balancing_biases[:self.num_experts] = value

    def probabilities(self, x: torch.Tensor, carry: Optional[dict]) -> torch.Tensor:
        """fp32 softmax [B,S,E+1] over the experts and the skip class; updates ``carry`` with this layer's state."""
        r = self.down_proj(x)  # [B,S,R]
        if self.carries and carry is not None:
            if self.router_states_scale is not None and STATE_KEY in carry:
                r = r + carry[STATE_KEY] * self.router_states_scale
            carry[STATE_KEY] = r
        logits = self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(r))))))
        return logits.float().softmax(dim=-1)

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                sequence: WholeSequence = WHOLE, carry: Optional[dict] = None) -> RouterOutput:
        batch, seq, _ = x.shape
        E = self.num_experts
        probs = self.probabilities(x, carry).view(batch * seq, E + 1)  # [T, E+1]
        biased = probs.detach() + self.balancing_biases
        chosen = biased.sort(dim=-1, descending=True, stable=True).indices[:, :self.top_k]  # [T, k]
        gates = probs.gather(-1, chosen)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        taken = chosen < E  # [T, k]: False where the token skips
        gates = gates * taken * self.routed_scaling_factor
        topk_idx = chosen.masked_fill(~taken, 0)  # the skip runs expert 0 with gate 0
        scores = probs[:, :E]
        aux_loss = self._seq_aux_loss(scores.view(batch, seq, E), topk_idx.view(batch, seq, -1), sequence,
                                      taken.view(batch, seq, -1))
        if self.training:
            self._count(topk_idx, taken)
            if self.track_stats:
                self._accumulate_stats(scores, topk_idx, aux_loss, sequence.shards, taken)
        return RouterOutput(topk_idx, gates, aux_loss)
