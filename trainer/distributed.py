"""Process-group set-up and the few collectives the trainer needs.

DeepSpeed is initialised here so that the CPU traps from PLATFORM_NOTES are handled in one
place: the accelerator is chosen before DeepSpeed is imported, and the shared-memory comm op
(a 90 s JIT compile on a clean machine) is disabled because gloo does not need it. CPU runs also
keep freed host memory for reuse (``host_memory``).
"""

from __future__ import annotations

import gc
import importlib
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .host_memory import keep_freed_memory


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create, for a single process) the default process group via DeepSpeed."""
    cuda = use_cuda(device)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_freed_memory()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun tasks (moesaic slurm), no torchrun
        for key, slurm_key in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS"),
                               ("LOCAL_RANK", "SLURM_LOCALID")):
            os.environ[key] = os.environ[slurm_key]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_under_torchrun(backend)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts a group that already exists
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def _init_under_torchrun(backend: str) -> None:
    """Join torchrun's store under a per-restart prefix.

    torchrun keeps its store across elastic restarts without prefixing it, so restarted workers
    read the previous attempt's gloo addresses and hang or fail to connect; a fresh key space per
    attempt (TORCHELASTIC_RESTART_COUNT) makes restarts reliable. DeepSpeed then adopts the group.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"moesaic/attempt_{attempt}", store),
                            rank=rank, world_size=world)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (no-op for a single process); a host tensor goes over ``host_group``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=host_group() if t.device.type == "cpu" else None)
    return t


_host_group: Optional[dist.ProcessGroup] = None


def host_group() -> Optional[dist.ProcessGroup]:
    """The group for host tensors (flags every rank must agree on): the default group under gloo, a gloo
    group beside NCCL (which reduces device tensors only), so that agreeing on a host value never waits
    for the GPU's queue. Every rank makes the first call at the same point (it creates the group)."""
    global _host_group
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group
def broadcast_text(text: str | None) -> str | None:
    """Rank 0's ``text`` on every rank (a collective; ``text`` on the others is ignored)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [text]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return text


def destroy() -> None:
    """Tear the groups down explicitly, then drop what still references their work: gloo sometimes aborts
    at interpreter exit ("terminate called without an active exception") when its worker threads
    release tensors while Python is finalising (pytorch/pytorch#179291)."""
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
