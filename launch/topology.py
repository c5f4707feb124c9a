"""What a launch would run: process groups, per-rank batch and a memory estimate, without workers.

Group layouts are those ``moesaic.parallel.topology.Topology`` creates: sequence-parallel groups
are ``sp`` consecutive ranks and data-parallel groups stride over them; expert-parallel groups are
``ep`` consecutive ranks of the whole world and expert-data-parallel groups stride over them.
"""

from __future__ import annotations

import torch

from ..configs import Config

GIB = 2**30


def _groups(world: int, size: int, consecutive: bool) -> list[list[int]]:
    if consecutive:
        return [list(range(i, i + size)) for i in range(0, world, size)]
    stride = world // size
    return [list(range(i, world, stride)) for i in range(stride)]


def _fmt(groups: list[list[int]], limit: int = 4, width: int = 8) -> str:
    def one(g: list[int]) -> str:
        return str(g) if len(g) <= width else f"[{', '.join(map(str, g[:width - 1]))}, ..., {g[-1]}]"

    shown = " ".join(one(g) for g in groups[:limit])
    return shown + (f" ... ({len(groups)} groups)" if len(groups) > limit else "")


def param_counts(cfg: Config) -> tuple[int, int]:
    """(non-expert, routed-expert) parameter counts, from a shape-only (meta) model."""
    from ..model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return sum(p.numel() for p in model.parameters()) - expert, expert


def memory_per_rank(cfg: Config, world: int, dense: int, expert: int) -> dict[str, float]:
    """Bytes of weights, gradients and AdamW state per rank under the configured ZeRO stage.

    Dense tensors are ZeRO-partitioned over all ranks (the sequence-data-parallel group), expert
    tensors are sharded over ``ep`` and partitioned over the expert-data-parallel group; bf16 adds an
    fp32 master copy, held by the optimizer.
    """
    t, p = cfg.train, cfg.parallel
    local = {"dense": (dense, world), "expert": (expert / p.ep, world // p.ep)}
    w_bytes = 2 if t.dtype == "bf16" else 4
    opt_bytes = 8 + (4 if t.dtype == "bf16" else 0)
    out = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    for count, group in local.values():
        out["weights"] += count * w_bytes
        out["gradients"] += count * w_bytes / (group if t.zero_stage >= 2 else 1)
        out["optimizer"] += count * opt_bytes / (group if t.zero_stage >= 1 else 1)
    return out


def describe(cfg: Config, world: int) -> str:
    p, t = cfg.parallel, cfg.train
    dp = world // p.sp
    dense, expert = param_counts(cfg)
    mem = memory_per_rank(cfg, world, dense, expert)
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    lines = [
        f"topology: world {world} = dp {dp} x sp {p.sp}; ep {p.ep} (expert-data-parallel {world // p.ep})",
        f"  sp groups: {_fmt(_groups(world, p.sp, True))}",
        f"  dp groups: {_fmt(_groups(world, dp, False))}",
        f"  ep groups: {_fmt(_groups(world, p.ep, True))}",
        f"  expert-dp groups: {_fmt(_groups(world, world // p.ep, False))}",
        f"batch: global {t.global_batch_size} sequences of {cfg.data.seq_len} = micro {t.micro_batch_size} "
        f"x dp {dp} x accumulation {accum}",
        f"parameters: {(dense + expert) / 1e6:,.1f}M ({expert / 1e6:,.1f}M in routed experts, "
        f"{cfg.model.moe.num_experts // p.ep} experts per rank per MoE layer)",
        f"memory per rank (ZeRO-{t.zero_stage}, {t.dtype}): weights {mem['weights'] / GIB:.2f} GiB, gradients "
        f"{mem['gradients'] / GIB:.2f} GiB, optimizer {mem['optimizer'] / GIB:.2f} GiB, total "
        f"{sum(mem.values()) / GIB:.2f} GiB before activations",
    ]
    return "\n".join(lines)
