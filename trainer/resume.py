"""Which checkpoint a run resumes from, and whether it may: the same model and the same data position.

The samples of optimizer step s are a function of the data, ``train.seed`` and
``train.global_batch_size`` (trainer/loop.py), so a resume that changed any of them would silently
continue at another place in another sample order; it is refused, as is a model whose weights the
checkpoint does not hold. Everything else may change on resume (learning rate, steps, micro-batch
size: the same samples split into other micro-batches, number of processes, parallel layout).
Refusals happen before anything is written.
"""

from __future__ import annotations

from functools import reduce
from pathlib import Path
from typing import Callable

from ..configs import Config, ConfigError, load_config
from . import checkpoint as ckpt_io

# The fields that fix which samples each step draws.
DATA_POSITION = ("data.dataset", "data.sources", "data.text_field", "data.hub_split", "data.tokenizer",
                 "data.tokenizer_sample_bytes", "data.seq_len", "data.val_fraction", "data.max_train_tokens",
                 "train.seed", "train.global_batch_size")


def _field(cfg: Config, path: str) -> object:
    return reduce(getattr, path.split("."), cfg)


def check_resumable(cfg: Config, ckpt: Path) -> None:
    """ConfigError naming the first field where ``cfg`` cannot continue the run ``ckpt`` was saved from."""
    from ..model.interop import check_same_architecture

    saved = load_config(ckpt / "config.yaml")
    check_same_architecture(cfg.model, saved.model, str(ckpt))
    for path in DATA_POSITION:
        ours, theirs = _field(cfg, path), _field(saved, path)
        if ours != theirs:
            raise ConfigError(f"{path}={ours!r} differs from the checkpoint {ckpt} ({theirs!r}): resuming would "
                              f"continue at another data position; set {path}={theirs!r} or start a new run_dir")


def find_resume(cfg: Config, root: Path, log: Callable[[str], None]) -> Path | None:
    """The checkpoint ``checkpoint.resume`` names (verified and checked against ``cfg``), or None."""
    resume = cfg.checkpoint.resume
    if resume is None:
        return None
    if resume == "auto":
        path = ckpt_io.find_resumable(root, log=log)
    else:
        path = Path(resume)
        if not path.exists():
            raise ckpt_io.CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
        ckpt_io.verify(path)
    if path is not None:
        check_resumable(cfg, path)
    return path
