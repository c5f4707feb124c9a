"""Where metrics go: a JSONL file, wandb (offline when there are no credentials) and the console.

Only the main rank constructs a ``MetricSinks``. Every row carries ``step`` = the optimizer step,
and wandb is always given ``step=`` explicitly, because offline resume restarts wandb's own counter.
After a crash, the resumed run redoes the steps between the last checkpoint and the crash; the JSONL
drops and rewrites them, and wandb is not sent the steps it already holds (``wandb_records``).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from ..configs import Config, to_yaml
from .wandb_records import logged_steps

WANDB_ID_FILE = "wandb_run_id"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(setting: str) -> str:
    """Resolve ``logging.wandb``; an explicit WANDB_MODE in the environment wins over "auto"."""
    if setting != "auto":
        return setting
    return os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")


def log_job(cfg: Config, run_dir: Path, job_type: str, payload: Callable[[], dict[str, Any]]) -> str | None:
    """Log ``payload()`` (built only when wandb is on) once, as a wandb run of its own beside the training run
    (same project and group, named after it with ``-job_type``): a training run's history is closed, and an
    offline resume of it could not be given steps it already holds. Returns the ``wandb sync`` command
    offline, else None."""
    mode = wandb_mode(cfg.logging.wandb)
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(project=cfg.logging.project, group=cfg.logging.group, tags=list(cfg.logging.tags),
                     name=f"{cfg.logging.run_name or run_dir.name}-{job_type}", job_type=job_type,
                     dir=str(run_dir), mode=mode)
    run.log(payload())
    return _finish(run, mode)


def _finish(run: Any, mode: str) -> str | None:
    """Finish a wandb run; the ``wandb sync`` command of its folder if it ran offline, else None."""
    import wandb

    folder = Path(run.dir).parent
    run.finish()
    wandb.teardown()  # finish() alone sometimes returns before the offline file is flushed
    return f"wandb sync {folder}" if mode == "offline" else None


class MetricSinks:
    def __init__(self, cfg: Config, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Rows past the checkpoint came from the interrupted run and are redone (with the same values).
            rows = [r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        self.file = self.path.open("a")
        self.run = None
        self.mode = wandb_mode(cfg.logging.wandb)
        # Steps wandb already holds (from a crashed invocation), not resent: offline the steps in the
        # earlier record logs, online every step before the server's run.step.
        self.in_wandb: set[int] = set()
        self.wandb_resumes_at = 0
        if self.mode != "disabled":
            self.run = self._init_wandb(cfg, run_dir)

    def _init_wandb(self, cfg: Config, run_dir: Path):
        import wandb
        from omegaconf import OmegaConf

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        if self.mode == "offline":
            self.in_wandb = logged_steps(run_dir, run_id)
        run = wandb.init(
            project=cfg.logging.project, name=cfg.logging.run_name or run_dir.name, group=cfg.logging.group,
            tags=list(cfg.logging.tags), id=run_id, resume="allow", dir=str(run_dir), mode=self.mode,
            config=OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))),
        )
        if self.mode == "online":
            self.wandb_resumes_at = run.step
        return run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Values are numbers, or objects with ``to_json()`` and ``to_wandb(key) -> {key: value}``
        (e.g. ``metrics.Heatmap``: an object in the JSONL, a Table and an image in wandb)."""
        row = {"step": step, **{k: v.to_json() if hasattr(v, "to_json") else v for k, v in metrics.items()
                                if not (isinstance(v, float) and math.isnan(v))}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.run is None or step < self.wandb_resumes_at or step in self.in_wandb:
            return
        payload: dict[str, Any] = {}
        for key, value in metrics.items():
            payload.update(value.to_wandb(key) if hasattr(value, "to_wandb") else {key: value})
        self.run.log(payload, step=step)

    def close(self) -> str | None:
        """Finish wandb and return the ``wandb sync`` command for offline runs."""
        self.file.close()
        return None if self.run is None else _finish(self.run, self.mode)
