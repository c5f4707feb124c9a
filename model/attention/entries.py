"""Compressed key = value entries that CSA/HCA layers add to the window keys, and moving them by index.

Shared by the attention kernels (torch and compiled), the HCA GEMM path and the indexer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class CompressedKV:
    """Compressed key=value entries a CSA/HCA layer adds to each query's window keys (see module doc)."""

    kv: torch.Tensor  # [B, N, c]
    idx: Optional[torch.Tensor] = None  # [B, S, k] long, -1 = unused slot
    mask: Optional[torch.Tensor] = None  # [B or 1, S, N] bool, True = visible

    def __post_init__(self) -> None:
        if (self.idx is None) == (self.mask is None):
            raise ValueError("CompressedKV needs exactly one of idx (selected entries) or mask (visible entries)")


def per_block(values: torch.Tensor, block: int) -> torch.Tensor:
    """values [S] as rows of ``block`` -> [ceil(S / block), block]; the last row is padded with the last
    value, so every row's min and max are those of its own values (one reduction for all blocks)."""
    return torch.cat([values, values[-1:].expand(-values.shape[0] % block)]).view(-1, block)


def _flat_rows(idx: torch.Tensor, num_entries: int) -> torch.Tensor:
    """idx [B,S,k] into [B, N, c] entries -> flat row numbers [B*S*k] of the [B*N, c] view (-1 reads row 0)."""
    batch = torch.arange(idx.shape[0], device=idx.device).view(-1, 1, 1)
    return (idx.clamp(min=0) + num_entries * batch).flatten()


def gather_entries(entries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """entries [B, N, c] picked by idx [B, S, k] (-1 reads row 0, to be masked) -> [B, S, k, c].

    index_select on the flattened rows: on CPU it and its backward (index_add) are about twice as
    fast as advanced indexing and its accumulating index_put.
    """
    B, N, c = entries.shape
    return entries.reshape(B * N, c).index_select(0, _flat_rows(idx, N)).view(*idx.shape, c)


def add_gathered_grad(grad_entries: torch.Tensor, idx: torch.Tensor, grads: torch.Tensor) -> None:
    """The adjoint of ``gather_entries``: adds grads [B,S,k,c] into grad_entries [B,N,c] at idx rows, in place
    (-1 picks add to row 0, so their grads must be 0)."""
    B, N, c = grad_entries.shape
    grad_entries.view(B * N, c).index_add_(0, _flat_rows(idx, N), grads.reshape(-1, c).to(grad_entries.dtype))
