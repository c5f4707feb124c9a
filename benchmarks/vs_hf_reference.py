"""moesaic vs transformers' DeepseekV4ForCausalLM (the eager reference): one training step (forward +
backward of the LM loss) on the same small V4 model, same weights, batch 1, fp32, at growing lengths.

    python benchmarks/vs_hf_reference.py [--lengths 1024 2048 4096 8192 16384] [--hf-max 8192]
                                         [--reps 2] [--threads N] [--clock wall|cpu]

The model: hidden 256, 4 heads of 64, window 64, layers [SWA, CSA (m=4, top-64 of 8 index heads),
HCA (m'=128), CSA], mHC with 4 streams, 8 routed experts top-2 + 1 shared (the first layer hash
routed), vocab 4096: 10.4M parameters. moesaic builds it, the parent process writes it once as a
native and a transformers checkpoint, and every (implementation, length) case loads it in a fresh
subprocess, so peak memory is its own: peak = growth of ``ru_maxrss`` over the timed passes past
the value after one 256-token pass (which does the lazy imports). transformers is skipped above
``--hf-max`` (its CSA materialises [S, S/4] scores per head and its HCA a dense [S, S + S/128]
mask: ~40 GB at 16k). Time is the best (minimum) of ``--reps`` passes after that short warm-up, by wall
clock and by the process's CPU clock; ``--clock`` picks the one the ratios use. Both run in
training mode: moesaic's step also computes its indexer KL loss and router statistics, which
transformers does not have.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import Transformer
from moesaic.model.attention.presets import v4_attention
from moesaic.model.interop import export_hf, load_native, save_native

IMPLS = ("moesaic", "transformers")


def bench_config() -> ModelConfig:
    a = v4_attention(num_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=128,
                     window=64, csa_ratio=4, hca_ratio=128, index_heads=8, index_head_dim=32, index_topk=64,
                     query_chunk=256)
    return ModelConfig(vocab_size=4096, hidden_size=256, num_layers=4, layer_types=["swa", "csa", "hca", "csa"],
                       hc_mult=4, attention=a, moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=256,
                                                             num_hash_layers=1))


def load(impl: str, root: Path) -> torch.nn.Module:
    if impl == "moesaic":
        return load_native(root / "native")
    from transformers import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM.from_pretrained(root / "hf").float()


def run_case(impl: str, seq_len: int, reps: int, root: Path) -> dict:
    model = load(impl, root).train()
    gen = torch.Generator().manual_seed(0)

    def step(n: int) -> tuple[float, float, float]:
        ids = torch.randint(0, 4096, (1, n), generator=gen)
        wall, cpu = time.perf_counter(), time.process_time()
        if impl == "moesaic":  # the targets transformers uses: ids[t + 1] for t < n - 1
            out = model(ids, labels=torch.cat([ids[:, 1:], ids.new_full((1, 1), -100)], dim=1))
            loss, lm_loss = out.loss, out.lm_loss  # loss adds the indexer's KL training loss
        else:  # shifts the labels itself
            loss = lm_loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu, lm_loss.item()

    step(256)  # lazy imports and one-time set-up stay out of the peak
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    walls, cpus, losses = zip(*(step(seq_len) for _ in range(reps)))
    return {"wall": min(walls), "cpu": min(cpus), "loss": losses[0],
            "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--hf-max", type=int, default=8192, help="longest length transformers runs at")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="the time the ratios use")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "SEQ_LEN", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.reps, Path(args.case[2]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = Transformer(bench_config())
        save_native(model, root / "native")
        export_hf(root / "native", root / "hf")
        results: dict[tuple[str, int], dict] = {}
        for seq_len in args.lengths:
            for impl in IMPLS:
                if impl == "transformers" and seq_len > args.hf_max:
                    continue
                cmd = [sys.executable, __file__, "--case", impl, str(seq_len), str(root), "--reps", str(args.reps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[impl, seq_len] = json.loads(out.splitlines()[-1])
                print(f"{impl} S={seq_len}: {results[impl, seq_len]}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads() if not args.threads else args.threads} threads, "
          f"cpu; {model.num_params() / 1e6:.1f}M parameters; best of {args.reps} fwd+bwd, batch 1, fp32; "
          f"ratios by {args.clock} time")
    print("| S | impl | wall s | cpu s | peak MiB | LM loss | transformers / moesaic time "
          "| transformers / moesaic memory |")
    print("|---|---|---|---|---|---|---|---|")
    t = args.clock
    for seq_len in args.lengths:
        ours, theirs = results["moesaic", seq_len], results.get(("transformers", seq_len))
        for impl, r in (("moesaic", ours), ("transformers", theirs)):
            if r is None:
                print(f"| {seq_len} | transformers | - | - | - | - | (skipped: > --hf-max) | |")
                continue
            ratios = (f"{theirs[t] / ours[t]:.1f}x | {theirs['peak_mib'] / ours['peak_mib']:.1f}x"
                      if theirs is not None and impl == "transformers" else " | ")
            print(f"| {seq_len} | {impl} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['peak_mib']:.0f} | {r['loss']:.4f} | "
                  f"{ratios} |")


if __name__ == "__main__":
    main()
