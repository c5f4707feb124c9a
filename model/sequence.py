"""The model's view of the sequence it runs on: all of it on one device, one shard under sequence parallelism.

Every computation of the model that reaches across positions asks its module's ``sequence``
(a class attribute defaulting to ``WHOLE``) for what lies outside the local tokens: absolute
positions, the rows just before them (sliding-window keys, a compression window's look-back),
the compressed entries of the whole sequence, and whole-sequence counts that normalise
per-token means. On one device the answers are trivial and cost nothing.
``moesaic.parallel.sp`` swaps in a view of one contiguous, equal-length shard whose answers come
from the other shards (autograd-aware collectives), so the model itself stays single-device code
and computes the same numbers on a shard as on the whole sequence.

Decoding with a KV cache always runs on whole sequences (the cache holds the past).
"""

from __future__ import annotations

import torch


class WholeSequence:
    """This module holds every position of its sequences (shard 0 of 1)."""

    shards = 1  # equal, contiguous shards the sequence is split into
    index = 0  # the shard this module holds

    def offset(self, local_len: int) -> int:
        """Absolute position of the first local token, given the local sequence length."""
        return self.index * local_len

    def preceding(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The (up to) ``rows`` positions just before the local ones of a per-token t [B, S, ...]: none here."""
        return t[:, :0]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every shard's t [B, n, ...] concatenated in sequence order along dim 1 (differentiable)."""
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the shards (no gradient): whole-sequence counts."""
        return t


WHOLE = WholeSequence()
