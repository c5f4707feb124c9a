"""Expert-parallel checkpoints end to end (``moesaic train`` under torchrun): exact resume at the same
EP degree, resharded resume across EP degrees and world sizes, and the start-up error of a bad EP."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from moesaic.parallel.portable import full_model_state
from moesaic.trainer import checkpoint as ck

from trainrun import FAST, assert_identical, command, env, latest, losses, train

TOL = 1e-6


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"data.cache_dir={tmp_path_factory.mktemp('data_cache')}"


def _assert_close(a: dict, b: dict, what: str, relative: bool = False) -> float:
    """Max difference of matching entries, relative for losses (a loss of 8.3 has an fp32 spacing of 9.5e-7)."""
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())}"
    worst = 0.0
    for k in a:
        x, y = torch.as_tensor(a[k], dtype=torch.float64), torch.as_tensor(b[k], dtype=torch.float64)
        worst = max(worst, ((x - y).abs() / (y.abs() if relative else 1)).max().item())
    assert worst <= TOL, f"{what} differ by {worst:.3g}"
    return worst


@pytest.mark.multiproc
def test_resume_same_ep_is_exact_and_across_ep_continues(tmp_path: Path, cache: str) -> None:
    # lr 1e-4 so that 1e-6 on the weights is 1% of an Adam step (see test_ep.py): restarting the
    # Adam moments or step count at resharding would move them by ~1e-4.
    common = FAST + [cache, "train.steps=6", "checkpoint.every=3", "train.zero_stage=2", "train.lr=1e-4"]
    ep2, ep1 = tmp_path / "ep2", tmp_path / "ep1"
    train(common + [f"run_dir={ep2}", "parallel.ep=2"], nproc=2)
    train(common + [f"run_dir={ep1}"], nproc=1)
    mid2, mid1 = (run / "checkpoints" / ck.tag_for(3) for run in (ep2, ep1))
    manifest = ck.verify(mid2)
    on_disk = {str(p.relative_to(mid2)) for p in mid2.rglob("*") if p.is_file() and p.name != ck.MANIFEST}
    assert on_disk == set(manifest["files"]), "every file of the checkpoint is in its manifest"
    assert {f"layer_0_expert_{g}_mp_rank_00_model_states.pt" for g in range(4)} <= on_disk
    assert manifest["ep"] == 2 and manifest["world_size"] == 2
    after3 = {s: v for s, v in losses(ep2).items() if s > 3}

    same = tmp_path / "same"
    out = train(common + [f"run_dir={same}", "parallel.ep=2", f"checkpoint.resume={mid2}"], nproc=2)
    assert "resharding" not in out.stdout
    assert losses(same) == after3  # bit-identical floats
    assert_identical(full_model_state(latest(ep2)), full_model_state(latest(same)))

    down = tmp_path / "ep2_to_ep1"  # world 2 -> 1
    out = train(common + [f"run_dir={down}", f"checkpoint.resume={mid2}"], nproc=1)
    assert "resharding" in out.stdout
    ep1_after3 = {s: v for s, v in losses(ep1).items() if s > 3}
    loss_diff = _assert_close(losses(down), ep1_after3, "EP 2->1 losses vs uninterrupted EP=1", relative=True)
    param_diff = _assert_close(full_model_state(latest(down)), full_model_state(latest(ep1)), "EP 2->1 weights")

    up = tmp_path / "ep1_to_ep2"  # world 1 -> 2, ZeRO-2 -> ZeRO-1
    out = train(common + [f"run_dir={up}", "parallel.ep=2", "train.zero_stage=1", f"checkpoint.resume={mid1}"], nproc=2)
    assert "resharding" in out.stdout
    loss_diff = max(loss_diff, _assert_close(losses(up), after3, "EP 1->2 losses vs uninterrupted EP=2", relative=True))
    param_diff = max(param_diff, _assert_close(full_model_state(latest(up)), full_model_state(latest(ep2)),
                                               "EP 1->2 weights"))
    loss_diff = max(loss_diff, _assert_close(losses(ep2), losses(ep1), "EP=2 vs EP=1 losses", relative=True))
    print(f"max difference across EP degrees: loss (relative) {loss_diff:.2e}, final weights {param_diff:.2e}")


def test_ep_not_dividing_the_world_fails_at_start_with_one_line(tmp_path: Path, cache: str) -> None:
    proc = subprocess.run(command(FAST + [cache, f"run_dir={tmp_path}", "parallel.ep=2"]),
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "moesaic: error: parallel.ep=2 and parallel.sp=1 must divide the world size 1", proc.stderr[-3000:]
