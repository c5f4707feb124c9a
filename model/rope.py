"""Interleaved partial rotary embeddings with optional YaRN, as DeepSeek-V4 applies them.

V4 rotates only the trailing ``rope_dim`` channels of each head, pairing channels (2i, 2i+1) as
one complex number. SWA-only layers use base ``rope_theta``; CSA/HCA layers use
``compress_rope_theta`` with YaRN frequency interpolation (no mscale on cos/sin, MODEL_SPEC §2.3).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def yarn_inv_freq(inv_freq: torch.Tensor, base: float, factor: float, original_max_position: int,
                  beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Blend interpolated (inv_freq / factor) and original frequencies per dimension (YaRN)."""
    dim = 2 * inv_freq.numel()

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    return inv_freq / factor * (1 - keep) + inv_freq * keep


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables [..., rope_dim/2] for integer positions."""

    def __init__(self, rope_dim: int, theta: float, yarn_factor: float = 1.0,
                 original_max_position: int = 65536, beta_fast: float = 32.0, beta_slow: float = 1.0,
                 inv_freq: Optional[torch.Tensor] = None) -> None:
        """``inv_freq`` [rope_dim/2] replaces the frequencies derived from theta (``half_split_inv_freq``)."""
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
        if yarn_factor > 1.0:
            inv_freq = yarn_inv_freq(inv_freq, theta, yarn_factor, original_max_position, beta_fast, beta_slow)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [..., rope_dim/2]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [..., rope_dim] by the angles behind cos/sin.

    cos/sin must broadcast against [..., rope_dim/2]. ``inverse`` applies the conjugate rotation,
    which V4 uses to de-rotate attention outputs by the query position. The pairs are multiplied as
    complex numbers: one elementwise kernel each way instead of the six of real/imag arithmetic
    (same products and sums, so the same values; ~2.5x faster forward + backward on CPU at 16k tokens).
    """
    rotation = torch.complex(cos, -sin if inverse else sin)  # [..., rope_dim/2]
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [..., rope_dim/2] complex
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int,
              inverse: bool = False) -> torch.Tensor:
    """Rotate only the trailing ``rope_dim`` channels of x [..., C]; V4 puts RoPE last (MODEL_SPEC §2.3).

    ``split`` rather than two slices: its backward is one concatenation, where each slice's backward
    writes its gradient into a zero-filled tensor of x's full size and the two are then added.
    """
    plain, tail = x.split([x.shape[-1] - rope_dim, rope_dim], dim=-1)
    return torch.cat([plain, apply_rope(tail, cos, sin, inverse)], dim=-1)


def half_split_inv_freq(head_dim: int, theta: float, fraction: float, proportional: bool) -> torch.Tensor:
    """Frequencies of half-split RoPE (transformers' ``rotate_half`` family, MOSAIC_SPEC §0.1).

    "default": the first int(head_dim * fraction) channels rotate, with exponents over that rotary
    width. "proportional" (Gemma 4 global layers): the whole head rotates, exponents over head_dim,
    and only the first int(fraction * head_dim // 2) frequencies are non-zero (the rest are identity).
    """
    if proportional:
        angles = int(fraction * head_dim // 2)
        inv_freq = 1.0 / theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / head_dim)
        return torch.cat([inv_freq, torch.zeros(head_dim // 2 - angles)])
    rot = int(head_dim * fraction)
    return 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel i with channel i + r/2 of the leading r = 2 * cos.shape[-1] channels of x [..., C]."""
    rot = 2 * cos.shape[-1]
    head, rest = x.split([rot, x.shape[-1] - rot], dim=-1)
    x1, x2 = head.float().chunk(2, dim=-1)  # [..., r/2] each
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)
