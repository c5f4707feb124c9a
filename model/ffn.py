"""The SwiGLU feed-forward used by dense layers, shared experts and (batched) routed experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up with V4's clamp: gate capped above, up clamped to [-limit, limit]; 0 = no clamp."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """w2(swiglu(w1 x, w3 x)); names follow DeepSeek's official checkpoints (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, hidden: int, swiglu_limit: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.swiglu_limit))
