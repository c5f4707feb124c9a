"""The process groups of a run, owned by one object that is also DeepSpeed's ``mpu``.

world = dp x sp. Sequence-parallel groups are ``sp`` consecutive ranks (rank r holds shard
``r % sp`` of the sequences of data-parallel rank ``r // sp``); data-parallel groups are the ranks
with the same shard, ``sp`` apart. Expert-parallel groups are DeepSpeed's: ``ep`` consecutive ranks
over the whole world (they may coincide with, contain or cut across sequence-parallel groups),
expert-data-parallel groups ``ep`` apart (``parallel.ep.expert_group_name``).

DeepSpeed learns of sequence parallelism only through an ``mpu`` (PLATFORM_NOTES): the config
keys do not make it reduce gradients over the sequence ranks. ``Topology`` is that mpu. It
reports tensor/model parallelism of 1 with no group (DeepSpeed's own ``parallel_state_sp``
reports the sequence group as the model-parallel one, and then the MoE layer treats it as tensor
parallelism and fails); ZeRO partitions and reduces over the sequence-data-parallel group (all
ranks) and, under ZeRO-1/2, divides gradients by ``dp``, i.e. sums them over the shards of a
sequence, which is why each shard's loss is its share of the whole sequence's
(``moesaic.model.sequence``). ZeRO-0 would clip with norms all-reduced over that missing
model-parallel group (the world), so configs reject ZeRO-0 with sp > 1.
"""

from __future__ import annotations

import torch.distributed as dist

from moesaic.configs import ParallelConfig, check_topology

from .ep import expert_group_name


class Topology:
    """dp x sp ranks, ep over any of them; create on every rank, in the same order, after init."""

    def __init__(self, parallel: ParallelConfig) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        check_topology(parallel, world)
        sp, ep = parallel.sp, parallel.ep
        self.world, self.rank, self.sp, self.ep = world, rank, sp, ep
        self.dp = world // sp
        self.sp_rank, self.dp_rank = rank % sp, rank // sp
        # Every rank creates every group (new_group is collective), keeping its own.
        for d in range(self.dp):
            group = dist.new_group(list(range(d * sp, (d + 1) * sp)))
            if d == self.dp_rank:
                self.sp_group = group
        for s in range(sp):
            group = dist.new_group(list(range(s, world, sp)))
            if s == self.sp_rank:
                self.dp_group = group
        self.seq_dp_group = dist.new_group(list(range(world)))
        self.expert_group_name = expert_group_name(ep) if ep > 1 else None

    def __repr__(self) -> str:
        return f"Topology(world={self.world} = dp {self.dp} x sp {self.sp}, ep={self.ep})"

    # ---- DeepSpeed mpu interface ------------------------------------------------------------
    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.seq_dp_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.world

    def get_sequence_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_model_parallel_group(self) -> None:
        return None

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
