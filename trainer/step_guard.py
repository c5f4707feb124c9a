"""Gradient clipping and the skip of non-finite updates, kept on the device, outside DeepSpeed.

DeepSpeed's ZeRO-1/2 step reads the global gradient norm on the host to decide whether to skip an
update (and again to clip it): on a GPU that waits for the whole step's queue, every step. Here the
norm stays a device tensor. Its clip factor and a non-finite flag reach fused AdamW as ``grad_scale``
and ``found_inf``, the mechanism torch's GradScaler uses: the kernel divides the gradients by the
factor, and on the flag leaves parameters, moments and step count as they were. DeepSpeed is told
neither to clip nor to compute the norm (``deepspeed_fields``); the trainer reads each step's flag
with its losses at the steps that check for faults.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# DeepSpeed's per-group norms mark a non-finite group as -1; its clip adds this before dividing.
_CLIP_EPS = 1e-6


def deepspeed_fields(zero_stage: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config entries that leave clipping and the finiteness check to ``GuardedStep``."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        zero["compute_grad_norm"] = False
    return {"gradient_clipping": 0.0, "zero_optimization": zero,
            "bf16": {"enabled": bf16, "check_grad_overflow": False}}


class GuardedStep:
    """``step()`` replaces ``engine.step()``: at an accumulation boundary it arms the optimizer first.

    ``grad_norm`` and ``skipped`` are the last boundary's global pre-clip norm (inf when non-finite)
    and whether its update was left out, both device tensors.
    """

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        self.engine, self.optimizer, self.max_norm = engine, optimizer, max_norm
        self.grad_norm = torch.zeros(())
        self.skipped = torch.zeros((), dtype=torch.bool)

    def step(self) -> None:
        if self.engine.is_gradient_accumulation_boundary():
            self._arm()
        self.engine.step()

    def _arm(self) -> None:
        norm = self._global_norm()
        bad = ~torch.isfinite(norm) | (norm < 0)
        self.optimizer.found_inf = bad.float()
        if self.max_norm > 0:  # as DeepSpeed clips: divide by max(1, (norm + eps) / max_norm)
            self.optimizer.grad_scale = ((norm.float() + _CLIP_EPS) / self.max_norm).clamp(min=1.0)
        self.grad_norm = torch.where(bad, math.inf, norm)
        self.skipped = bad

    def _global_norm(self) -> torch.Tensor:
        """The norm of the whole reduced gradient, as DeepSpeed's own step would compute it (ZeRO-1/2: one
        all-reduce over the partitions; ZeRO-0: none, every rank holds the whole averaged gradient)."""
        zero = self.engine.optimizer
        if zero is self.optimizer:  # ZeRO-0 fp32: the gradients are the parameters' own, already averaged
            # Per tensor in fp64, as DeepSpeed's ZeRO norm: fp32 sums of squares drift in the 6th digit.
            norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64)
                     for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            return torch.linalg.vector_norm(torch.stack(norms)).float()
        return zero.scaled_global_norm()  # ZeRO-1/2: over partitions, expert groups included

    def adopt_loaded_state(self) -> None:
        """Call after loading a checkpoint: one written by an unfused AdamW (before this module) restores its
        group options, and it and the portable loader leave step counters on the host, where fused needs them
        on the parameters' device."""
        for group in self.optimizer.param_groups:
            group.update(fused=True, foreach=False)
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(p.device, torch.float32)
