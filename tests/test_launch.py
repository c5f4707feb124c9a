"""`moesaic launch` (torchrun underneath): equal to plain torchrun, elastic restart after SIGKILL, SLURM script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainrun import FAST, assert_identical, env, final_params, free_port, latest, losses, train


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _launch(overrides: list[str], *flags: str) -> list[str]:
    return [sys.executable, "-m", "moesaic.launch.cli", "launch", "tiny", "--nproc", "2",
            "--master-port", str(free_port()), *flags, *overrides]


@pytest.mark.multiproc
def test_launch_equals_torchrun_and_survives_a_killed_rank(tmp_path: Path) -> None:
    common = FAST + [f"data.cache_dir={tmp_path / 'cache'}", "train.steps=16", "checkpoint.every=4"]
    ref, launched, killed = tmp_path / "torchrun", tmp_path / "launch", tmp_path / "killed"
    train(common + [f"run_dir={ref}"], nproc=2)

    proc = subprocess.run(_launch(common + [f"run_dir={launched}"]), capture_output=True, text=True, env=env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "topology: world 2 = dp 2 x sp 1" in proc.stdout
    assert sorted(p.name for p in (launched / "logs").rglob("stdout.log")), "no per-rank logs"
    assert losses(ref) == losses(launched)
    assert_identical(final_params(latest(ref)), final_params(latest(launched)))

    launcher = subprocess.Popen(_launch(common + [f"run_dir={killed}"], "--max-restarts", "3"), env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = killed / "checkpoints" / "step_00000008" / "manifest.json"
    deadline = time.time() + 400
    while not marker.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    torchrun = _children(launcher.pid)
    workers = [w for t in torchrun for w in _children(t)]
    assert len(workers) == 2, f"expected 2 workers under torchrun, found {workers}"
    os.kill(max(workers), signal.SIGKILL)
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-4000:]
    assert "resumed from" in out
    assert_identical(final_params(latest(ref)), final_params(latest(killed)))


def test_dry_run_prints_topology_and_starts_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moesaic.launch.cli", "launch", "tiny", "--nproc", "4", "--dry-run",
                           f"run_dir={tmp_path}", "train.micro_batch_size=4"], capture_output=True, text=True,
                          check=True)
    assert "topology: world 4 = dp 4 x sp 1; ep 1" in proc.stdout
    assert "batch: global 16 sequences of 128 = micro 4 x dp 4 x accumulation 1" in proc.stdout
    assert "--nproc-per-node=4" in proc.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_sbatch_script_is_valid_and_complete(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moesaic.launch.cli", "slurm", "tiny", "--nodes", "2",
                           "--gpus-per-node", "4", "--time", "12:00:00", "--partition", "gpu",
                           f"run_dir={tmp_path}", "train.micro_batch_size=2"], capture_output=True, text=True,
                          check=True)
    script = Path(proc.stdout.strip())
    assert script == tmp_path / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                      "#SBATCH --time=12:00:00", "#SBATCH --signal=USR1@180", "#SBATCH --requeue",
                      "#SBATCH --partition=gpu", "scontrol requeue", '-eq 75', "checkpoint.resume=auto"):
        assert directive in text, directive


def test_hostfile_launch_logs_per_rank_and_slurm_takes_cpus_and_port(tmp_path: Path, capsys) -> None:
    from moesaic.launch.cli import main as cli

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    assert cli(["launch", "tiny", "--nproc", "2", "--hostfile", str(hostfile), "--dry-run", f"run_dir={tmp_path}",
                "train.micro_batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert f"--enable_each_rank_log={tmp_path.resolve() / 'logs'}" in out and "deepspeed --hostfile" in out
    assert cli(["slurm", "tiny", "--nodes", "2", "--gpus-per-node", "1", "--time", "1:00:00", "--cpus-per-task", "3",
                "--master-port", "29777", f"run_dir={tmp_path}", "train.micro_batch_size=8"]) == 0
    text = (tmp_path / "slurm.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=3" in text and "export MASTER_PORT=29777" in text


FAKE_SRUN = """#!/bin/bash
# srun for 2 tasks on this host: the environment SLURM gives each task, then the command
while [[ "$1" == --* ]]; do shift; done
pids=()
for r in 0 1; do
  SLURM_PROCID=$r SLURM_LOCALID=$r SLURM_NTASKS=2 SLURM_NNODES=1 SLURM_NODEID=0 "$@" & pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit "$rc"
"""


@pytest.mark.multiproc
def test_two_node_launch_and_slurm_script_on_one_machine_equal_one_node(tmp_path: Path) -> None:
    """Two `moesaic launch --nnodes 2` processes (one worker each) meeting at 127.0.0.1, as two machines would,
    and the `moesaic slurm` script run as SLURM runs it for 2 tasks (srun and scontrol faked), each train
    exactly what one 2-process node trains."""
    common = FAST + [f"data.cache_dir={tmp_path / 'cache'}", "train.steps=3", "train.eval_every=3",
                     "checkpoint.every=100"]
    train(common + [f"run_dir={tmp_path / 'one'}"], nproc=2)
    port = free_port()
    node = [sys.executable, "-m", "moesaic.launch.cli", "launch", "tiny", "--nproc", "1", "--nnodes", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port), *common, f"run_dir={tmp_path / 'two'}"]
    procs = [subprocess.Popen(node, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert all("topology: world 2" in o for o in outs)
    assert losses(tmp_path / "one") == losses(tmp_path / "two")
    assert_identical(final_params(latest(tmp_path / "one")), final_params(latest(tmp_path / "two")))

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo 127.0.0.1\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    slurm = tmp_path / "slurm"
    subprocess.run([sys.executable, "-m", "moesaic.launch.cli", "slurm", "tiny", "--nodes", "1", "--gpus-per-node",
                    "2", "--time", "1:00:00", "--master-port", str(free_port()), *common, f"run_dir={slurm}"],
                   check=True, capture_output=True, env=env())
    proc = subprocess.run(["bash", str(slurm / "slurm.sbatch")], capture_output=True, text=True, timeout=600,
                          env={**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
                               "SLURM_JOB_ID": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert losses(tmp_path / "one") == losses(slurm)
    assert_identical(final_params(latest(tmp_path / "one")), final_params(latest(slurm)))
