"""Topology-independent checkpoint state: experts keyed by global id, optimizer state unpartitioned.

DeepSpeed's own files (``mp_rank_00_model_states.pt``, ZeRO shards) reload only at the world
size, EP degree, ZeRO stage and dtype they were written at, and its universal-checkpoint
conversion fails for MoE (the experts of different EP ranks share parameter names and are merged
as if they were ZeRO shards). So every checkpoint also carries, whatever its topology:

``layer_{i}_expert_{g}_mp_rank_00_model_states.pt``
    weights of global expert ``g`` of the i-th MoE layer, keys ``{module}.{w1,w2,w3}.{g}``:
    DeepSpeed's per-expert file name and AutoEP's key format (DeepSpeed reads these by itself
    when it loads a checkpoint into an expert-parallel model).
``portable/layer_{i}_expert_{g}.pt``
    that expert's fp32 master weights and Adam moments, ``{w: {"fp32", "exp_avg", "exp_avg_sq"}}``.
``portable/dense.pt``
    ``{"step": optimizer step, "params": {name: {"fp32", "exp_avg", "exp_avg_sq"}}}`` for every
    other parameter.

Saving gathers each parameter's full master and moments over the ranks that partition it
(DeepSpeed's ``safe_get_full_*``, a collective over that parameter's data-parallel group); the
first rank of each expert-data-parallel group writes its experts, rank 0 the rest. At the saved
layout the trainer loads through DeepSpeed (bit-identical resume) with ``module_loader``; at any
other layout ``load_resharded`` rebuilds parameters, masters, moments and the LR schedule from
these files alone, each rank taking the experts it now owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from deepspeed.utils import groups, safe_get_full_fp32_param, safe_get_full_optimizer_state
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
from deepspeed.utils.tensor_fragment import map_to_flat_opt_states
from torch import nn

from moesaic.configs import Config
from moesaic.model.moe import GroupedExperts

from .ep import ShardedExperts

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
PORTABLE = "portable"
EXPERT_WEIGHTS = ("w1", "w2", "w3")


def expert_weights_file(ckpt: Path, layer: int, gid: int) -> Path:
    return ckpt / f"layer_{layer}_expert_{gid}_mp_rank_00_model_states.pt"


def expert_state_file(ckpt: Path, layer: int, gid: int) -> Path:
    return ckpt / PORTABLE / f"layer_{layer}_expert_{gid}.pt"


def expert_modules(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    """Routed-expert modules in module order; the i-th owns files ``layer_{i}_*`` (DeepSpeed's MoE layer numbering)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GroupedExperts)]


def _global_ids(m: GroupedExperts) -> range:
    return range(m.expert_offset, m.expert_offset + m.num_local_experts)


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer: ZeRO-1/2 and the bf16 optimizer wrap it as ``.optimizer``; ZeRO-0 fp32 does not."""
    return getattr(optimizer, "optimizer", optimizer)


def _lp_groups(optimizer: Any) -> list[list[nn.Parameter]] | None:
    """Model parameters per param group of a partitioning optimizer (ZeRO-1/2, bf16); None for ZeRO-0 fp32."""
    return getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)


def _link_optimizer_fragments(optimizer: Any) -> None:
    """Point every parameter's optimizer-state fragments at the current flat state.

    DeepSpeed 0.19 links them once, right after stepping the first param group, when the later
    groups have no state yet: their fragments stay empty and ``safe_get_full_optimizer_state``
    fails for every parameter outside group 0.
    """
    base = _base_optimizer(optimizer)
    for lp_group, hp_group in zip(_lp_groups(optimizer) or [], base.param_groups):
        lazy_init_hp_params_optimizer_state(lp_group, hp_group["params"][0], base.state)


def _full_state(p: nn.Parameter, optimizer: Any) -> dict[str, torch.Tensor]:
    """fp32 master and Adam moments of p, unpartitioned; a collective over p's group under ZeRO-1/2."""
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: fragments of flat fp32 partitions
        return {"fp32": safe_get_full_fp32_param(p),
                **{k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}}
    state = optimizer.state[p]
    return {"fp32": p.detach().float().clone(), **{k: state[k].clone() for k in ADAM_KEYS}}


def _is_expert_writer(m: GroupedExperts) -> bool:
    """One writer per expert slice: the first replica of it (rank 0 without expert parallelism)."""
    if isinstance(m, ShardedExperts):
        return groups._get_expert_data_parallel_rank(m.expert_group_name) == 0
    return dist.get_rank() == 0


def save(engine: Any, ckpt: Path) -> None:
    """Write the topology-independent state of ``engine`` into ``ckpt``; call on every rank."""
    model, optimizer = engine.module, engine.optimizer
    (ckpt / PORTABLE).mkdir(parents=True, exist_ok=True)
    _link_optimizer_fragments(optimizer)
    experts = expert_modules(model)
    expert_params = {id(p) for _, m in experts for p in m.parameters()}
    for layer, (name, m) in enumerate(experts):
        states = {w: _full_state(getattr(m, w), optimizer) for w in EXPERT_WEIGHTS}  # each [L, ...]
        if not _is_expert_writer(m):
            continue
        for i, gid in enumerate(_global_ids(m)):
            torch.save({f"{name}.{w}.{gid}": getattr(m, w).detach()[i].clone() for w in EXPERT_WEIGHTS},
                       expert_weights_file(ckpt, layer, gid))
            torch.save({w: {k: t[i].clone() for k, t in s.items()} for w, s in states.items()},
                       expert_state_file(ckpt, layer, gid))
    dense = {}
    for name, p in model.named_parameters():
        if id(p) not in expert_params:
            state = _full_state(p, optimizer)  # every rank joins the gather; rank 0 keeps it
            if dist.get_rank() == 0:
                dense[name] = state
    if dist.get_rank() == 0:
        step = int(next(iter(_base_optimizer(optimizer).state.values()))["step"])
        torch.save({"step": step, "params": dense}, ckpt / PORTABLE / "dense.pt")


def module_loader(ckpt: Path) -> Callable[..., None]:
    """DeepSpeed ``custom_load_fn``: the module file for everything but routed experts, which come
    from the per-expert files of the experts this rank holds (at any saved EP degree).

    Any expert keys in ``src`` (full tensors saved without EP, or the per-expert entries DeepSpeed
    merges in under EP) are ignored, so there is one way experts are read.
    """

    def load(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
        experts = expert_modules(dst)
        prefixes = tuple(f"{name}." for name, _ in experts)
        result = dst.load_state_dict({k: v for k, v in src.items() if not k.startswith(prefixes)}, strict=False)
        expected = {f"{name}.{w}" for name, _ in experts for w in EXPERT_WEIGHTS}
        if result.unexpected_keys or set(result.missing_keys) != expected:
            missing = sorted(set(result.missing_keys) - expected)
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, "
                               f"unexpected {sorted(result.unexpected_keys)}")
        with torch.no_grad():
            for layer, (name, m) in enumerate(experts):
                gids = _global_ids(m)
                files = [torch.load(expert_weights_file(ckpt, layer, g), map_location="cpu") for g in gids]
                for w in EXPERT_WEIGHTS:
                    getattr(m, w).copy_(torch.stack([f[f"{name}.{w}.{g}"] for f, g in zip(files, gids)]))

    return load


def has_portable_state(ckpt: Path) -> bool:
    return (ckpt / PORTABLE / "dense.pt").is_file()


def layout(cfg: Config, world_size: int) -> dict[str, Any]:
    """What DeepSpeed's own checkpoint files depend on: recorded in the manifest, compared at resume."""
    p, t = cfg.parallel, cfg.train
    return {"world_size": world_size, "ep": p.ep, "sp": p.sp, "zero_stage": t.zero_stage, "dtype": t.dtype}


def same_layout(manifest: dict[str, Any], current: dict[str, Any]) -> bool:
    """Keys missing from older manifests count as unchanged."""
    return all(manifest.get(k, v) == v for k, v in current.items())


def _states(ckpt: Path, model: nn.Module) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """Full fp32 master and moments of every parameter this rank holds (experts: its slice), and the step."""
    dense = torch.load(ckpt / PORTABLE / "dense.pt", map_location="cpu")
    states = dense["params"]
    for layer, (name, m) in enumerate(expert_modules(model)):
        files = [torch.load(expert_state_file(ckpt, layer, g), map_location="cpu") for g in _global_ids(m)]
        for w in EXPERT_WEIGHTS:  # stacked [L, ...] like the parameter
            states[f"{name}.{w}"] = {k: torch.stack([f[w][k] for f in files]) for k in ("fp32", *ADAM_KEYS)}
    return states, dense["step"]


@torch.no_grad()
def _load_optimizer(optimizer: Any, model: nn.Module, states: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    base = _base_optimizer(optimizer)
    names = {p: name for name, p in model.named_parameters()}
    step_t = torch.tensor(float(step))
    lp_groups = _lp_groups(optimizer)
    if lp_groups is None:  # ZeRO-0 fp32: the torch optimizer steps the parameters themselves
        for p, name in names.items():
            base.state[p] = {"step": step_t.clone(), **{k: states[name][k].clone() for k in ADAM_KEYS}}
        return
    # ZeRO-1/2 and bf16: one flat fp32 partition per param group, of which each parameter may own a
    # fragment here. As DeepSpeed's universal-checkpoint loader does: put the fragments of every
    # master and moment in place, then rebuild the flat optimizer state from them.
    for lp_group, hp_group in zip(lp_groups, base.param_groups):
        for lp in lp_group:
            mapping = lp._hp_mapping
            if mapping is None:
                continue
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            fragment = {k: t.flatten().narrow(0, start, numel) for k, t in states[names[lp]].items()}
            mapping.get_hp_fragment().copy_(fragment["fp32"])
            mapping.optim_fragment = {k: fragment[k].clone() for k in ADAM_KEYS}
        flat = hp_group["params"][0]
        map_to_flat_opt_states(flat, lp_group, base.state, ADAM_KEYS)
        base.state[flat]["step"] = step_t.clone()


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    """Load an LR-scheduler state saved with another number of param groups (EP splits out the
    expert groups). moesaic's groups share one schedule, so the saved per-group lists are spread
    over the current groups; groups on different schedules cannot be matched and are refused.
    """
    per_group = ("base_lrs", "_last_lr")
    if any(len(set(state[k])) != 1 for k in per_group):
        raise ValueError("cannot reshard an LR schedule whose param groups have different learning rates")
    groups_now = scheduler.optimizer.param_groups
    scheduler.load_state_dict({**state, **{k: state[k][:1] * len(groups_now) for k in per_group}})
    for group, lr in zip(groups_now, scheduler.get_last_lr()):
        group["lr"] = lr


def load_resharded(engine: Any, scheduler: torch.optim.lr_scheduler.LRScheduler, ckpt: Path) -> dict[str, Any]:
    """Resume at a layout other than the saved one, from the portable state; returns the client state.

    Module weights come from ``module_loader``, fp32 masters, Adam moments and the step from the
    portable files, the schedule from DeepSpeed's module file (its position, not its group layout).
    """
    client = torch.load(ckpt / DS_MODEL_STATES, map_location="cpu", weights_only=False)
    module_loader(ckpt)(src=client.pop("module"), dst=engine.module)
    states, step = _states(ckpt, engine.module)
    _load_optimizer(engine.optimizer, engine.module, states, step)
    restore_scheduler(scheduler, client["lr_scheduler"])
    engine.global_steps, engine.global_samples = client["global_steps"], client["global_samples"]
    return client


def full_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The single-device model's state dict from a checkpoint of any layout, experts stacked by global id."""
    state = torch.load(ckpt / DS_MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for f in ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        for key, t in torch.load(f, map_location="cpu").items():
            weight, gid = key.rsplit(".", 1)
            experts.setdefault(weight, {})[int(gid)] = t
    state.update({w: torch.stack([e[g] for g in sorted(e)]) for w, e in experts.items()})
    return state
