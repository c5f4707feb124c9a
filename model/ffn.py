"""The gated feed-forward used by dense layers, shared experts and (batched) routed experts.

``act(gate) * up`` with act = silu (SwiGLU, V4's clamp optional) or, for Gemma 4, gelu with the tanh
approximation (GeGLU; transformers' ``gelu_pytorch_tanh``), chosen by ``model.ffn_activation``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn


class _SwiGLU(torch.autograd.Function):
    """silu(clamp(gate)) * clamp(up), keeping only gate and up for backward.

    Autograd's chain of clamp, clamp, silu and mul keeps five [rows, hidden] tensors per call (both
    clamps' inputs, silu's input and output, the clamped up); here the backward recomputes them from
    the two pre-activations (V4 model step at 8k tokens: ~290 MiB less saved, 16 % of all activations).
    """

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.limit = limit
        gate, up = _clamped(gate, up, limit)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gate, up = ctx.saved_tensors
        gc, uc = _clamped(gate, up, ctx.limit)
        sig = torch.sigmoid(gc)
        d_up = g * gc * sig  # silu(gc) g
        d_gate = g * uc * sig * (1 + gc * (1 - sig))  # silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
        if ctx.limit > 0:  # clamp passes the gradient where the input is within the bounds, ends included
            d_gate.masked_fill_(gate > ctx.limit, 0.0)
            d_up.masked_fill_(up.abs() > ctx.limit, 0.0)
        return d_gate, d_up, None


def _clamped(gate: torch.Tensor, up: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """V4's clamp: gate capped above, up clamped to [-limit, limit]; 0 = no clamp."""
    if limit > 0:
        return gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return gate, up


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up with V4's clamp (``_clamped``)."""
    return _SwiGLU.apply(gate, up, limit)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The unary activation ``name`` (FFN_ACTIVATIONS), for gates outside a GLU (Gemma's PLE gate)."""
    if name == "gelu_tanh":
        return partial(F.gelu, approximate="tanh")
    return F.silu


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str, limit: float) -> torch.Tensor:
    """act(gate) * up: ``swiglu`` (clamped by ``limit``) for silu, GeGLU for gelu_tanh (no clamp, see validate)."""
    if activation == "silu":
        return swiglu(gate, up, limit)
    return activation_fn(activation)(gate) * up


class SwiGLU(nn.Module):
    """w2(act(w1 x) * w3 x), SwiGLU or (activation="gelu_tanh") GeGLU; names follow DeepSeek's official
    checkpoints (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, hidden: int, swiglu_limit: float = 0.0, activation: str = "silu") -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.swiglu_limit = swiglu_limit
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gated(self.w1(x), self.w3(x), self.activation, self.swiglu_limit))
