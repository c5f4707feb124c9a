"""Checkpoint manifests: damaged checkpoints are named and skipped, pruning keeps the newest."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moesaic.trainer import checkpoint as ck


def _make(root: Path, step: int, payload: bytes = b"x" * 4096) -> Path:
    path = root / ck.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    (path / "sub").mkdir()
    (path / "sub" / "expert_0.pt").write_bytes(payload[::-1])
    ck.write_manifest(path, step, {})
    ck.mark_latest(root, path)
    return path


def test_truncation_at_any_offset_is_rejected_and_previous_used(tmp_path: Path) -> None:
    good = _make(tmp_path, 10, bytes(range(256)) * 16)
    bad = _make(tmp_path, 20, bytes(range(256)) * 16)
    target = bad / "mp_rank_00_model_states.pt"
    original = target.read_bytes()
    rng = random.Random(0)
    for offset in [0, 1, len(original) - 1] + [rng.randrange(len(original)) for _ in range(5)]:
        target.write_bytes(original[:offset])
        with pytest.raises(ck.CheckpointError, match="mp_rank_00_model_states.pt is truncated"):
            ck.verify(bad)
        assert ck.find_resumable(tmp_path, log=lambda m: None) == good
    corrupted = bytearray(original)
    corrupted[100] ^= 0xFF
    target.write_bytes(bytes(corrupted))
    with pytest.raises(ck.CheckpointError, match="corrupted: SHA-256"):
        ck.verify(bad)
    target.write_bytes(original)
    assert ck.find_resumable(tmp_path) == bad


def test_missing_manifest_means_incomplete(tmp_path: Path) -> None:
    good = _make(tmp_path, 5)
    partial = tmp_path / ck.tag_for(6)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    with pytest.raises(ck.CheckpointError, match="incomplete: manifest.json is missing"):
        ck.verify(partial)
    assert ck.find_resumable(tmp_path) == good
    assert ck.find_resumable(tmp_path / "nothing") is None


def test_prune_keeps_newest_complete(tmp_path: Path) -> None:
    paths = [_make(tmp_path, s) for s in (1, 2, 3, 4)]
    ck.prune(tmp_path, keep_last=2, keep=paths[-1])
    assert sorted(p.name for p in ck.list_checkpoints(tmp_path)) == [ck.tag_for(3), ck.tag_for(4)]
