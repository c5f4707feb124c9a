"""Gemma-4-style cross-layer KV sharing vs the same model without it: KV-cache bytes and training step time.

    python benchmarks/kv_sharing.py [--lengths 4096 8192 16384] [--reps 3] [--rounds 2] [--threads 2]

The model is Gemma 4's layer pattern at a CPU size: six GQA layers, sliding (window 512) and global
(k_eq_v, proportional RoPE, wider heads) as [s, s, g, s, s, g], dense FFNs (so attention is what
differs). "shared": the last three layers read the K/V of the last own-KV layer of their type (layers
3, 4 <- 1; 5 <- 2), Gemma's num_kv_shared_layers = 3 rule; "own": the same layers computing their own.
KV bytes come from kv_accounting (window-aware, bf16, one sequence); time is the best of ``--reps``
forward + backward passes of the LM loss (batch 1, fp32) after a warm-up, both layouts alternating
within each round so that a slow spell of the host affects both.
"""

from __future__ import annotations

import argparse
import time

import torch

from moesaic.configs.schema import AttentionConfig, ModelConfig
from moesaic.model import Transformer
from moesaic.model.kv_accounting import layer_kv_bytes

WINDOW = 512
SLIDING = dict(kind="gqa", num_heads=4, num_kv_heads=2, head_dim=64, window=WINDOW, v_norm=True, scale=1.0)
GLOBAL = dict(kind="gqa", num_heads=4, num_kv_heads=1, head_dim=128, k_eq_v=True, v_norm=True, scale=1.0,
              rope_type="proportional", rope_fraction=0.25, rope_theta=1e6)


def config(shared: bool) -> ModelConfig:
    menu = {"sliding": SLIDING, "global": GLOBAL,
            "sliding_shared": {**SLIDING, "kv_source": 1}, "global_shared": {**GLOBAL, "kv_source": 2}}
    tail = ["sliding_shared", "sliding_shared", "global_shared"] if shared else ["sliding", "sliding", "global"]
    return ModelConfig(vocab_size=512, hidden_size=256, num_layers=6, layer_types=["sliding", "sliding", "global",
                                                                                   *tail],
                       ffn_types=["dense"] * 6, dense_intermediate_size=512, attention=AttentionConfig(menu=menu))


def step_time(model: Transformer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for name, shared in (("own", False), ("shared", True)):
        torch.manual_seed(0)
        models[name] = Transformer(config(shared))
    print("| tokens | KV own (MiB, bf16) | KV shared (MiB) | KV ratio | step own (s) | step shared (s) | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for tokens in [*args.lengths, 131072]:
        kv = {name: sum(layer.total for layer in layer_kv_bytes(m.cfg, tokens, "bf16")) / 2**20
              for name, m in models.items()}
        times = {name: float("inf") for name in models}
        if tokens in args.lengths:
            ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(tokens))
            for model in models.values():
                step_time(model, ids)  # warm-up
            for _ in range(args.rounds):
                for name, model in models.items():
                    times[name] = min(times[name], *(step_time(model, ids) for _ in range(args.reps)))
                    model.zero_grad(set_to_none=True)
        timing = (f"{times['own']:.3f} | {times['shared']:.3f} | {times['shared'] / times['own']:.3f}"
                  if tokens in args.lengths else "- | - | -")
        print(f"| {tokens} | {kv['own']:.2f} | {kv['shared']:.2f} | {kv['shared'] / kv['own']:.3f} | {timing} |")


if __name__ == "__main__":
    main()
