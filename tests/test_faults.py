"""Pre-emption and numerical faults: checkpoint on SIGTERM, skip non-finite steps, roll back, abort."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest

from moesaic.trainer import checkpoint as ck
from trainrun import FAST, assert_identical, command, env, final_params, latest, losses, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"data.cache_dir={tmp_path_factory.mktemp('data_cache')}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_exits_75_and_resumes_bit_identically(tmp_path: Path, cache: str) -> None:
    common = FAST + [cache, "train.steps=30", "checkpoint.every=100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(common + [f"run_dir={straight}"])
    proc = subprocess.Popen(command(common + [f"run_dir={stopped}"]), env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = stopped / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    ckpt = latest(stopped)
    step = int(ckpt.name.split("_")[1])
    assert 3 <= step < 30 and "received signal" in out
    ck.verify(ckpt)
    train(common + [f"run_dir={stopped}", "checkpoint.resume=auto"])
    assert losses(straight) == losses(stopped)
    assert_identical(final_params(latest(straight)), final_params(latest(stopped)))


@pytest.mark.parametrize("zero", [0, 1])
def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path, cache: str, zero: int) -> None:
    """At every ZeRO stage (the skip is moesaic's, on the device: test_step_guard)."""
    run = tmp_path / "run"
    out = train(FAST + [cache, f"run_dir={run}", "train.steps=8", "train.inject_nan_at=[4]",
                        f"train.zero_stage={zero}"])
    assert "step 5: non-finite loss or gradient, update skipped (1 in a row)" in out.stdout
    rows = {r["step"]: r for r in _rows(run)}
    assert [rows[s]["train/skipped_steps"] for s in (4, 5, 8)] == [0, 1, 1]
    assert "train/loss" not in rows[5]  # the skipped step's NaN is not averaged into the log
    assert all(r["train/loss"] == r["train/loss"] for r in rows.values() if "train/loss" in r)
    params = final_params(latest(run))
    assert all(p.isfinite().all() for p in params.values())


def test_repeated_faults_roll_back_then_abort_with_checkpoint_intact(tmp_path: Path, cache: str) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(command(FAST + [cache, f"run_dir={run}", "train.steps=20", "checkpoint.every=4",
                                          "train.inject_nan_at=[5,6]", "train.max_bad_steps=2",
                                          "train.max_rollbacks=1"]),
                          capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "2 non-finite steps in a row; rolling back to" in proc.stdout and "step_00000004" in proc.stdout
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("moesaic: error: training diverged at step 7 (2 non-finite steps in a row) after 1 "
                                "rollback(s)"), last_line
    assert "step_00000004 is intact" in last_line
    good = latest(run)
    assert good.name == "step_00000004"
    ck.verify(good)
    assert all(p.isfinite().all() for p in final_params(good).values())


def test_loss_spike_rolls_back_once_and_training_finishes(tmp_path: Path, cache: str) -> None:
    run = tmp_path / "run"
    out = train(FAST + [cache, f"run_dir={run}", "train.steps=10", "checkpoint.every=4", "train.spike_zscore=3",
                        "train.spike_window=4", "train.inject_spike_at=[6]", "train.max_rollbacks=1"])
    assert "step 7: spike; rolling back to" in out.stdout and "step_00000004 with a new data order" in out.stdout
    assert out.stdout.count("rolling back") == 1
    rows = _rows(run)
    assert rows[-1]["step"] == 10 and rows[-1]["train/rollbacks"] == 1
    assert max(r["train/loss"] for r in rows if "train/loss" in r) < 20  # the x100 step was never logged
    assert all(p.isfinite().all() for p in final_params(latest(run)).values())


def test_step_classification() -> None:
    """A non-finite loss is "skipped" when the guard left its update out and "corrupt" (rolled back) when the
    update went in with a finite gradient; a finite loss far above the recent ones is a spike."""
    from moesaic.trainer.loop import Trainer

    me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(spike_zscore=3.0)))
    recent: deque[float] = deque([2.0, 2.1, 1.9, 2.0], maxlen=8)
    assert Trainer._check_step(me, math.nan, True, recent) == "skipped"
    assert Trainer._check_step(me, math.inf, False, recent) == "corrupt"
    assert Trainer._check_step(me, 9.0, False, recent) == "spike"
    assert Trainer._check_step(me, 2.05, False, recent) is None and recent[-1] == 2.05
