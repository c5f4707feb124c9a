"""moesaic's dropless MoE layer vs DeepSpeed's native ``deepspeed.moe.layer.MoE`` (capacity-based
einsum dispatch): forward + backward time and peak memory on the same shapes, 1 and 2 processes.

    python benchmarks/moe_dispatch.py [--tokens 4096] [--reps 3]

Every rank holds ``--tokens`` tokens (batch x 512) and all experts are spread over the ranks
(expert parallelism = world size: moesaic's ``apply_expert_parallel``, DeepSpeed's ``ep_size``).
Both layers have the same router width, experts (SwiGLU, the same ``moesaic.model.ffn.SwiGLU``
module) and top-k; moesaic's shared expert is off. DeepSpeed runs twice: with capacity factor 1.25
(tokens over capacity dropped) and with ``drop_tokens=False`` (capacity = the largest load over
all ranks, so nothing is dropped). Each (layer, world) case is a fresh torchrun job with one
thread per rank; time is the median of ``--reps`` passes after a warm-up, the slowest rank's;
peak memory is the largest rank's ``ru_maxrss`` growth over those passes (CUDA: allocator peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from attention_scaling import peak_bytes

DIM, HIDDEN, EXPERTS, TOP_K, SEQ = 256, 512, 8, 2, 512
LAYERS = ("moesaic", "deepspeed cf=1.25", "deepspeed dropless")


def build(kind: str, world: int) -> nn.Module:
    """A layer with forward(x [B,S,D]) -> (y [B,S,D], aux loss)."""
    from moesaic.configs.schema import ModelConfig, MoEConfig
    from moesaic.model.ffn import SwiGLU
    from moesaic.model.moe import MoE

    if kind == "moesaic":
        moe = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, intermediate_size=HIDDEN, num_shared_experts=0,
                        score_func="softmax", swiglu_limit=0.0, seq_aux_loss_coef=0.01)
        layer = MoE(ModelConfig(hidden_size=DIM, moe=moe), 0)
        if world > 1:
            from moesaic.parallel.ep import apply_expert_parallel

            apply_expert_parallel(layer, world)
        return layer
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from moesaic.parallel.ep import expert_group_name

    expert_group_name(world)  # DeepSpeed's expert groups (what its engine would make), on its comm
    layer = DeepSpeedMoE(DIM, SwiGLU(DIM, HIDDEN), num_experts=EXPERTS, ep_size=world, k=TOP_K,
                         capacity_factor=1.25, eval_capacity_factor=1.25, drop_tokens=kind == "deepspeed cf=1.25",
                         use_rts=False)
    layer.set_deepspeed_parallelism()  # the engine's call: binds the layer to its expert-parallel group
    return DeepSpeedLayer(layer)


class DeepSpeedLayer(nn.Module):
    """DeepSpeed's MoE with moesaic's return convention (it also returns the expert counts)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, aux, _ = self.moe(x)
        return y, aux


def run_case(kind: str, tokens: int, reps: int) -> dict | None:
    """Inside torchrun: time this rank's layer, return the slowest/largest rank's numbers on rank 0."""
    import torch.distributed as dist

    from moesaic.trainer.distributed import destroy, init_distributed

    info = init_distributed("auto")
    world = dist.get_world_size()
    torch.manual_seed(0)
    layer = build(kind, world).to(info.device)
    gen = torch.Generator().manual_seed(info.rank)
    x = torch.randn(tokens // SEQ, SEQ, DIM, generator=gen).to(info.device).requires_grad_()

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        y, aux = layer(x)
        (y.square().mean() + aux).backward()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(info.device)
    base = torch.cuda.memory_allocated(info.device) if cuda else peak_bytes(info.device)
    step()  # warm-up
    times = [step() for _ in range(reps)]
    mine = torch.tensor([statistics.median(times), (peak_bytes(info.device) - base) / 2**20], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    destroy()
    return {"time_s": mine[0].item(), "peak_mib": mine[1].item()} if info.rank == 0 else None


def launch(kind: str, world: int, tokens: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
           "--case", kind, "--tokens", str(tokens), "--reps", str(reps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (multiple of 512)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = run_case(args.case, args.tokens, args.reps)
        if result is not None:
            print(json.dumps(result), flush=True)
        return

    results = {(kind, world): launch(kind, world, args.tokens, args.reps) for world in (1, 2) for kind in LAYERS}
    print(f"torch {torch.__version__}, 1 thread per rank, {args.tokens} tokens per rank, D={DIM}, expert hidden "
          f"{HIDDEN}, {EXPERTS} experts, top-{TOP_K}, fp32; median of {args.reps} fwd+bwd, slowest rank")
    print("| ranks (= EP) | layer | time s | peak MiB | time / moesaic | memory / moesaic |")
    print("|---|---|---|---|---|---|")
    for world in (1, 2):
        ours = results["moesaic", world]
        for kind in LAYERS:
            r = results[kind, world]
            print(f"| {world} | {kind} | {r['time_s']:.3f} | {r['peak_mib']:.0f} | "
                  f"{r['time_s'] / ours['time_s']:.2f} | {r['peak_mib'] / ours['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
