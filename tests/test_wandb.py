"""wandb offline end to end: a run (one CSA and one HCA layer, both MoE) stopped and resumed is read
back from its .wandb record logs (every folder of its run id), and holds every key of
docs/metrics.md at the documented steps, once per step, and no other key, under one run id with
the configured name, group, tags and resolved config."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2 as pb

from moesaic.trainer.wandb_records import logged_steps, offline_files, records
from trainrun import FAST, command, env

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
# Steps of the run below: train.steps=6 stopped at 3 and resumed, log_every=2, eval_every=3,
# moe_heatmap_every=2. The last step of each invocation is a log and an eval step.
EXPECTED_STEPS = {"log": {2, 3, 4, 6}, "eval": {3, 6}, "first": {2, 4}, "heatmap": {2, 4, 6}}
CONDITIONS = {"": True, "moe": True, "seq-aux": True, "peak": True, "ep>1": False, "csa/hca": True,
              "csa/dsa": True, "mixture": False, "gqa gate": False, "elastic": False}
LAYERS, MOE_LAYERS, CSA_LAYERS, CONTEXTS = ["L00", "L01"], ["L00", "L01"], ["L00"], ["4k"]


def documented_keys() -> dict[str, tuple[str, str, str]]:
    """key -> (when, condition, meaning), with {L}/{ctx} expanded for the run below."""
    out = {}
    for key, when, cond, meaning in re.findall(r"^\| `([^`]+)` \| (\w+) \|([^|]*)\| (.*) \|$", DOC.read_text(), re.M):
        layers = MOE_LAYERS if key.startswith("moe_layers") else CSA_LAYERS if cond.strip() == "csa/dsa" else LAYERS
        for layer in layers if "{L}" in key else [None]:
            for ctx in CONTEXTS if "{ctx}" in key else [None]:
                out[key.replace("{L}", str(layer)).replace("{ctx}", str(ctx))] = (when, cond.strip(), meaning)
    return out


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Train 3 steps, stop, resume to 6, with wandb on "auto" and no credentials (so offline)."""
    tmp = tmp_path_factory.mktemp("wandb_run")
    run_dir = tmp / "run"
    clean = {k: v for k, v in env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR")}
    clean["HOME"] = str(tmp / "home")  # no ~/.netrc credentials either
    common = FAST + [f"data.cache_dir={tmp / 'cache'}", f"run_dir={run_dir}", "logging.wandb=auto",
                     "logging.run_name=obs-test", "logging.group=obs", "logging.tags=[moe,kv]",
                     "model.layer_types=[csa,hca]", "model.attention.menu.hca.ratio=8",
                     "model.attention.menu.csa.index_topk=4",
                     "model.ffn_types=[moe,moe]", "model.moe.seq_aux_loss_coef=0.001", "logging.peak_flops=1e11",
                     "logging.kv_contexts=[4096]", "train.steps=6", "train.log_every=2", "train.eval_every=3",
                     "logging.moe_heatmap_every=2", "checkpoint.every=100"]
    outputs = []
    for extra in (["train.stop_at=3"], ["checkpoint.resume=auto"]):
        proc = subprocess.run(command(common + extra), capture_output=True, text=True, timeout=600, env=clean)
        assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    return run_dir, outputs


def history(run_dir: Path) -> tuple[str, list[pb.Record], list[tuple[int, dict]]]:
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = offline_files(run_dir, run_id)
    runs, rows = [], []
    for f in files:
        for r in records(f):
            if r.WhichOneof("record_type") == "run":
                runs.append(r.run)
            elif r.WhichOneof("record_type") == "history":
                rows.append((r.history.step.num, history_item(r.history)))
    return run_id, runs, rows


def history_item(row: pb.HistoryRecord) -> dict:
    """Scalars come as key + JSON value; media (tables, images) as one nested_key [key, field] per field."""
    item: dict = {}
    for entry in row.item:
        *path, leaf = [entry.key] if entry.key else list(entry.nested_key)
        target = item
        for part in path:
            target = target.setdefault(part, {})
        target[leaf] = json.loads(entry.value_json)
    return item


def test_resume_joins_the_same_offline_run_without_duplicate_steps(resumed_run: tuple[Path, list[str]]) -> None:
    run_dir, outputs = resumed_run
    run_id, runs, rows = history(run_dir)
    folders = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(folders) == 2 and len(list(run_dir.glob("wandb/offline-run-*"))) == 2
    for out, folder in zip(outputs, folders):
        assert f"wandb ran offline; upload with: wandb sync {folder}" in out
    steps = [step for step, _ in rows]
    assert sorted(steps) == sorted(set(steps)), f"duplicated steps {steps}"
    assert set(steps) == EXPECTED_STEPS["log"] | EXPECTED_STEPS["eval"]
    assert all(item["_step"] == step for step, item in rows)
    assert len(runs) == 2 and all(r.run_id == run_id for r in runs)
    assert all((r.display_name, r.run_group, list(r.tags)) == ("obs-test", "obs", ["moe", "kv"]) for r in runs)
    configs = [{i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"} for r in runs]
    resolved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert configs[1] == resolved
    assert configs[0]["train"]["stop_at"] == 3 and configs[1]["train"]["stop_at"] == 0


def test_every_documented_key_is_logged_at_its_steps_and_nothing_else(resumed_run: tuple[Path, list[str]]) -> None:
    run_dir, _ = resumed_run
    _, _, rows = history(run_dir)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == sorted(step for step, _ in rows)
    doc = documented_keys()
    for key, (when, cond, meaning) in doc.items():
        expected = EXPECTED_STEPS[when] if CONDITIONS[cond] else set()
        assert {step for step, item in rows if key in item} == expected, f"wandb {key}"
        if not meaning.startswith("wandb only"):
            assert {r["step"] for r in jsonl if key in r} == expected, f"jsonl {key}"
    logged = {k for _, item in rows for k in item if not k.startswith("_")}
    assert logged <= set(doc), f"undocumented keys: {sorted(logged - set(doc))}"
    heatmaps = [item["moe/expert_load"] for _, item in rows if "moe/expert_load" in item]
    assert all(h["_type"] == "table-file" and h["nrows"] == 2 * 4 for h in heatmaps)
    loads = [r["moe/expert_load"] for r in jsonl if "moe/expert_load" in r]
    assert all(h["layers"] == [0, 1] and sum(h["load"][0]) == pytest.approx(4) for h in loads)



def test_steps_logged_after_the_last_checkpoint_of_a_killed_run_are_not_logged_twice(tmp_path: Path) -> None:
    """SIGKILL after the step-15 checkpoint and some later logged steps; the resumed run redoes those steps
    (same values) and wandb, across both offline folders, holds every step exactly once."""
    run_dir = tmp_path / "run"
    common = FAST + [f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run_dir}", "logging.wandb=offline",
                     "train.steps=30", "train.log_every=1", "train.eval_every=100", "checkpoint.every=15"]
    proc = subprocess.Popen(command(common), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl, deadline = run_dir / "metrics.jsonl", time.time() + 300
    logged: list[int] = []
    while proc.poll() is None and time.time() < deadline and not any(15 < s < 20 for s in logged):
        time.sleep(0.02)
        logged = [json.loads(r)["step"] for r in jsonl.read_text().splitlines()] if jsonl.exists() else []
    # The wandb service is a separate process: wait (not a fixed time: a loaded host is slow) until it has
    # written a step past the checkpoint.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    while proc.poll() is None and time.time() < deadline and max(logged_steps(run_dir, run_id), default=0) <= 15:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (run_dir / "checkpoints" / "step_00000030").exists()  # so steps 16.. are redone
    killed_at = max(json.loads(r)["step"] for r in jsonl.read_text().splitlines())
    assert max(logged_steps(run_dir, run_id)) > 15, "the killed run's wandb holds no step to be redone"
    resumed = subprocess.run(command(common + ["checkpoint.resume=auto"]), env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, runs, rows = history(run_dir)
    assert len(runs) == 2
    steps = [step for step, _ in rows]
    assert sorted(steps) == list(range(1, 31)), f"wandb steps {steps} (killed after logging step {killed_at})"
    assert [json.loads(r)["step"] for r in jsonl.read_text().splitlines()] == list(range(1, 31))
