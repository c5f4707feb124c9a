"""The one place a DeepSpeed engine is assembled: model -> init_from -> EP -> SP -> optimizer -> DeepSpeed.

The trainer, the multi-process exactness tests and ``benchmarks/sp_scaling.py`` all build through
``build_engine``, so what the tests compare against one process is what training runs. Call it on
every rank after ``init_distributed`` (DeepSpeed's expert groups need ``deepspeed.comm`` started)
and after creating the run's ``Topology``; nothing here imports DeepSpeed at module load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..configs import Config
from ..model import Transformer
from ..model.checkpointing import apply_activation_checkpointing
from ..model.interop import load_hf_into
from .rng import seed_everything
from .schedule import lr_multiplier
from .step_guard import GuardedStep, deepspeed_fields

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from ..parallel.topology import Topology


def deepspeed_config(cfg: Config, dp: int) -> dict:
    """DeepSpeed's JSON config for ``dp`` data-parallel ranks (sequence ranks share a data rank's batch)."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        **deepspeed_fields(t.zero_stage, bf16=t.dtype == "bf16"),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch's fused AdamW (no JIT-compiled ops; ``GuardedStep`` clips and skips through it); matrices decay,
    vectors (norms, sinks, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if cfg.parallel.ep > 1:
        from ..parallel.ep import split_expert_param_groups  # deepspeed loads after init_distributed

        groups = split_expert_param_groups(groups)
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def build_model(cfg: Config) -> Transformer:
    """The single-device model every rank starts from: seeded by ``cfg.train.seed``, or ``init_from``'s weights.

    Seeding here makes the initial weights a function of the config alone, so one-process
    references that build through this function start from the very same weights as an engine.
    """
    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model)
    if cfg.model.init_from:  # start from a transformers DeepSeek-V4 checkpoint (every rank reads it)
        load_hf_into(model, cfg.model.init_from)
    return model


def build_engine(cfg: Config, topology: Topology
                 ) -> tuple[DeepSpeedEngine, torch.optim.lr_scheduler.LRScheduler, GuardedStep]:
    """The model of ``build_model``, sharded by ``cfg.parallel`` over ``topology``, inside a DeepSpeed engine.

    Returns the engine (its ``module`` is the sharded Transformer), the LR scheduler DeepSpeed steps, and
    the ``GuardedStep`` to call instead of ``engine.step()`` (it clips and skips non-finite updates).
    """
    import deepspeed

    model = build_model(cfg)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.parallel.ep > 1:
        from ..parallel.ep import apply_expert_parallel

        apply_expert_parallel(model, cfg.parallel.ep)
    if cfg.parallel.sp > 1:
        from ..parallel.sp import apply_sequence_parallel

        apply_sequence_parallel(model, topology)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.train))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, topology.dp),
        mpu=topology if cfg.parallel.sp > 1 else None)  # DeepSpeed sees sequence ranks only via an mpu
    return engine, scheduler, GuardedStep(engine, optimizer, cfg.train.grad_clip)
