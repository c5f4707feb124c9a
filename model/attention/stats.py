"""Attention statistics of the trainer's log steps: per-layer accumulators and the sink that holds them."""

from __future__ import annotations

import torch


class AttentionStats:
    """Named statistics of one attention layer, accumulated on the device while attached.

    ``means[name] = (sum, count)`` averages over whatever the count counts (query-heads for the
    kernel's masses); ``maxima[name]`` is a running max. Layers add their own names (CSA: the
    indexer's selection); the trainer reduces them over ranks at log steps, without a sync here.
    """

    def __init__(self) -> None:
        self.means: dict[str, tuple[torch.Tensor, int | torch.Tensor]] = {}
        self.maxima: dict[str, torch.Tensor] = {}

    def add_mean(self, name: str, total: torch.Tensor, count: int | torch.Tensor) -> None:
        """Add ``total`` over ``count`` items (a tensor count stays on the device: no sync)."""
        old_total, old_count = self.means.get(name, (0.0, 0))
        self.means[name] = (total.detach().float() + old_total, old_count + count)

    def add_max(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.maxima[name] = value if name not in self.maxima else torch.maximum(self.maxima[name], value)

    def add_masses(self, totals: torch.Tensor, query_heads: int, has_extra: bool) -> None:
        """The kernel's totals [window mass, compressed mass, sink mass, max logit] over query_heads rows."""
        self.add_mean("mass_window", totals[0], query_heads)
        if has_extra:
            self.add_mean("mass_compressed", totals[1], query_heads)
        self.add_mean("mass_sink", totals[2], query_heads)
        self.add_max("max_logit", totals[3])


class StatsSink:
    """The statistics of every layer that ran while it was passed to the model, by layer index."""

    def __init__(self) -> None:
        self.layers: dict[int, AttentionStats] = {}

    def layer(self, layer_idx: int) -> AttentionStats:
        return self.layers.setdefault(layer_idx, AttentionStats())

    def items(self) -> list[tuple[int, AttentionStats]]:
        """(layer, stats) in layer order: the same order on every rank, for the reductions."""
        return sorted(self.layers.items())
