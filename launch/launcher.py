"""Start multi-process runs on top of existing launchers: torchrun, the DeepSpeed launcher, SLURM.

moesaic has no process manager of its own. ``moesaic launch`` builds a torchrun command (one node,
or several meeting at a c10d rendezvous on node 0) or a DeepSpeed-launcher command (a hostfile), always with
per-rank log files under ``run_dir/logs`` and rank 0 on the console. Workers run
``moesaic train``; with restarts enabled they resume from the newest intact checkpoint
(``checkpoint.resume=auto``), which is what makes torchrun's elastic restarts safe.
``moesaic slurm`` writes an sbatch script that starts one task per GPU with srun, asks SLURM for
SIGUSR1 before the time limit (the trainer checkpoints and exits 75) and requeues on exit 75.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..configs import Config, ConfigError, check_trainable, validate
from .topology import describe

TRAIN_MODULE = "moesaic.launch.cli"


@dataclass
class LaunchSpec:
    config: str
    overrides: list[str]
    nproc: int
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    hostfile: str | None = None
    max_restarts: int = 0


def worker_overrides(spec: LaunchSpec) -> list[str]:
    """Workers resume automatically whenever the launcher may restart them."""
    resume_given = any(o.startswith("checkpoint.resume=") for o in spec.overrides)
    return spec.overrides + ([] if resume_given or spec.max_restarts == 0 else ["checkpoint.resume=auto"])


def launch_command(spec: LaunchSpec, cfg: Config) -> list[str]:
    train_args = ["train", spec.config, *worker_overrides(spec)]
    if spec.hostfile:
        return ["deepspeed", "--hostfile", spec.hostfile, "--num_gpus", str(spec.nproc),
                "--master_addr", spec.master_addr, "--master_port", str(spec.master_port),
                f"--enable_each_rank_log={Path(cfg.run_dir).resolve() / 'logs'}",  # <time>_rank{R}.log per rank
                "--module", TRAIN_MODULE, *train_args]
    # c10d rendezvous, not the static one: each restart round gets a fresh store, whereas static
    # rendezvous restarts after a SIGKILLed rank were seen to hang in gloo's connection set-up.
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc-per-node={spec.nproc}", f"--nnodes={spec.nnodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={spec.master_addr}:{spec.master_port}", f"--rdzv-id=moesaic-{Path(cfg.run_dir).name}",
            f"--max-restarts={spec.max_restarts}",
            f"--log-dir={Path(cfg.run_dir) / 'logs'}", "--tee=3", "--local-ranks-filter=0",
            "-m", TRAIN_MODULE, *train_args]


def launch(spec: LaunchSpec, cfg: Config, dry_run: bool) -> int:
    world = spec.nproc * spec.nnodes
    if spec.hostfile and not Path(spec.hostfile).is_file():
        raise ConfigError(f"--hostfile {spec.hostfile} does not exist")
    validate(cfg, world_size=world)  # all that `moesaic train` checks, before any worker starts
    check_trainable(cfg)
    print(describe(cfg, world))
    cmd = launch_command(spec, cfg)
    print("command: " + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    return subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


SBATCH = """#!/bin/bash
# Written by `moesaic slurm`; submit with: sbatch {script}
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --output={logs}/slurm-%j.out
#SBATCH --signal=USR1@{warn}
#SBATCH --requeue
#SBATCH --open-mode=append
{extra}
set -uo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={port}
export PYTHONUNBUFFERED=1
# One task per GPU; moesaic maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID to RANK/WORLD_SIZE/LOCAL_RANK.
# SIGUSR1 ({warn} s before the limit) makes every rank checkpoint and exit {preempted}.
srun --kill-on-bad-exit=1 {python} -m {module} train {config} {overrides}
rc=$?
if [ "$rc" -eq {preempted} ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def write_sbatch(cfg: Config, config: str, overrides: Sequence[str], nodes: int, gpus_per_node: int,
                 time_limit: str, partition: str | None, account: str | None, warn_seconds: int = 180,
                 cpus_per_task: int = 8, port: int = 29500) -> Path:
    """Write ``run_dir/slurm.sbatch``: a requeueing, pre-emption-safe job for this config."""
    from ..trainer.loop import PREEMPTED_EXIT_CODE

    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be >= 1")
    validate(cfg, world_size=nodes * gpus_per_node)
    check_trainable(cfg)
    run_dir = Path(cfg.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    script = run_dir / "slurm.sbatch"
    resume = [] if any(o.startswith("checkpoint.resume=") for o in overrides) else ["checkpoint.resume=auto"]
    extra = "\n".join(f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("account", account)) if v)
    script.write_text(SBATCH.format(
        script=script, job=f"moesaic-{run_dir.name}", nodes=nodes, gpus=gpus_per_node, cpus=cpus_per_task,
        time=time_limit,
        logs=(run_dir / "logs").resolve(), warn=warn_seconds, extra=extra, port=port, python=sys.executable,
        module=TRAIN_MODULE, config=shlex.quote(str(Path(config).resolve()) if Path(config).is_file() else config),
        overrides=shlex.join([*overrides, *resume]), preempted=PREEMPTED_EXIT_CODE))
    return script
