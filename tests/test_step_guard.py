"""Clipping and non-finite skips on the device (``trainer/step_guard.py``), at every ZeRO stage.

One harness launch (one rank): an engine per ZeRO stage against the plain-torch one-process reference
(``exactness.py``: clipping engaged, per-step norm, parameters and biases within ``TOL``); then a step
with a NaN gradient, which must leave parameters and Adam state bit-identical; then resuming Adam state
written by the unfused AdamW of earlier versions. Multi-rank engines (data, expert and sequence
parallel) go through the same guard in test_ep and test_sp.
"""

from __future__ import annotations

import pytest
import torch

from exactness import check_engine, reference_steps
from harness import Checks, run_workers
from test_ep import OVERRIDES, STEPS, _cfg


def _engine_state(engine) -> list[torch.Tensor]:
    """Parameters and every Adam state tensor the engine steps (ZeRO's flat fp32 partitions included)."""
    base = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else engine.optimizer.optimizer
    tensors = [p.detach().clone() for p in engine.module.parameters()]
    for state in base.state.values():
        tensors += [v.detach().clone() for v in state.values()]
    for group in base.param_groups:
        tensors += [p.detach().clone() for p in group["params"]]
    return tensors


def _skip_and_resume(checks: Checks, zero: int, batch: torch.Tensor) -> None:
    from moesaic.parallel.topology import Topology
    from moesaic.trainer.engine import build_engine

    cfg = _cfg(OVERRIDES, zero=zero)
    engine, _, stepper = build_engine(cfg, Topology(cfg.parallel))
    micro = batch.split(cfg.train.micro_batch_size)

    def one_step(scale: float) -> None:
        for mb in micro:
            engine.backward(engine(mb[:, :-1], labels=mb[:, 1:]).loss * scale)
            stepper.step()

    one_step(1.0)
    checks.that(f"zero={zero}: a finite step is not skipped", not stepper.skipped.item())
    before = _engine_state(engine)
    one_step(float("nan"))
    checks.that(f"zero={zero}: a NaN gradient's step is flagged skipped", stepper.skipped.item())
    checks.that(f"zero={zero}: the skipped step's norm reads inf", stepper.grad_norm.item() == float("inf"))
    after = _engine_state(engine)
    checks.that(f"zero={zero}: parameters and Adam state unchanged by the skipped step",
                len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))

    # Adam state as the unfused AdamW of earlier versions saved it: group options off, step counters as they were.
    base = engine.optimizer if zero == 0 else engine.optimizer.optimizer
    for group in base.param_groups:
        group.update(fused=False, foreach=False)
    stepper.adopt_loaded_state()
    checks.that(f"zero={zero}: adopted groups step fused", all(g["fused"] for g in base.param_groups))
    one_step(1.0)
    steps = {float(s["step"]) for s in base.state.values()}
    checks.that(f"zero={zero}: after adoption the next step is applied (Adam step 2, skipped one not counted)",
                steps == {2.0} and not stepper.skipped.item())


def guard_matches_one_process(checks: Checks, overrides: list[str]) -> None:
    """Harness worker: ZeRO-0/1/2 engines vs the one-process reference, then skip and adoption per stage."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, _cfg(overrides).model.vocab_size, (8, 33), generator=gen) for _ in range(STEPS)]
    ref = reference_steps(checks, _cfg(overrides), batches)
    for zero in (0, 1, 2):
        check_engine(checks, _cfg(overrides, zero=zero), batches, ref)
        _skip_and_resume(checks, zero, batches[0])


@pytest.mark.multiproc
def test_guarded_step_clips_as_one_process_and_skips_nonfinite_updates_at_zero_0_1_2() -> None:
    run_workers(guard_matches_one_process, world=1, timeout=600, overrides=OVERRIDES).assert_ok()
