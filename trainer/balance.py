"""Aux-loss-free router balancing across ranks, once per optimizer step."""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum


def update_router_biases(routers: list) -> None:
    """Sum every router's per-expert token counts over all ranks, update each bias once, reset counts.

    One all-reduce for all layers; since all ranks see the same global counts, biases stay identical
    across data-, expert- and sequence-parallel ranks.
    """
    if not routers:
        return
    counts = all_reduce_sum(torch.stack([r.load_counts for r in routers]))  # [layers, experts]
    for router, layer_counts in zip(routers, counts):
        router.update_bias(layer_counts)
        router.reset_load_counts()
