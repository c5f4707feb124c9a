"""The model learns real text, and aux-loss-free balancing acts once per optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainrun import FAST, final_params, latest, train


def test_validation_loss_beats_unigram_baseline(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = train(FAST + [f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=200",
                        "train.eval_every=50", "train.eval_batches=4", "train.log_every=10", "train.lr=5e-3"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    baseline = float(out.stdout.split("unigram baseline ")[1].split()[0])
    print(f"val loss by eval: {val}; unigram baseline {baseline:.3f} nats")
    assert 6.0 < baseline < 6.6  # 4096-token BPE on Shakespeare
    assert val[0] > val[-1]
    assert val[-1] < baseline - 0.5, f"final val loss {val[-1]:.3f} not clearly below unigram {baseline:.3f}"
    assert "sample: 'ROMEO:" in out.stdout


def test_router_bias_updates_once_per_optimizer_step(tmp_path: Path) -> None:
    """Two micro-batches per step: each bias moves by exactly +-rate per optimizer step, never twice."""
    steps, rate = 3, 0.01
    run = tmp_path / "run"
    train(FAST + [f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", f"train.steps={steps}",
                  "train.micro_batch_size=4", "train.global_batch_size=8", f"model.moe.bias_update_rate={rate}"])
    bias = final_params(latest(run))["layers.1.ffn.gate.expert_bias"].double()
    units = bias / rate
    assert torch.allclose(units, units.round(), atol=1e-4), units  # whole steps of +-rate
    assert units.abs().max().item() == pytest.approx(steps, abs=1e-4)  # the busiest expert: -rate every step
    assert units.abs().max().item() < 2 * steps  # per-micro-batch updates could reach 2 x steps
    assert (units.round().remainder(2) == steps % 2).all()  # every expert moved at every step (parity)
