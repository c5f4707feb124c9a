"""The attention budget, measured: fixed layouts at three KV budgets, one elastic model, and the planner's layout.

    python benchmarks/attention_budget.py [--steps 150] [--seq-len 1024] [--eval-batches 8] [--threads 2]

A 4-layer V4-style model (hidden 64, 2 heads of 32, dense FFNs, window 64) on the Shakespeare demo corpus at
``--seq-len`` tokens, every run with the same seed, data order and schedule. Menu: CSA (ratio 4,
top-k 16), HCA (ratio 16), window-only SWA; KV bytes per token at a 1M context come from
kv_accounting (bf16). Runs:

(a) dedicated models at three budgets: high = 4 CSA, mid = 2 CSA + 2 window, low = 3 window + 1 HCA;
(b) one elastic model (modes csa, hca, window, drawn uniformly per layer per step), evaluated in each
    dedicated layout's modes;
(c) the planner at the mid budget, costs calibrated on the elastic model (trainer/budget_costs.py),
    its layout trained from scratch, against a uniform layout of equal bytes (4 x CSA at ratio 8) and
    3 random placements of the planner's own types (equal bytes by construction).

Validation loss: mean over the first ``--eval-batches`` x 2 validation sequences, the same for all;
the planner's calibration uses the first two of those batches.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

from moesaic.configs import load_config
from moesaic.configs.schema import Config
from moesaic.model.budget import layer_choices, plan
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.model.transformer import Transformer
from moesaic.model.attention.elastic import draw_modes
from moesaic.trainer.budget_costs import calibration_costs, mean_loss
from moesaic.trainer.data import prepare_data, sequence_shard
from moesaic.trainer.engine import build_optimizer
from moesaic.trainer.schedule import lr_multiplier

CONTEXT = 2**20
BATCH = 2
COMMON = "{num_heads: 2, head_dim: 32, rope_head_dim: 8, q_lora_rank: 32, o_groups: 2, o_lora_rank: 32, window: 64}"
CSA = "{kind: csa, ratio: 4, index_heads: 2, index_head_dim: 16, index_topk: 16}"
MENU = {"csa": CSA, "csa8": "{kind: csa, ratio: 8, index_heads: 2, index_head_dim: 16, index_topk: 16}",
        "hca": "{kind: hca, ratio: 16}", "window": "{kind: swa}",
        "elastic": f"{{kind: elastic, modes: {{csa: {CSA}, hca: {{kind: hca, ratio: 16}}, window: {{kind: swa}}}}}}"}
FIXED = {"high": ["csa"] * 4, "mid": ["csa", "csa", "window", "window"], "low": ["window"] * 3 + ["hca"]}


def config(layout: list[str], args: argparse.Namespace) -> Config:
    return load_config("tiny", [
        "model.hidden_size=64", "model.num_layers=4", f"model.layer_types=[{','.join(layout)}]",
        "model.ffn_types=[dense,dense,dense,dense]", "model.dense_intermediate_size=128",
        f"model.attention.common={COMMON}", *(f"model.attention.menu.{k}={v}" for k, v in MENU.items()),
        f"data.seq_len={args.seq_len}", f"train.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}",
        f"train.steps={args.steps}", "train.warmup_steps=10", "train.lr=3e-3", "logging.wandb=disabled"])


def kv_per_token(cfg: Config) -> float:
    return sum(layer.total for layer in layer_kv_bytes(cfg.model, CONTEXT, "bf16")) / CONTEXT


def train(cfg: Config, data, seed: int = 0) -> Transformer:
    """Plain single-process AdamW steps over the trainer's data order (elastic modes drawn per step)."""
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train))
    sampler = data.sampler(cfg.train.seed)
    model.train()
    for step in range(cfg.train.steps):
        draw_modes(model, step, cfg.train.seed)
        batch = data.train.batch(sampler.indices(step * cfg.train.global_batch_size, cfg.train.global_batch_size))
        model(*sequence_shard(batch, 0, 1)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model


def set_modes(model: Transformer, modes: list[str]) -> None:
    for layer, mode in zip(model.layers, modes):
        layer.attn.set_mode(mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare_data(config(FIXED["high"], args))
    val = [data.val.batch(list(range(i * BATCH, (i + 1) * BATCH))) for i in range(args.eval_batches)]
    rows: list[tuple[str, list[str], float, float]] = []

    def run(name: str, layout: list[str]) -> float:
        cfg = config(layout, args)
        loss = mean_loss(train(cfg, data), val)
        rows.append((name, layout, kv_per_token(cfg), loss))
        print(f"{name}: {layout} val {loss:.4f} KV {rows[-1][2]:.1f} B/token ({time.perf_counter() - start:.0f}s)",
              flush=True)
        return loss

    dedicated = {budget: run(f"(a) dedicated {budget}", layout) for budget, layout in FIXED.items()}
    elastic_cfg = config(["elastic"] * 4, args)
    elastic = train(elastic_cfg, data)
    for budget, layout in FIXED.items():
        set_modes(elastic, layout)
        loss = mean_loss(elastic, val)
        rows.append((f"(b) elastic at {budget}", layout, kv_per_token(config(layout, args)), loss))
        gap = loss - dedicated[budget]
        print(f"elastic at {budget}: val {loss:.4f} (dedicated {dedicated[budget]:.4f}, gap {gap:+.4f})", flush=True)
    set_modes(elastic, [None] * 4)

    budget = kv_per_token(config(FIXED["mid"], args)) * CONTEXT
    choices = layer_choices(elastic_cfg.model, CONTEXT, args.seq_len, "bf16")
    base, costs = calibration_costs(elastic_cfg.model, elastic.state_dict(), val[:2], choices)
    chosen = plan(choices, costs, budget)
    planned = [c.entry for c in chosen.choices]
    print(f"planner at {budget / CONTEXT:.1f} B/token: {planned}; costs {[[round(x, 4) for x in r] for r in costs]}",
          flush=True)
    planner = run("(c) planner (mid budget)", planned)
    uniform = run("(c) uniform 4 x CSA ratio 8", ["csa8"] * 4)
    randoms = []
    for seed in range(3):
        layout = planned[:]
        random.Random(seed).shuffle(layout)
        randoms.append(run(f"(c) random placement, seed {seed}", layout))

    elapsed = time.perf_counter() - start
    print(f"\n{args.steps} steps of {BATCH} x {args.seq_len} tokens per run; {elapsed:.0f}s in all\n")
    print("| run | layers | KV B/token at 1M (bf16) | val loss |")
    print("|---|---|---|---|")
    for name, layout, kv, loss in rows:
        print(f"| {name} | {','.join(layout)} | {kv:.1f} | {loss:.4f} |")
    gaps = {b: r[3] - dedicated[b] for b, r in zip(FIXED, rows[3:6])}
    print(f"\nelastic - dedicated: {', '.join(f'{b} {g:+.4f}' for b, g in gaps.items())} "
          f"(target <= 0.05: {'met' if all(g <= 0.05 for g in gaps.values()) else 'missed'})")
    mean_random = sum(randoms) / len(randoms)
    print(f"planner {planner:.4f} vs uniform {uniform:.4f} ({'met' if planner <= uniform else 'missed'}) "
          f"vs random mean {mean_random:.4f} ({'met' if planner < mean_random else 'missed'}); "
          f"calibration base loss {base:.4f}")
    assert math.isfinite(planner)


if __name__ == "__main__":
    main()
