"""Run a worker function on N gloo ranks under torchrun and report every check it makes by name.

The pytest side::

    run_workers(my_worker, world=2, overrides=[...]).assert_ok()

launches ``python -m torch.distributed.run --nproc-per-node=2 harness.py test_x:my_worker ...``
(one launch costs 10-40 s here, so a worker runs many checks). Each rank joins the process group
through ``init_distributed``, calls ``my_worker(checks, overrides=[...])`` (keyword arguments travel
as JSON) and tears the group down. The worker records each comparison with ``checks.at_most(name,
value, limit)`` and its kin instead of asserting: a failed check does not stop the rank (the ranks
keep issuing the same collectives), and every record goes to a per-rank JSON-lines file as it is
made, so even a rank that later crashes, hangs or aborts at exit leaves what it checked. The
failure message names each failed check, its rank, the value against the limit and where it was
made; an exception raised by the worker is reported with its traceback.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainrun import env, free_port

HERE = Path(__file__).resolve()


class Checks:
    """One rank's named checks, appended to ``path`` as they are made."""

    def __init__(self, rank: int, path: Path) -> None:
        self.rank, self.path = rank, path

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"rank": self.rank, **record}) + "\n")

    def _record(self, name: str, ok: bool, value: float | bool, op: str, limit: float | None) -> None:
        record = {"name": name, "ok": bool(ok), "value": value, "op": op, "limit": limit}
        if not ok:  # where the check was made, without this module's frames
            record["where"] = "".join(traceback.format_list(
                [f for f in traceback.extract_stack() if Path(f.filename).resolve() != HERE]))
        self._write(record)

    def at_most(self, name: str, value: float, limit: float) -> None:
        """value <= limit (NaN fails)."""
        self._record(name, value <= limit, float(value), "<=", limit)

    def above(self, name: str, value: float, floor: float) -> None:
        """value > floor (NaN fails)."""
        self._record(name, value > floor, float(value), ">", floor)

    def that(self, name: str, ok: bool) -> None:
        self._record(name, ok, bool(ok), "is", None)

    def close(self, name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
        """``torch.allclose(actual, expected, atol, rtol)``, recorded as max(|a - e| - rtol |e|) <= atol."""
        margin = ((actual - expected).abs() - rtol * expected.abs()).max().item()
        self._record(name, margin <= atol, margin, "<=", atol)

    def raised(self, exc: BaseException) -> None:
        """Record ``exc``, being handled, with its traceback as a failed check."""
        self._write({"name": "the worker raised", "ok": False, "value": f"{type(exc).__name__}: {exc}",
                     "op": "raised", "limit": None, "where": traceback.format_exc()})

    def finish(self) -> None:
        self._write({"finished": True})


def _measured(record: dict) -> str:
    """``value (wanted op limit)`` of a check record; the exception of a worker that raised."""
    value = record["value"]
    if record["op"] == "raised":
        return value
    shown = str(value) if isinstance(value, bool) else f"{value:.3g}"
    wanted = "True" if record["limit"] is None else f"{record['op']} {record['limit']:.3g}"
    return f"{shown} (wanted {wanted})"


@dataclass
class Report:
    """What the ranks of one launch recorded, and how the launch ended."""

    world: int
    records: list[dict] = field(repr=False)
    finished: set[int]
    returncode: int | None  # None: killed at the timeout
    output: str = field(repr=False)

    def problems(self) -> list[str]:
        """Each failed check with where it was made, then what went wrong with the launch itself."""
        out = [f"rank {r['rank']}: {r['name']}: {_measured(r)}\n{r['where']}" for r in self.records if not r["ok"]]
        missing = sorted(set(range(self.world)) - self.finished)
        if missing:
            out.append(f"ranks {missing} did not finish their worker")
        if not self.records:
            out.append("no checks were recorded")
        if self.returncode is None:
            out.append("the launch timed out")
        elif self.returncode != 0:
            out.append(f"the launch exited with {self.returncode}")
        return out

    def assert_ok(self) -> None:
        """Fail with every problem and the number of checks made; with the output tail if the launch went wrong."""
        problems = self.problems()
        launch_ok = self.returncode == 0 and self.finished == set(range(self.world))
        tail = "" if launch_ok else f"\n---- output tail ----\n{self.output[-6000:]}"
        names = len({r["name"] for r in self.records})
        header = f"{len(problems)} problem(s), {names} checks on {self.world} ranks:"
        assert not problems, "\n".join([header, *problems]) + tail

    def __str__(self) -> str:
        """One line per check: its worst rank (a failing one, else the value nearest its limit)."""
        by_name: dict[str, list[dict]] = {}
        for r in self.records:
            by_name.setdefault(r["name"], []).append(r)
        lines = []
        for name, rs in by_name.items():
            worst = min(rs, key=lambda r: (r["ok"], -r["value"] if r["op"] == "<=" else r["value"]))
            lines.append(f"{'ok  ' if worst['ok'] else 'FAIL'} {name}: {_measured(worst)} on rank {worst['rank']}"
                         f" (of {len(rs)})")
        return "\n".join(lines)


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, int | None]:
    """torchrun's output and exit code (None at the timeout).

    On a timeout or an interrupt torchrun gets SIGTERM, on which it ends its workers (they sit in
    sessions of their own, out of reach of a process-group kill) within its 30 s grace period.
    """
    try:
        return proc.communicate(timeout=timeout)[0], proc.returncode
    except BaseException as exc:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
        if isinstance(exc, subprocess.TimeoutExpired):
            return output, None
        raise


def run_workers(worker: Callable[..., None] | str, world: int, timeout: float = 900, **kwargs) -> Report:
    """Run ``worker(checks, **kwargs)`` (a module-level function, or "module:function") on ``world`` ranks.

    The module must be importable from tests/ (test modules are). Returns the report; call
    ``assert_ok`` on it. Prints the per-check table, which pytest shows with ``-s`` or on failure.
    """
    target = worker if isinstance(worker, str) else f"{worker.__module__}:{worker.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="moesaic-checks-") as results:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", str(HERE), target, json.dumps(kwargs), results]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                                cwd=HERE.parent)
        output, returncode = _communicate(proc, timeout)
        lines = [json.loads(line) for path in sorted(Path(results).glob("rank*.jsonl"))
                 for line in path.read_text().splitlines()]
    report = Report(world, [r for r in lines if "finished" not in r], {r["rank"] for r in lines if "finished" in r},
                    returncode, output)
    print(report)
    return report


def _worker_main(target: str, kwargs_json: str, results: str) -> None:
    """A torchrun rank: join the group, run the worker with a ``Checks``, record an exception as a failed check."""
    from moesaic.trainer.distributed import destroy, init_distributed

    info = init_distributed("cpu")
    checks = Checks(info.rank, Path(results) / f"rank{info.rank}.jsonl")
    module, _, name = target.partition(":")
    try:
        getattr(importlib.import_module(module), name)(checks, **json.loads(kwargs_json))
    except BaseException as exc:
        checks.raised(exc)
        raise
    else:
        checks.finish()
    finally:
        destroy()


if __name__ == "__main__":
    import harness  # the worker's module imports ``harness``; run that copy, not a second one as __main__

    harness._worker_main(*sys.argv[1:])
