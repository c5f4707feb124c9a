"""Routed experts through grouped_mm vs the per-expert loop they replaced, forward + backward.

    python benchmarks/grouped_experts.py [--tokens 4096] [--reps 7] [--threads 1] [--dtype float32]

The shapes of ``moe_dispatch.py`` (D=256, expert hidden 512, 8 experts, top-2: tokens x 2 rows,
split over the experts by a random top-2 routing). Both paths run on the same module and inputs,
alternating within each repetition; time is this process's CPU time (``time.process_time``: with
one thread the work done, whatever else loads a shared machine). Prints the median time of each and
the median of the paired ratios, grouped / loop. On CUDA the device is synchronised after each pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moesaic.model.moe import GroupedExperts

DIM, HIDDEN, EXPERTS, TOP_K = 256, 512, 8, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    experts = GroupedExperts(EXPERTS, DIM, HIDDEN, init_std=0.05).to(dev, dtype)
    g = torch.Generator().manual_seed(0)
    choice = torch.rand(args.tokens, EXPERTS, generator=g).topk(TOP_K, dim=1).indices.flatten()
    counts = torch.bincount(choice, minlength=EXPERTS).to(dev)
    x = torch.randn(args.tokens * TOP_K, DIM, generator=g).to(dev, dtype).requires_grad_()
    cot = torch.randn(args.tokens * TOP_K, DIM, generator=g).to(dev, dtype)
    clock = time.perf_counter if dev.type == "cuda" else time.process_time

    def run(path) -> float:
        start = clock()
        path(x, counts).backward(cot)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    paths = {"grouped_mm": experts.forward, "per-expert loop": experts._per_expert}
    for path in paths.values():  # warm-up
        run(path)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(args.reps):
        order = list(paths.items()) if rep % 2 == 0 else list(paths.items())[::-1]
        for name, path in order:
            times[name].append(run(path))
    ratios = [a / b for a, b in zip(times["grouped_mm"], times["per-expert loop"])]
    print(f"torch {torch.__version__}, {dev.type}, {args.threads} thread(s), {args.dtype}, {args.tokens} tokens x "
          f"top-{TOP_K}, D={DIM}, hidden {HIDDEN}, {EXPERTS} experts; median of {args.reps} fwd+bwd")
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.4f} s")
    print(f"grouped_mm / per-expert loop: {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}-{statistics.quantiles(ratios, n=4)[2]:.3f})")


if __name__ == "__main__":
    main()
