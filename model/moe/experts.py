"""Routed experts as stacked weights, so an expert-parallel rank holds a slice of them.

Each expert is initialised from its own generator seeded by its *global* id: a rank holding the
slice ``[expert_offset, expert_offset + num_local_experts)`` gets exactly the weights those experts
have in a single-device build, and building experts never consumes the global RNG, so the modules
built after them initialise identically whatever the sharding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.model.ffn import gated


class GroupedExperts(nn.Module):
    """Clamped SwiGLU (or GeGLU) experts; w1/w3 [L, hidden, D] (gate/up), w2 [L, D, hidden] (down).

    The per-expert layout is nn.Linear's [out, in], matching the official ``experts.{e}.w*.weight``.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        swiglu_limit: float = 0.0,
        init_std: float = 0.02,
        seed: int = 0,
        expert_offset: int = 0,
        num_local_experts: Optional[int] = None,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        local = num_experts - expert_offset if num_local_experts is None else num_local_experts
        if not (0 <= expert_offset and 0 < local and expert_offset + local <= num_experts):
            raise ValueError(
                f"experts [{expert_offset}, {expert_offset + local}) are not a slice of {num_experts} experts")
        self.num_experts = num_experts
        self.expert_offset = expert_offset
        self.num_local_experts = local
        self.swiglu_limit = swiglu_limit
        self.activation = activation
        self.init_std = init_std
        self.seed = seed
        self.w1 = nn.Parameter(torch.empty(local, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(local, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(local, dim, hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) per expert from a CPU generator seeded by seed + global expert id."""
        if self.w1.is_meta:  # shape-only models (sizing, dry runs) have nothing to initialise
            return
        for i in range(self.num_local_experts):
            gen = torch.Generator().manual_seed((self.seed + self.expert_offset + i) % 2**64)
            for w in (self.w1, self.w3, self.w2):
                w[i].copy_(torch.randn(w.shape[1:], generator=gen) * self.init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] grouped by local expert (counts [L] rows each, in order) -> [N, D].

        One host sync per layer for the split sizes; a grouped GEMM can replace this loop.
        """
        outs = []
        for i, xe in enumerate(torch.split(x, counts.tolist())):
            h = gated(F.linear(xe, self.w1[i]), F.linear(xe, self.w3[i]), self.activation, self.swiglu_limit)
            outs.append(F.linear(h, self.w2[i]))
        return torch.cat(outs)
