"""Resuming refuses what it cannot honour, in one line, before anything is written (trainer/resume.py)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from moesaic.configs import ConfigError, load_config
from moesaic.trainer.checkpoint import CheckpointError
from moesaic.trainer.resume import find_resume

from trainrun import FAST, command, env, latest, train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The overrides of a finished 2-step run, resuming it."""
    tmp = tmp_path_factory.mktemp("resume")
    common = FAST + [f"data.cache_dir={tmp / 'cache'}", f"run_dir={tmp / 'run'}", "train.steps=2", "train.eval_every=2"]
    train(common)
    return common + ["checkpoint.resume=auto"]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("change, error, message", [
    ("model.hidden_size=32", ConfigError, "model.hidden_size=32 disagrees with the checkpoint .* \\(64\\)"),
    ("model.moe.num_experts=8", ConfigError, "model.moe.num_experts=8 disagrees"),
    ("train.global_batch_size=16", ConfigError, "train.global_batch_size=16 differs from the checkpoint .* \\(8\\): "
                                                "resuming would continue at another data position"),
    ("data.seq_len=64", ConfigError, "data.seq_len=64 differs"),
    ("train.seed=1", ConfigError, "train.seed=1 differs"),
    ("checkpoint.resume=/no/such/step_00000002", CheckpointError,
     "checkpoint.resume=/no/such/step_00000002: no such checkpoint directory"),
])
def test_refused_resume_names_the_field(run: list[str], change: str, error: type, message: str) -> None:
    cfg = load_config("tiny", run + [change])
    with pytest.raises(error, match=message):
        find_resume(cfg, Path(cfg.run_dir) / "checkpoints", print)


def test_allowed_changes_resume(run: list[str]) -> None:
    """Micro-batch size (the same samples per step, split differently), steps and learning rate may change."""
    cfg = load_config("tiny", run + ["train.micro_batch_size=2", "train.steps=4", "train.lr=1e-3"])
    assert find_resume(cfg, Path(cfg.run_dir) / "checkpoints", print) == latest(Path(cfg.run_dir))


def test_refused_resume_is_one_line_and_leaves_the_run_untouched(run: list[str]) -> None:
    run_dir = Path(load_config("tiny", run).run_dir)
    before = digests(run_dir)
    proc = subprocess.run(command(run + ["model.hidden_size=32"]), capture_output=True, text=True, env=env(),
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("moesaic: error: model.hidden_size=32 disagrees")
    assert digests(run_dir) == before  # checkpoint files (SHA-256), config.yaml and metrics alike
