"""The GPU benchmarks run on lent, time-limited devices: their ``--smoke`` modes prove here that they still run
against the current model and trainer and write what benchmarks/gpu_check.sh collects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainrun import env

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_gpu_attention_smoke_and_budget(tmp_path: Path) -> None:
    out = run_script("benchmarks/gpu_attention.py", "--smoke", "--json", str(tmp_path / "all.json"))
    cases = json.loads((tmp_path / "all.json").read_text())
    assert [(c["kind"], c["backend"]) for c in cases] == [("dense", "sdpa"), ("csa", "torch"), ("hca", "torch")]
    assert all(c["seconds"] > 0 and c["tflops"] > 0 and c["seq_len"] == 256 for c in cases)
    assert out.count("| small |") == 3
    # A spent budget starts no further case.
    out = run_script("benchmarks/gpu_attention.py", "--smoke", "--budget", "1e-9")
    assert "time budget of 0 s spent: cases from small dense sdpa 256 on not run" in out
    assert "| small |" not in out

def test_gpu_attention_torch_backend_length_cap(tmp_path: Path) -> None:
    run_script("benchmarks/gpu_attention.py", "--shapes", "small", "--dtype", "fp32", "--reps", "1", "--lengths",
               "256", "128", "--backends", "torch", "--torch-max-len", "128", "--kinds", "csa", "--json",
               str(tmp_path / "c.json"))
    assert [c["seq_len"] for c in json.loads((tmp_path / "c.json").read_text())] == [128]


def test_gpu_step_smoke(tmp_path: Path) -> None:
    out = run_script("benchmarks/gpu_step.py", "--smoke", "--json", str(tmp_path / "step.json"))
    result = json.loads((tmp_path / "step.json").read_text())
    assert json.loads(next(line for line in out.splitlines() if line.startswith("{"))) == result
    assert result["steps"] == 2 and result["step_time_s"] > 0
    assert result["tokens_per_s"] * result["step_time_s"] == \
        pytest.approx(result["global_batch"] * result["seq_len"])
    assert 0 < result["params_active"] < result["params_total"]
    assert result["tflops_per_s"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"] / 1e12)
