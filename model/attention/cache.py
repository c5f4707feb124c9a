"""Decode-time state of an SWA layer: the last ``window`` KV vectors and the position counter.

A query only ever sees the ``window`` most recent keys, so that is all an SWA layer keeps
(MODEL_SPEC §3.5, "SWA ring buffer"). The buffer is a fixed-size rolling tensor in chronological
order, which lets a multi-token step (prefill, or a chunk after a prefix) hand the kernel
[past keys ; new keys] without index remapping. CSA/HCA caches extend this with their compressed
entries and compressor state.
"""

from __future__ import annotations

import torch


class SWACache:
    """Rolling buffer [B, window, c] of rotated KV vectors; inference only (stored keys are detached)."""

    def __init__(self, batch_size: int, window: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, start_pos: int = 0) -> None:
        self.kv = torch.zeros(batch_size, window, head_dim, dtype=dtype, device=device)
        self.window = window
        self.length = 0  # valid rows at the end of self.kv
        self.pos = start_pos  # absolute position of the next token; start_pos offsets a whole sequence

    def extend(self, kv_new: torch.Tensor) -> torch.Tensor:
        """Append kv_new [B,S,c]; return [past valid keys ; kv_new] for the kernel's window."""
        keys = torch.cat([self.kv[:, self.window - self.length:], kv_new], dim=1)  # [B, length + S, c]
        keep = min(self.window, keys.shape[1])
        self.kv = torch.cat([self.kv[:, keep:], keys[:, -keep:].detach()], dim=1)  # still [B, window, c]
        self.length = keep
        self.pos += kv_new.shape[1]
        return keys

    def nbytes(self) -> int:
        """Bytes held by this layer's cache (the buffer is allocated in full up front)."""
        return self.kv.numel() * self.kv.element_size()
