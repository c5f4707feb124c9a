"""Training throughput of one device: tokens/s, peak memory and MFU of the trainer's own step.

    python benchmarks/gpu_step.py [--config configs/v4_1b.yaml] [--steps 10] [--warmup 3] [--peak-flops 989e12]
                                  [--json PATH] [--smoke] [key=value ...]

One process builds the engine exactly as training does (``trainer.engine.build_engine``: DeepSpeed,
the config's dtype and ZeRO stage, ``train.activation_checkpointing``) and runs optimizer steps of
``train.global_batch_size`` random sequences of ``data.seq_len`` tokens (micro-batches of
``train.micro_batch_size``: forward, backward, DeepSpeed step, router bias update). Time: the wall
time of ``--steps`` steps after ``--warmup`` steps, the device synchronised at both ends; memory: the
device allocator's peak over the timed steps (CPU: the process's peak RSS). MFU counts the trainer's
own model FLOPs per token (``trainer.metrics.flops_per_token``: 6 x active non-embedding parameters +
each attention layer's real work) against ``--peak-flops``: the bf16 dense peak of the device
(default 989e12, H100/H200 SXM). ``--smoke`` runs the tiny V4 config for 2 steps on whatever device is
there (the CPU check that the script works; its MFU means nothing).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attention_scaling import peak_bytes

SMOKE = ["model.vocab_size=512", "data.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.dtype=fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/v4_1b.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=989e12, help="device bf16 dense peak FLOP/s")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--smoke", action="store_true", help="tiny V4 config, 2 steps: checks the script runs")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    from moesaic.configs import load_config
    from moesaic.parallel.topology import Topology
    from moesaic.trainer.balance import update_router_biases
    from moesaic.trainer.distributed import destroy, init_distributed
    from moesaic.trainer.engine import build_engine
    from moesaic.trainer.metrics import flops_per_token

    config, overrides = (("configs/v4_tiny.yaml", SMOKE + args.overrides) if args.smoke
                         else (args.config, args.overrides))
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    cfg = load_config(config, ["logging.wandb=disabled", *overrides])
    info = init_distributed(cfg.train.device)
    device = info.device
    engine, _, stepper = build_engine(cfg, Topology(cfg.parallel))
    model = engine.module
    t = cfg.train
    micro = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
               .to(device) for _ in range(micro)]

    def step() -> None:
        for batch in batches:
            out = engine(batch[:, :-1], labels=batch[:, 1:])
            engine.backward(out.loss)
            stepper.step()
        update_router_biases(model.routers())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * t.global_batch_size * cfg.data.seq_len / elapsed
    fpt = flops_per_token(model, cfg)
    result = {
        "config": config, "overrides": overrides, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": t.dtype,
        "activation_checkpointing": t.activation_checkpointing, "seq_len": cfg.data.seq_len,
        "global_batch": t.global_batch_size, "micro_batch": t.micro_batch_size,
        "params_total": model.num_params(), "params_active": model.num_params(active_only=True),
        "steps": steps, "step_time_s": elapsed / steps, "tokens_per_s": tokens_per_s,
        "peak_memory_gib": peak_bytes(device) / 2**30, "flops_per_token": fpt,
        "tflops_per_s": fpt * tokens_per_s / 1e12, "mfu": fpt * tokens_per_s / args.peak_flops,
    }
    print(json.dumps(result))
    print(f"| {result['device']} | {t.dtype} | {t.activation_checkpointing} | {cfg.data.seq_len} x "
          f"{t.global_batch_size} | {result['step_time_s']:.3f} | {tokens_per_s:,.0f} | "
          f"{result['peak_memory_gib']:.1f} | {result['tflops_per_s']:.1f} | {100 * result['mfu']:.1f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    destroy()


if __name__ == "__main__":
    main()
