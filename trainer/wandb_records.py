"""Read back the steps a wandb run already holds, so a resumed run does not log them twice.

After a crash the resumed run redoes the steps after its last checkpoint. Offline, each invocation
writes its own ``offline-run-*-<id>`` folder and ``wandb sync`` uploads them all, so the steps the
crashed invocation managed to write would be there twice; only wandb's own files say which those
are (the crashed process may have logged rows that its wandb service never wrote). Online, the
server keeps the run's history and the resumed run's ``run.step`` says where it ends.

The ``.wandb`` file is wandb's record log: a 7-byte header, then LevelDB-style 32 KiB blocks of
chunks (crc32 u32, length u16, type u8, data) that never cross a block; a record is one chunk
(FULL) or FIRST, MIDDLE..., LAST; each record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, LAST = 1, 2, 4


def records(path: Path) -> Iterator[pb.Record]:
    """The records of one .wandb file, in order; a torn last record (a killed writer) is dropped."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb record log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        if pos + HEADER + length > len(data):
            return
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def offline_files(run_dir: Path, run_id: str) -> list[Path]:
    """The record logs of every offline invocation of run ``run_id`` under run_dir, oldest first."""
    return sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def logged_steps(run_dir: Path, run_id: str) -> set[int]:
    """History steps already in the offline record logs of ``run_id`` (unreadable files count as empty)."""
    steps: set[int] = set()
    for path in offline_files(run_dir, run_id):
        try:
            steps.update(r.history.step.num for r in records(path) if r.WhichOneof("record_type") == "history")
        except (OSError, ValueError):
            continue
    return steps
