"""Sequence parallelism on CPU: the longest trainable sequence and training tokens/s of one tiny V4 model,
sp=1 (one process) vs sp=2 (two processes).

    python benchmarks/sp_scaling.py [--lengths 2048 4096 8192 16384] [--budget-gib 1.0] [--reps 2] [--threads N]

The model: hidden 128, 4 layers SWA / CSA / HCA / CSA (4 heads x 64, window 128, m = 4 and 128,
indexer top-64), MoE FFNs (8 experts, top-2), fp32. Each (sp, length) case is a fresh torchrun
launch of sp processes on gloo with ``--threads`` threads each (default cores / sp: the same cores
for both; on a loaded machine one thread per rank can be faster, then sp=2 uses twice the cores), running
the trainer's own pieces: ``Topology``, ``build_engine`` (``apply_sequence_parallel``, DeepSpeed ZeRO-1
with the topology as mpu) and the sequence shard of a batch of one random sequence. A step is forward +
backward + optimizer step; time is the median of ``--reps`` steps after one warm-up step, and tokens/s is the
sequence length over it (the sp ranks share one sequence). Memory is per rank: peak ``ru_maxrss``
after the steps minus ``ru_maxrss`` once the engine is built (weights and optimizer state excluded).
The longest trainable length is the longest whose worst rank stays within ``--budget-gib``; lengths
are tried in increasing order and a configuration stops at the first one over budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import torch

MODEL = ["model.hidden_size=128", "model.num_layers=4", "model.layer_types=[swa,csa,hca,csa]",
         "model.ffn_types=[moe,moe,moe,moe]", "model.attention.common.num_heads=4",
         "model.attention.common.head_dim=64",
         "model.attention.common.window=128", "model.attention.menu.csa.ratio=4", "model.attention.menu.hca.ratio=128",
         "model.attention.menu.csa.index_topk=64", "model.attention.common.query_chunk=256", "model.moe.num_experts=8",
         "model.moe.top_k=2", "train.micro_batch_size=1", "train.global_batch_size=1", "train.zero_stage=1",
         "logging.wandb=disabled"]


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(sp: int, seq_len: int, reps: int) -> dict | None:
    """One case on this torchrun rank; rank 0 returns {time_s, peak_gib (worst rank)}."""
    import torch.distributed as dist

    from moesaic.configs import load_config
    from moesaic.parallel.topology import Topology
    from moesaic.trainer.data import sequence_shard
    from moesaic.trainer.distributed import destroy, init_distributed
    from moesaic.trainer.engine import build_engine

    init_distributed("cpu")
    cfg = load_config("tiny", MODEL + [f"data.seq_len={seq_len}", f"parallel.sp={sp}"])
    topology = Topology(cfg.parallel)
    engine, _, stepper = build_engine(cfg, topology)
    block = torch.randint(0, cfg.model.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, labels = sequence_shard(block, topology.sp_rank, sp)

    def step() -> float:
        dist.barrier()
        start = time.perf_counter()
        engine.backward(engine(inputs, labels=labels).loss)
        stepper.step()
        dist.barrier()
        return time.perf_counter() - start

    base = rss_bytes()
    step()  # warm-up
    times = [step() for _ in range(reps)]
    peak = torch.tensor([(rss_bytes() - base) / 2**30])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result = {"time_s": statistics.median(times), "peak_gib": peak.item()} if dist.get_rank() == 0 else None
    destroy()
    return result


def launch(sp: int, seq_len: int, reps: int, threads: int) -> dict | None:
    """The case in fresh processes; None if they failed (e.g. killed for memory)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={sp}", f"--master-port={port}", __file__,
           "--case", str(sp), str(seq_len), "--reps", str(reps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"sp={sp} S={seq_len}: failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--budget-gib", type=float, default=1.0, help="per-rank activation memory budget")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, help="threads per rank (default: cores / sp)")
    parser.add_argument("--case", nargs=2, type=int, metavar=("SP", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = run_case(*args.case, args.reps)
        if result is not None:
            print(json.dumps(result), flush=True)
        return

    results: dict[tuple[int, int], dict] = {}
    for sp in (1, 2):
        for seq_len in sorted(args.lengths):
            r = launch(sp, seq_len, args.reps, args.threads or max(1, (os.cpu_count() or 1) // sp))
            if r is None:
                break
            results[sp, seq_len] = r
            if r["peak_gib"] > args.budget_gib:
                break
    threads = args.threads or "cores / sp"
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {threads} threads per rank, fp32, gloo; median of "
          f"{args.reps} training steps (fwd + bwd + AdamW), batch 1; budget {args.budget_gib} GiB of activations "
          f"per rank")
    print("| S | sp | step s | tokens/s | peak GiB / rank | tokens/s vs sp=1 | memory vs sp=1 |")
    print("|---|---|---|---|---|---|---|")
    for (sp, seq_len), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        one = results.get((1, seq_len))
        speed = f"{one['time_s'] / r['time_s']:.2f}x" if one and sp > 1 else "-"
        memory = f"{r['peak_gib'] / one['peak_gib']:.2f}x" if one and sp > 1 else "-"
        print(f"| {seq_len} | {sp} | {r['time_s']:.2f} | {seq_len / r['time_s']:.0f} | {r['peak_gib']:.2f} | "
              f"{speed} | {memory} |")
    for sp in (1, 2):
        fits = [s for (p, s), r in results.items() if p == sp and r["peak_gib"] <= args.budget_gib]
        print(f"sp={sp}: longest trainable sequence within {args.budget_gib} GiB per rank: "
              f"{max(fits) if fits else 'none of those tried'}")


if __name__ == "__main__":
    main()
