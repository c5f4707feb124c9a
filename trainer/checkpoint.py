"""Checkpoint directory management: atomic completion, manifests, retention and resume lookup.

Layout under ``checkpoint.dir``::

    step_00000100/   DeepSpeed files (model, ZeRO shards, one file per expert), config.yaml,
                     trainer_state_rank{R}.pt (RNG states), portable/ (optimizer state by
                     parameter and global expert, for resuming at another layout:
                     moesaic.parallel.portable), manifest.json (written last, with the layout)
    latest           name of the newest complete checkpoint, replaced atomically

A checkpoint counts as complete only once its manifest exists and every file it lists has the
recorded size and SHA-256, so a crash mid-save (or a truncated copy) is never resumed from:
``resume=auto`` falls back to the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt: Path, step: int, extra: dict[str, Any]) -> None:
    """Record every file of a finished checkpoint; call once all ranks have written theirs."""
    files = {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    _atomic_write(ckpt / MANIFEST, json.dumps({"step": step, "files": files, **extra}, indent=1))


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of a checkpoint that ``verify`` has already accepted."""
    return json.loads((ckpt / MANIFEST).read_text())


def verify(ckpt: Path) -> dict[str, Any]:
    """Return the manifest of a complete, intact checkpoint or raise CheckpointError naming the problem."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {MANIFEST} is missing (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupted: {exc}") from None
    for name, meta in manifest["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or altered: "
                                  f"{path.stat().st_size} bytes, expected {meta['size']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted: SHA-256 does not match the manifest")
    return manifest


def is_step_dir(path: Path) -> bool:
    """Whether ``path`` is named as a checkpoint (``step_XXXXXXXX``)."""
    return bool(_STEP_DIR.match(path.name))


def list_checkpoints(root: Path) -> list[Path]:
    """Step directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and is_step_dir(p)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def mark_latest(root: Path, ckpt: Path) -> None:
    _atomic_write(root / LATEST, ckpt.name)


def find_resumable(root: Path, log=print) -> Path | None:
    """Newest intact checkpoint: the ``latest`` pointer first, then older ones, skipping damaged ones."""
    candidates = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for ckpt in candidates:
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as exc:
            log(f"skipping checkpoint: {exc}")
    return None


def prune(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``keep``)."""
    complete = [c for c in list_checkpoints(root) if (c / MANIFEST).is_file()]
    newest = set(complete[:keep_last]) | {keep}
    for ckpt in list_checkpoints(root):
        if ckpt not in newest and ckpt.name < keep.name:
            shutil.rmtree(ckpt, ignore_errors=True)
