"""Expert parallelism on gloo: exactness against one process, dispatch, and the EP configuration checks.

The multi-process checks run this file under torchrun (``python -m torch.distributed.run ...
tests/test_ep.py``): one launch builds many DeepSpeed engines, because each launch costs 10-30 s
here. Every rank also trains a plain-torch reference on the whole global batch (no DeepSpeed, one
process's arithmetic), and every engine must reproduce its updated parameters and router biases
to 1e-6, and its losses and gradient norms (clipping engaged) to a relative 1e-6 (a loss of 8.3
has an fp32 spacing of 9.5e-7).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesaic.configs import ConfigError, load_config, validate

from trainrun import FAST, env, free_port

STEPS = 3
TOL = 1e-6
# Gradient accumulation of 2 micro-batches at world 2; a clip far below the gradient norm, so the
# update depends on the global norm; a sequence aux loss and bias balancing on. lr 1e-4: an Adam
# step moves weights by ~1e-4, so 1e-6 is 1% of an update. (At lr 3e-3 even plain data parallelism
# drifts 1e-5 from one process by step 3: Adam amplifies fp32 summation-order noise in gradients
# near zero, whatever the parallelism.)
OVERRIDES = FAST + ["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_clip=0.05",
                    "train.warmup_steps=1", "train.lr=1e-4", "model.moe.seq_aux_loss_coef=0.01",
                    "model.moe.bias_update_rate=0.01"]


def _cfg(ep: int = 1, zero: int = 1):
    return load_config("tiny", OVERRIDES + [f"parallel.ep={ep}", f"train.zero_stage={zero}"])


def torchrun(nproc: int, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={free_port()}", __file__],
                          capture_output=True, text=True, timeout=timeout, env=env(), cwd=Path(__file__).parent)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.multiproc
def test_ep2_matches_single_process_zero1_zero2() -> None:
    out = torchrun(2)
    assert "ALL OK" in out, out
    print(out)


@pytest.mark.multiproc
def test_dp2_x_ep2_and_ep4_match_single_process() -> None:
    out = torchrun(4)
    assert "ALL OK" in out, out
    print(out)


@pytest.mark.parametrize("overrides, world, message", [
    (["model.moe.num_experts=6", "parallel.ep=4"], None, "model.moe.num_experts=6 must be divisible by parallel.ep=4"),
    (["parallel.ep=2"], 3, "parallel.ep=2 and parallel.sp=1 must divide the world size 3"),
    (["parallel.ep=2", "train.zero_stage=3"], None, "DeepSpeed refuses MoE with ZeRO-3"),
    (["parallel.ep=2", "train.zero_stage=0"], None, "train.zero_stage=0 cannot run parallel.ep=2: use 1 or 2"),
    (["parallel.ep=2", "model.ffn_types=[dense,dense]"], None, "parallel.ep=2 needs MoE layers"),
])
def test_ep_misconfigurations_are_one_line(overrides: list[str], world: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate(load_config("tiny", FAST + overrides), world_size=world)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ---- the torchrun worker ---------------------------------------------------------------------------

def _reference(cfg, batches: list[torch.Tensor]) -> list[dict]:
    """Plain torch, one process: per step the global loss, the pre-clip norm, then params and biases."""
    from moesaic.model import Transformer
    from moesaic.trainer.loop import build_optimizer
    from moesaic.trainer.rng import seed_everything
    from moesaic.trainer.schedule import lr_multiplier

    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train))
    records = [{"params": {k: v.detach().clone() for k, v in model.named_parameters()}}]
    for batch in batches:
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
    return records


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as in one process: expert slices gathered over their expert-parallel group."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moesaic.parallel.ep import ShardedExperts

    out = {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, m in model.named_modules():
        if isinstance(m, ShardedExperts):
            group = groups._get_expert_parallel_group(m.expert_group_name)
            for w in ("w1", "w2", "w3"):
                parts = [torch.empty_like(getattr(m, w)) for _ in range(m.ep_size)]
                dist.all_gather(parts, getattr(m, w).detach().contiguous(), group=group)
                out[f"{name}.{w}"] = torch.cat(parts)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _check_engine(ep: int, zero: int, batches: list[torch.Tensor], ref: list[dict], worst: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    from moesaic.model import Transformer
    from moesaic.parallel.ep import apply_expert_parallel
    from moesaic.trainer.balance import update_router_biases
    from moesaic.trainer.data import rank_slice
    from moesaic.trainer.loop import build_optimizer, deepspeed_config
    from moesaic.trainer.rng import seed_everything
    from moesaic.trainer.schedule import lr_multiplier

    cfg = _cfg(ep, zero)
    world, rank = dist.get_world_size(), dist.get_rank()
    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model)
    if ep > 1:
        apply_expert_parallel(model, ep)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, world))
    assert engine.has_moe_layers == (ep > 1)
    tag = f"ep={ep} zero={zero}"
    assert _max_diff(_full_params(model), ref[0]["params"]) == 0.0, f"{tag}: initial parameters differ"
    for step, batch in enumerate(batches, start=1):
        loss = torch.zeros(())
        for ids in rank_slice(range(len(batch)), rank, world, cfg.train.micro_batch_size):
            mb = batch[ids]
            out = engine(mb[:, :-1], labels=mb[:, 1:])
            engine.backward(out.loss)
            engine.step()
            loss += out.lm_loss.detach()
        update_router_biases(model.routers())
        dist.all_reduce(loss)
        loss = loss.item() / (len(batch) // cfg.train.micro_batch_size)
        diffs = {"loss (relative)": abs(loss / ref[step]["loss"] - 1),
                 "grad norm (relative)": abs(float(engine.get_global_grad_norm()) / ref[step]["norm"] - 1),
                 "params": _max_diff(_full_params(model), ref[step]["params"]),
                 "bias": max((r.expert_bias - b).abs().max().item()
                             for r, b in zip(model.routers(), ref[step]["bias"]))}
        for key, d in diffs.items():
            assert d <= TOL, f"{tag} step {step}: {key} differs from one process by {d:.3g}"
            worst[key] = max(worst.get(key, 0.0), d)
    biases = torch.stack([r.expert_bias for r in model.routers()])
    gathered = [torch.empty_like(biases) for _ in range(world)]
    dist.all_gather(gathered, biases)
    assert all(torch.equal(g, biases) for g in gathered), f"{tag}: router biases differ across ranks"
    assert ref[-1]["norm"] > 10 * cfg.train.grad_clip, "the test should exercise clipping"


def _check_dispatcher(ep: int) -> None:
    """All-to-all dispatch equals the local one, values and gradients, with empty splits and an idle expert."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moesaic.model.moe import GroupedExperts, LocalDispatcher
    from moesaic.parallel.dispatch import AllToAllDispatcher
    from moesaic.parallel.ep import ShardedExperts, expert_group_name

    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts, tokens, k, dim = 2 * ep, 6, 2, 8
    full = GroupedExperts(num_experts, dim, 16, seed=7)
    name = expert_group_name(ep)
    ep_rank = groups._get_expert_parallel_rank(name)
    shard = ShardedExperts(full, ep_rank, ep, name)
    gen = torch.Generator().manual_seed(100)
    xs = [torch.randn(tokens, dim, generator=gen) for _ in range(world)]
    # Rank 0 routes only to its own experts (it sends nothing to the others); the last expert is idle.
    idx = [torch.randint(0, 2 if r == 0 else num_experts - 1, (tokens, k), generator=gen) for r in range(world)]
    gates = [torch.rand(tokens, k, generator=gen) for _ in range(world)]
    x = xs[rank].clone().requires_grad_()
    a2a = AllToAllDispatcher(num_experts, groups._get_expert_parallel_group(name))
    expert_x, counts, state = a2a.dispatch(x, idx[rank])
    y = a2a.combine(shard(expert_x, counts), gates[rank], state)
    y.square().sum().backward()
    local = LocalDispatcher(num_experts)
    x_ref = torch.cat(xs).requires_grad_()
    ex, c, st = local.dispatch(x_ref, torch.cat(idx))
    y_ref = local.combine(full(ex, c), torch.cat(gates), st)
    y_ref.square().sum().backward()  # the sum over all ranks' tokens: the experts' gradient
    mine = slice(rank * tokens, (rank + 1) * tokens)
    assert torch.allclose(y, y_ref[mine], atol=TOL, rtol=0), (y - y_ref[mine]).abs().max()
    assert torch.allclose(x.grad, x_ref.grad[mine], atol=TOL, rtol=0)
    grads = torch.stack([shard.w1.grad, shard.w3.grad]).contiguous()  # summed over the EP group's ranks
    dist.all_reduce(grads, group=groups._get_expert_data_parallel_group(name))
    lo, hi = shard.expert_offset, shard.expert_offset + shard.num_local_experts
    assert torch.allclose(grads, torch.stack([full.w1.grad, full.w3.grad])[:, lo:hi], atol=1e-5, rtol=1e-6)


def main() -> None:
    import torch.distributed as dist

    from moesaic.trainer.distributed import destroy, init_distributed

    init_distributed("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, _cfg().model.vocab_size, (8, 33), generator=gen) for _ in range(STEPS)]
    ref = _reference(_cfg(), batches)
    assert _max_diff(ref[1]["params"], ref[0]["params"]) > 50 * TOL, "a step must move weights far beyond TOL"
    runs = [(1, 1), (2, 1), (2, 2)] if world == 2 else [(2, 1), (2, 2), (4, 2)]  # (ep, zero stage)
    worst: dict[str, float] = {}
    try:
        for ep in sorted({ep for ep, _ in runs if ep > 1}):
            _check_dispatcher(ep)
        for ep, zero in runs:
            _check_engine(ep, zero, batches, ref, worst)
            if rank == 0:
                print(f"world {world} ep={ep} zero={zero}: ok", flush=True)
        if rank == 0:
            print("max |difference| to one process over", STEPS, "steps:",
                  ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
            print("ALL OK", flush=True)
    finally:
        destroy()


if __name__ == "__main__":
    main()
