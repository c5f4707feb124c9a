"""Exactness of parallel engines: a plain-torch one-process reference and the engine-vs-reference check.

Used by the harness workers of test_ep.py and test_sp.py. Every rank trains the reference on the
whole global batch (no DeepSpeed, one process's arithmetic); an engine built by the trainer's own
``build_engine`` must reproduce its updated parameters and router biases to ``TOL``, and its losses
and gradient norms (clipping engaged) to a relative ``TOL`` (a loss of 8.3 has an fp32 spacing of
9.5e-7). The configs use lr 1e-4, so an Adam step moves weights by ~1e-4 and ``TOL`` is 1% of it.
"""

from __future__ import annotations

import torch

from harness import Checks
from moesaic.configs import Config
from moesaic.model.attention.elastic import draw_modes

TOL = 1e-6


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference_steps(checks: Checks, cfg: Config, batches: list[torch.Tensor]) -> list[dict]:
    """Plain torch, one process: per step the global loss, the pre-clip norm, then params and biases.

    Also checks that the run is a meaningful reference: a step moves weights far beyond ``TOL`` and
    the last gradient norm is far above the clip, so that clipping is exercised.
    """
    from moesaic.trainer.engine import build_model, build_optimizer
    from moesaic.trainer.schedule import lr_multiplier

    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train))
    records = [{"params": {k: v.detach().clone() for k, v in model.named_parameters()}}]
    for step, batch in enumerate(batches):
        draw_modes(model, step, cfg.train.seed)
        micro = batch.split(cfg.train.micro_batch_size)
        loss = 0.0
        for mb in micro:
            out = model(mb[:, :-1], labels=mb[:, 1:])
            (out.loss / len(micro)).backward()
            loss += out.lm_loss.item() / len(micro)
        # The true norm, in fp64: torch's fp32 clip_grad_norm_ is 8e-6 (relative) off here.
        norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt().item()
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.train.grad_clip, torch.tensor(norm))
        opt.step()
        sched.step()
        opt.zero_grad()
        for r in model.routers():
            r.update_bias(r.load_counts)
            r.reset_load_counts()
        records.append({"loss": loss, "norm": norm, "bias": [r.expert_bias.clone() for r in model.routers()],
                        "params": {k: v.detach().clone() for k, v in model.named_parameters()}})
    step_size = _max_diff(records[1]["params"], records[0]["params"])
    checks.above("reference: a step moves weights far beyond TOL", step_size, 50 * TOL)
    checks.above("reference: the last gradient norm engages clipping", records[-1]["norm"], 10 * cfg.train.grad_clip)
    return records


def param_diff(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> float:
    """Max |difference| to the reference as this rank holds it: routed experts are its expert-parallel slice."""
    from moesaic.model.moe import GroupedExperts

    slices = {name: slice(m.expert_offset, m.expert_offset + m.num_local_experts)
              for name, m in model.named_modules() if isinstance(m, GroupedExperts)}
    diffs = [(p - ref[name][slices.get(name.rpartition(".")[0], slice(None))]).abs().max().item()
             for name, p in model.named_parameters()]
    return max(diffs)


def check_engine(checks: Checks, cfg: Config, batches: list[torch.Tensor], ref: list[dict]) -> None:
    """``build_engine(cfg)`` trained on ``batches`` as the trainer does, against the one-process ``ref``."""
    import torch.distributed as dist

    from moesaic.parallel.topology import Topology
    from moesaic.trainer.balance import update_router_biases
    from moesaic.trainer.data import rank_slice, sequence_shard
    from moesaic.trainer.engine import build_engine

    sp, ep = cfg.parallel.sp, cfg.parallel.ep
    topo = Topology(cfg.parallel)
    engine, _, stepper = build_engine(cfg, topo)
    model = engine.module
    tag = f"sp={sp} dp={topo.dp} ep={ep} zero={cfg.train.zero_stage}"
    checks.that(f"{tag}: engine has MoE layers iff ep > 1", engine.has_moe_layers == (ep > 1))
    checks.that(f"{tag}: engine's sequence-parallel size", engine.sequence_parallel_size == sp)
    checks.that(f"{tag}: parameter names as in one process",
                {n for n, _ in model.named_parameters()} == ref[0]["params"].keys())
    checks.at_most(f"{tag}: initial parameters", param_diff(model, ref[0]["params"]), 0.0)
    micro = cfg.train.micro_batch_size
    for step, batch in enumerate(batches, start=1):
        draw_modes(model, step - 1, cfg.train.seed)
        loss = torch.zeros((), dtype=torch.float64)
        for ids in rank_slice(range(len(batch)), topo.dp_rank, topo.dp, micro):
            inputs, labels = sequence_shard(batch[ids], topo.sp_rank, sp)
            out = engine(inputs, labels=labels)
            engine.backward(out.loss)
            stepper.step()
            loss += out.lm_loss.detach().double()
        update_router_biases(model.routers())
        dist.all_reduce(loss)  # shares of every shard of every micro-batch
        diffs = {"loss (relative)": abs(loss.item() / (len(batch) // micro) / ref[step]["loss"] - 1),
                 "grad norm (relative)": abs(stepper.grad_norm.item() / ref[step]["norm"] - 1),
                 "params": param_diff(model, ref[step]["params"]),
                 "bias": max((r.expert_bias - b).abs().max().item()
                             for r, b in zip(model.routers(), ref[step]["bias"]))}
        for key, d in diffs.items():
            checks.at_most(f"{tag} step {step}: {key}", d, TOL)
    biases = torch.stack([r.expert_bias for r in model.routers()])
    gathered = [torch.empty_like(biases) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, biases)
    checks.that(f"{tag}: router biases equal on every rank", all(torch.equal(g, biases) for g in gathered))
