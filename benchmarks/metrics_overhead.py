"""Cost of the metrics panel (MoE balance, attention/KV statistics, throughput) in training time.

    python benchmarks/metrics_overhead.py [--config tiny] [--log-every 10] [--rounds 10] [--heatmap-every 0]
                                          [--threads 1] [key=value ...]

One process trains the config's model (DeepSpeed engine, real data) and alternates log windows of
``--log-every`` optimizer steps with the panel on and off, so both see the same machine:

* on: routers accumulate their statistics every forward, the last step of the window runs with
  attention statistics armed, then ``MetricsPanel.collect`` reduces and the sinks log the panel
  (JSONL + wandb offline; a heatmap table and image every ``--heatmap-every`` steps).
* off: routers skip the accumulation, nothing is armed, the sinks log the loss only.

Two measurements of the same run:

1. End to end: median CPU seconds of this process (``time.process_time``; with ``--threads 1``
   the work done, whatever else loads a shared machine) and wall seconds per window, and the
   median over rounds of on / off - 1 of the paired windows (the order inside a round alternates),
   with its quartiles: on a busy shared machine this is only as precise as that spread.
2. Attributed: the main thread's CPU time inside each piece of panel work, timed where it runs
   (router accumulation, the kernel's statistics, ``arm`` + ``collect``, the extra logging:
   ``sinks.log`` of the on windows minus that of the off windows), as a share of an off window.
   This is the panel's cost without the noise; its per-call timers make it slightly pessimistic.
   The compiled CPU attention kernel (``_window_cpu``) sums its statistics inside its loops, where no
   timer can reach: the first armed calls' inputs are kept and, after the windows, each is re-run
   with and without statistics (median of ``--retime`` runs each); the difference times the armed
   calls per window is that kernel's share.

wandb's own service process runs beside the trainer whether the panel is on or not and is in
neither CPU figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Callable

import torch

from moesaic.configs import load_config
from moesaic.model.attention import _window_cpu, kernels
from moesaic.model.attention.csa import CompressedSparseAttention
from moesaic.model.attention.stats import AttentionStats
from moesaic.model.moe import Router
from moesaic.trainer.distributed import destroy, init_distributed
from moesaic.trainer.loop import Trainer
from moesaic.trainer.metrics import MetricsPanel
from moesaic.trainer.sinks import MetricSinks

# CPU seconds of the main thread per panel component, summed over the measured windows.
spent: dict[str, float] = defaultdict(float)
KERNEL_STATS = "attention statistics in the compiled kernel (re-timed)"


def timed(name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.thread_time() - start
    return wrapper


class ArmedKernelCalls:
    """Wraps ``_window_cpu.forward_op``: counts its armed calls and keeps copies of the first ones' inputs."""

    STATS, OUTPUTS = 9, (10, 11, 12)  # forward_op's argument positions: stats; out, lse, mass (written)

    def __init__(self, keep: int) -> None:
        self.plain, self.keep, self.count, self.kept = _window_cpu.forward_op, keep, 0, []

    def __call__(self, *args):
        if args[self.STATS] is not None:
            self.count += 1
            if len(self.kept) < self.keep:
                self.kept.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        return self.plain(*args)

    def stats_seconds(self, runs: int) -> float:
        """Mean over the kept calls of (armed - plain) median main-thread CPU seconds."""
        def median_time(args: list) -> float:
            times = []
            for _ in range(runs):
                start = time.thread_time()
                self.plain(*args)
                times.append(time.thread_time() - start)
            return statistics.median(times)

        extra = []
        for args in self.kept:
            plain = list(args)
            plain[self.STATS] = None
            extra.append(median_time([AttentionStats() if i == self.STATS else a for i, a in enumerate(args)])
                         - median_time(plain))
        return statistics.fmean(extra) if extra else 0.0


def window(trainer: Trainer, panel: MetricsPanel, sinks: MetricSinks, steps: int, on: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``steps`` optimizer steps plus the log step's metrics work."""
    panel.set_enabled(on)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(steps):
        sums = trainer.train_step(panel.arm() if on and i == steps - 1 else None)
    metrics = {"train/loss": (sums[0] / sums[2]).item()}
    if on:
        metrics.update(panel.collect(trainer.step, tokens_per_s=1.0))
    start = time.thread_time()
    sinks.log(trainer.step, metrics)
    spent[f"log {'on' if on else 'off'}"] += time.thread_time() - start
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--heatmap-every", type=int, default=0, help="steps between heatmaps (0 = off)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--retime", type=int, default=20, help="runs per re-timed compiled kernel call and mode")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = tempfile.mkdtemp(prefix="metrics_overhead_")
    cfg = load_config(args.config, [f"run_dir={run_dir}", "logging.wandb=offline", "logging.progress_bar=false",
                                    f"train.log_every={args.log_every}", f"train.steps={10**6}",
                                    f"logging.moe_heatmap_every={args.heatmap_every}", *args.overrides])
    dist_info = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, dist_info)
        panel = MetricsPanel(trainer.model, cfg, dist_info.device, dist_info.world_size)
        sinks = MetricSinks(cfg, trainer.run_dir, resume_step=None)
        window(trainer, panel, sinks, args.log_every, on=True)  # warm-up: allocator, wandb, matplotlib
        window(trainer, panel, sinks, args.log_every, on=False)
        spent.clear()
        Router._accumulate_stats = timed("router statistics, every forward", Router._accumulate_stats)
        kernels._record = timed("attention statistics, armed forwards", kernels._record)
        CompressedSparseAttention._record_selection = timed("attention statistics, armed forwards",
                                                            CompressedSparseAttention._record_selection)
        _window_cpu.forward_op = armed = ArmedKernelCalls(keep=8)
        panel.arm = timed("arm + collect (reduce, compute, reset)", panel.arm)
        panel.collect = timed("arm + collect (reduce, compute, reset)", panel.collect)
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for r in range(args.rounds):
            for on in (r % 2 == 0, r % 2 == 1):
                times[on].append(window(trainer, panel, sinks, args.log_every, on))
        sinks.close()
        _window_cpu.forward_op = armed.plain
        if armed.count:
            spent[KERNEL_STATS] = armed.count * armed.stats_seconds(args.retime)
    finally:
        destroy()
    report(args, cfg, trainer, dist_info.device, times)


def report(args: argparse.Namespace, cfg, trainer: Trainer, device: torch.device,
           times: dict[bool, list[tuple[float, float]]]) -> None:
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    print(f"config {args.config} {' '.join(args.overrides)}: {trainer.model.num_params() / 1e6:.2f}M params, "
          f"{tokens} tokens/step, log every {args.log_every} steps, heatmap every {args.heatmap_every or 'never'}, "
          f"{args.rounds} rounds, {args.threads} thread(s), device {device}\n")
    print("| panel | CPU s / window | CPU s / step | wall s / window |\n|---|---|---|---|")
    med = {on: [statistics.median(t[i] for t in times[on]) for i in (0, 1)] for on in (False, True)}
    for on in (False, True):
        print(f"| {'on' if on else 'off'} | {med[on][0]:.3f} | {med[on][0] / args.log_every:.4f} | {med[on][1]:.3f} |")
    for i, what in ((0, "CPU"), (1, "wall")):
        q1, q2, q3 = statistics.quantiles([100 * (a[i] / b[i] - 1) for a, b in zip(times[True], times[False])], n=4)
        print(f"\nend-to-end overhead, {what} time: median of paired on/off - 1 {q2:+.2f}% "
              f"(quartiles {q1:+.2f}% .. {q3:+.2f}%)", end="")
    windows = len(times[True])
    spent["extra logging (sinks.log on - off)"] = spent.pop("log on") - spent.pop("log off")
    print("\n\n| attributed panel work, per on window | CPU ms | % of an off window |\n|---|---|---|")
    for name, seconds in [*spent.items(), ("total", sum(spent.values()))]:
        print(f"| {name} | {1e3 * seconds / windows:.2f} | {100 * seconds / windows / med[False][0]:.3f}% |")


if __name__ == "__main__":
    main()
