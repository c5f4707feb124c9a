"""Set-up faults: no validation split is an explicit mode (never a NaN val loss); an exception on rank 0 while
preparing data ends every rank with the same one-line error instead of a hang."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

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
