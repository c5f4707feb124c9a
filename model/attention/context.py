"""What one forward pass hands every layer: the sequence view, decode caches, a statistics sink, shared state.

The Transformer builds one ``ForwardContext`` per call and passes it down (Transformer -> Block ->
attention, and to the MoE router for the sequence view), instead of other packages setting
attributes on the layers. Sequence parallelism changes only the model's sequence view
(``Transformer.sequence``); the trainer asks for statistics by passing a ``StatsSink``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..sequence import WHOLE, WholeSequence
from .stats import AttentionStats, StatsSink


@dataclass
class ForwardContext:
    sequence: WholeSequence = WHOLE  # the positions this forward holds: all, or a shard under SP
    caches: Optional[Sequence[Any]] = None  # per decoder layer decode state (``make_cache``); None in training
    stats: Optional[StatsSink] = None  # collects per-layer attention statistics when given (log steps)
    shared: dict[str, Any] = field(default_factory=dict)  # state a layer hands to a later one (e.g. shared KV)
    # [B,S] bool, True where a token ends a document (EOS) of the packed sequences; None: documents unknown.
    doc_ends: Optional[torch.Tensor] = None

    def cache(self, layer_idx: int) -> Any:
        """Layer ``layer_idx``'s decode cache, or None (training, or an MTP block)."""
        if self.caches is None or layer_idx >= len(self.caches):
            return None
        return self.caches[layer_idx]

    def start(self, length: int, cache: Any = None) -> int:
        """Absolute position of the first of ``length`` local tokens: after the cached ones, or at this shard's
        offset (a host int: what needs it to size work must not read the device)."""
        return cache.pos if cache is not None else self.sequence.offset(length)

    def positions(self, length: int, device: torch.device, cache: Any = None) -> torch.Tensor:
        """Absolute positions [length] of the local tokens (``start`` onwards)."""
        start = self.start(length, cache)
        return torch.arange(start, start + length, device=device)

    def stats_for(self, layer_idx: int) -> Optional[AttentionStats]:
        return None if self.stats is None else self.stats.layer(layer_idx)
