"""Helpers for tests that run ``moesaic train`` in fresh processes (DeepSpeed keeps global state)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

# A small model on the shakespeare corpus: fast enough for many launches, real enough to learn.
FAST = [
    "model.hidden_size=64", "model.num_layers=2", "model.layer_types=[swa,swa]", "model.ffn_types=[dense,moe]",
    "model.dense_intermediate_size=128", "model.attention.common.num_heads=2", "model.attention.common.head_dim=32",
    "model.attention.common.q_lora_rank=32", "model.attention.common.o_lora_rank=32",
    "model.attention.common.window=16",
    "model.moe.num_experts=4", "model.moe.intermediate_size=64",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=2",
    "train.log_every=1", "train.eval_every=4", "train.eval_batches=1", "train.sample_tokens=8",
    "logging.wandb=disabled", "logging.progress_bar=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(overrides: list[str], nproc: int = 1, config: str = "tiny") -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "moesaic.launch.cli", "train", config, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "moesaic.launch.cli", "train", config, *overrides]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(overrides: list[str], nproc: int = 1, timeout: float = 600,
          config: str = "tiny") -> subprocess.CompletedProcess:
    proc = subprocess.run(command(overrides, nproc, config), capture_output=True, text=True, timeout=timeout,
                          env=env())
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def train_briefly(tmp_path: Path, config: str, *overrides: str, kv_context: int = 4096) -> dict[str, float]:
    """16 steps of ``config`` (hidden size 64, 64 tokens, logging every 4 steps); asserts the loss falls by 0.3
    nats from step 4 to 16 and returns every logged metric (its last value)."""
    run = tmp_path / "run"
    train([f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "model.hidden_size=64", "data.seq_len=64",
           *overrides, "train.steps=16", "train.micro_batch_size=4", "train.global_batch_size=4",
           "train.warmup_steps=2", "train.log_every=4", "train.eval_every=100", "train.sample_tokens=0",
           "logging.wandb=disabled", "logging.progress_bar=false", f"logging.kv_contexts=[{kv_context}]"],
          config=config)
    by_step = losses(run)
    assert by_step[16] < by_step[4] - 0.3, by_step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {k: v for row in rows for k, v in row.items()}


def final_params(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]


def latest(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].float() - b[k].float()).abs().max()}"
