"""ZAYA1's residual scaling (MOSAIC_SPEC §3.4): learned per-channel scales and biases on both terms of a residual add.

    x = (sublayer + hidden_states_bias) * hidden_states_scale + (x + residual_bias) * residual_scale

Scales start at 1 and biases at 0 (a plain residual add); names are transformers' (``ZayaResidualScaling``).
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(dim))
        self.hidden_states_bias = nn.Parameter(torch.zeros(dim))
        self.residual_scale = nn.Parameter(torch.ones(dim))
        self.residual_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h [B,S,D] the sublayer's output, x [B,S,D] the residual stream (fp32 with model.fp32_residual)."""
        return (h + self.hidden_states_bias) * self.hidden_states_scale + (x + self.residual_bias) * self.residual_scale
