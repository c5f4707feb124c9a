"""Set-up faults: no validation split is an explicit mode (never a NaN val loss); too few validation sequences
for expert parallelism's collective forwards is one line on every rank; an exception on rank 0 while preparing
data ends every rank with the same one-line error instead of a hang."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from moesaic.configs import ConfigError, load_config
from moesaic.trainer.loop import Trainer
from trainrun import FAST, command, env, train


def test_no_validation_split_is_explicit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = train(FAST + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run}", "train.steps=2",
                        "train.eval_every=1", "data.val_fraction=0"])
    assert "no validation: data.val_fraction=0 holds out no text, so val/loss is not computed" in out.stdout
    assert "final val loss" not in out.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("val/loss" in r for r in rows)
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN anywhere


@pytest.mark.multiproc
def test_rank0_setup_error_ends_every_rank_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "not_a_dir").write_text("")  # the cache directory is a file: rank 0 fails creating it
    start = time.monotonic()
    proc = subprocess.run(command(FAST + [f"data.cache_dir={tmp_path / 'not_a_dir'}", f"run_dir={tmp_path / 'run'}"],
                                  nproc=2), capture_output=True, text=True, env=env(), timeout=300)
    elapsed = time.monotonic() - start
    line = (f"moesaic: error: data preparation failed on rank 0: NotADirectoryError: [Errno 20] Not a directory: "
            f"'{tmp_path / 'not_a_dir' / 'tokenizers'}'")
    assert proc.returncode != 0 and proc.stderr.count(line) == 2, proc.stderr[-3000:]  # both ranks, same line
    assert "[rank0]:" not in proc.stderr and "[rank1]:" not in proc.stderr  # no worker traceback (torchrun's own
    # report of the failed workers follows)
    print(f"both ranks ended {elapsed:.1f}s after the launch (process start-up included)")


@pytest.mark.parametrize("val, eval_batches, dp, expected", [
    (296, 1, 2, 2), (5, 3, 4, 4), (0, 1, 2, 0),
    (296, 1, 4, "train.eval_batches=1 x train.micro_batch_size=2 validation sequences per evaluation are fewer than "
                "the 4 data-parallel ranks"),
    (1, 1, 2, "data.val_fraction=0.01 gives 1 validation sequences, fewer than the 2 data-parallel ranks"),
    (3, 1, 4, "data.val_fraction=0.01 gives 3 validation sequences, fewer than the 4 data-parallel ranks"),
])
def test_expert_parallel_validation_needs_a_sequence_per_rank(val: int, eval_batches: int, dp: int,
                                                              expected: int | str) -> None:
    """Expert-parallel forwards are collective, so every data-parallel rank scores the same number of
    validation sequences: the total is cut to a multiple of the ranks, and none left is refused."""
    cfg = load_config("tiny", FAST + ["parallel.ep=2", "data.val_fraction=0.01", f"train.eval_batches={eval_batches}",
                                      "train.micro_batch_size=2"])
    trainer = SimpleNamespace(cfg=cfg, data=SimpleNamespace(val=range(val)), dp=dp)
    if isinstance(expected, int):
        assert Trainer.val_sequences(trainer) == expected
        return
    with pytest.raises(ConfigError) as exc:
        Trainer.val_sequences(trainer)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.multiproc
def test_too_few_validation_sequences_per_evaluation_for_expert_parallelism_is_one_line(tmp_path: Path) -> None:
    overrides = FAST + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", "parallel.ep=2",
                        "train.micro_batch_size=1", "train.global_batch_size=2", "train.eval_batches=1"]
    proc = subprocess.run(command(overrides, nproc=2), capture_output=True, text=True, env=env(), timeout=300)
    line = ("moesaic: error: train.eval_batches=1 x train.micro_batch_size=1 validation sequences per evaluation are "
            "fewer than the 2 data-parallel ranks that expert parallelism scores together; raise train.eval_batches")
    assert proc.returncode != 0 and proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step
