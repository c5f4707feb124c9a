"""Token dispatchers: move routed token copies to their experts and the results back.

This is the seam where expert parallelism plugs in: ``parallel/`` swaps ``MoE.dispatcher`` (and
``MoE.experts`` for the local slice) without touching the layer. Every dispatcher implements

``dispatch(x [T, D], topk_idx [T, k]) -> (expert_x [N, D], counts [L] long, state)``
    ``expert_x`` holds the token copies the local experts must process, grouped by local expert
    in ascending order; ``counts[i]`` rows belong to local expert i (``L`` = experts held by this
    rank: all ``E`` here, ``E / ep`` under expert parallelism, where ``N`` is what this rank
    received). ``state`` is opaque, owned by the dispatcher, and only passed back to ``combine``.

``combine(expert_out [N, D], gates [T, k], state) -> y [T, D]``
    ``y[t] = sum_j gates[t, j] * (output of token t's j-th expert)``, back on the rank and in the
    order of the tokens given to ``dispatch``.

An ``AllToAllDispatcher`` would sort locally as below, exchange the groups with all-to-all in
``dispatch`` (keeping the split sizes in its state), and reverse the exchange in ``combine``
before the same weighted un-permute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalDispatchState:
    order: torch.Tensor  # [T*k] flat (token, slot) index of each expert_x row


class LocalDispatcher:
    """Single-device dispatch: a stable sort of the (token, slot) pairs by expert."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LocalDispatchState]:
        flat_idx = topk_idx.reshape(-1)  # [T*k], slot j of token t at t*k + j
        order = flat_idx.argsort(stable=True)  # stable: tokens keep their order within an expert
        expert_x = x.index_select(0, order // topk_idx.shape[1])  # [T*k, D]
        # index_add_ rather than bincount, which syncs with the host on CUDA.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        counts.index_add_(0, flat_idx, torch.ones_like(flat_idx))
        return expert_x, counts, LocalDispatchState(order)

    def combine(self, expert_out: torch.Tensor, gates: torch.Tensor, state: LocalDispatchState) -> torch.Tensor:
        tokens, k = gates.shape
        # Un-permute with a scatter to unique rows (deterministic, unlike an index_add over tokens).
        unsorted = expert_out.new_zeros(expert_out.shape).index_copy(0, state.order, expert_out)
        per_slot = unsorted.view(tokens, k, -1)  # [T, k, D]
        return torch.bmm(gates.to(expert_out.dtype).unsqueeze(1), per_slot).squeeze(1)  # [T, D]
