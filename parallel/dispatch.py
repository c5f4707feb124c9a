"""Dropless expert-parallel token dispatch: token copies travel to the rank that owns their expert.

``AllToAllDispatcher`` implements the dispatcher interface of ``moesaic.model.moe.dispatcher``
(``dispatch`` / ``combine``) over an expert-parallel process group of ``ep`` ranks, rank r owning
global experts ``[r*L, (r+1)*L)`` (``L = E / ep``):

1. sort the (token, slot) pairs by global expert, exactly as the single-device ``LocalDispatcher``
   (so the two share the ordering and the weighted un-permute);
2. exchange the per-expert counts (all-to-all of ``E`` integers), which gives every split size;
3. send each rank's contiguous block of rows with ``all_to_all_single`` and variable splits
   (no capacity, no padding, no dropped token; empty splits are fine, gloo included);
4. the received rows are ordered by source rank, then local expert: a stable sort by local expert
   gives the grouped layout ``GroupedExperts`` expects, keeping source order within an expert.

``combine`` reverses 4 and 3 and applies the local weighted un-permute. The row exchanges are
functional ``all_to_all_single_autograd`` (as in torchtitan), whose backward is the reverse
exchange, so an expert's weight gradient sums the contributions of every rank's tokens that
reached it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moesaic.model.moe.dispatcher import LocalDispatcher, LocalDispatchState


@dataclass
class AllToAllState:
    local: LocalDispatchState  # the sort of this rank's (token, slot) pairs by global expert
    send_splits: list[int]  # [ep] rows sent to each rank (= rows returned by combine)
    recv_splits: list[int]  # [ep] rows received from each rank
    regroup: torch.Tensor  # [N] received row of each expert_x row (source-major -> expert-major)


class AllToAllDispatcher:
    """Dispatch to the ``num_experts / ep`` experts of each rank of ``group`` with all-to-all."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts cannot be split over {self.ep} expert-parallel ranks")
        self.num_local = num_experts // self.ep
        self.group = group
        self.local = LocalDispatcher(num_experts)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        sorted_x, counts, local_state = self.local.dispatch(x, topk_idx)  # [T*k, D], counts [E] by global expert
        recv_counts = torch.empty_like(counts)  # [ep * L]: block s = what source s sends to my L experts
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        # Variable splits need the sizes on the host: the one sync per layer under EP (the local path has none).
        send_splits = counts.view(self.ep, self.num_local).sum(1).tolist()
        recv_matrix = recv_counts.view(self.ep, self.num_local)  # [ep, L]
        recv_splits = recv_matrix.sum(1).tolist()
        received = all_to_all_single_autograd(sorted_x, recv_splits, send_splits, self.group)  # [N, D] source-major
        local_expert = torch.arange(self.num_local, device=x.device).repeat(self.ep)  # [ep * L]
        rows = sum(recv_splits)  # N, known on the host already: no second sync for repeat_interleave's size
        regroup = local_expert.repeat_interleave(recv_counts, output_size=rows).argsort(stable=True)  # [N]
        return received[regroup], recv_matrix.sum(0), AllToAllState(local_state, send_splits, recv_splits, regroup)

    def combine(self, expert_out: torch.Tensor, gates: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        source_major = expert_out.new_zeros(expert_out.shape).index_copy(0, state.regroup, expert_out)  # [N, D]
        returned = all_to_all_single_autograd(source_major, state.send_splits, state.recv_splits, self.group)
        return self.local.combine(returned, gates, state.local)  # [T, D]
