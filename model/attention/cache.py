"""Decode-time state of the attention layers: exactly what MODEL_SPEC §3.5 and §4 list, per layer.

* SWA (``SWACache``): the last ``window`` KV vectors and the position counter. A query only ever
  sees the ``window`` most recent keys. The buffer is a fixed-size rolling tensor in chronological
  order, which lets a multi-token step (prefill, or a chunk after a prefix) hand the kernel
  [past keys ; new keys] without index remapping.
* HCA (``CompressedCache`` with one stream): the window, every compressed entry emitted so far and
  the compressor's constant-size open-window state.
* CSA (``CompressedCache`` with two streams): the same plus the indexer's compressed keys and its
  compressor state.

Byte counts per layer: ``kv_bytes`` is what MODEL_SPEC §8.2 counts (filled window rows, compressed
entries, indexer keys), so it equals ``kv_accounting.layer_kv_bytes`` for the cache's format;
``state_bytes`` is the constant compressor state the formula leaves out; ``nbytes`` is everything
held, including the window rows allocated up front but not filled yet.
"""

from __future__ import annotations

from typing import Optional

import torch

from .compressor import Compressor, CompressorState, state_bytes


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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

    def kv_bytes(self) -> int:
        """Bytes of the cached vectors: the min(window, tokens seen) filled rows."""
        return tensor_bytes(self.kv[:, self.window - self.length:])

    def state_bytes(self) -> int:
        """Constant-size state outside the formula's count; an SWA layer has none."""
        return 0

    def nbytes(self) -> int:
        """Bytes held by this layer's cache (the window buffer is allocated in full up front)."""
        return tensor_bytes(self.kv)


class CompressedStream:
    """One compressor's decode state: every entry it emitted, [B, N, c], and its open-window state."""

    def __init__(self, compressor: Compressor, batch_size: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        self.entries = torch.zeros(batch_size, 0, compressor.out_dim, dtype=dtype, device=device)
        # The pooling runs in at least fp32, so the state does too.
        self.state: CompressorState = compressor.new_state(batch_size, device, torch.promote_types(dtype,
                                                                                                   torch.float32))

    @torch.no_grad()
    def absorb(self, compressor: Compressor, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed tokens x [B,S,D] at positions pos..pos+S-1; return all entries so far [B, N, c].

        From position 0 this is one vectorised ``prefill``; after that the tokens are stepped one by
        one (decode steps are single tokens; a multi-token continuation is rare and still exact).
        """
        if pos == 0:
            closed, self.state = compressor.prefill(x)
            new = [closed]
        else:
            new = [compressor.step(self.state, x[:, i:i + 1], pos + i) for i in range(x.shape[1])]
        self.entries = torch.cat([self.entries, *(e.to(self.entries.dtype) for e in new if e is not None)], dim=1)
        return self.entries


class CompressedCache(SWACache):
    """Window buffer plus compressed streams: HCA's entries, or CSA's entries and indexer keys."""

    def __init__(self, batch_size: int, window: int, head_dim: int, main: CompressedStream,
                 index: Optional[CompressedStream] = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(batch_size, window, head_dim, dtype=dtype, device=device)
        self.main, self.index = main, index

    def streams(self) -> list[CompressedStream]:
        return [self.main] + ([self.index] if self.index is not None else [])

    def _entry_bytes(self) -> int:
        return sum(tensor_bytes(s.entries) for s in self.streams())

    def kv_bytes(self) -> int:
        """Filled window rows + compressed entries (+ indexer keys): MODEL_SPEC §8.2's per-layer count."""
        return super().kv_bytes() + self._entry_bytes()

    def state_bytes(self) -> int:
        """The compressors' constant-size open-window state."""
        return sum(state_bytes(s.state) for s in self.streams())

    def nbytes(self) -> int:
        return super().nbytes() + self._entry_bytes() + self.state_bytes()
