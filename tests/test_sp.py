"""Sequence parallelism on gloo: exactness against one process, resume, and the SP configuration checks.

The multi-process checks run this file under torchrun (``python -m torch.distributed.run ...
tests/test_sp.py``); one launch runs many checks, because each launch costs 10-40 s here.

* Model level (no DeepSpeed): the sequence-parallel model on each rank's shard vs the same model on
  whole sequences, for a SWA + CSA + HCA layout whose shards start at a compression window, so the
  sliding window, a CSA entry's look-back and the HCA entries all cross the shard edge (and, in a
  second variant, a window longer than a shard, query chunks, mHC and a hash-routed layer):
  logits, loss (the shards' shares summed), aux loss and every gradient (summed over the shards).
* Engine level (DeepSpeed, the trainer's own pieces): 3 optimizer steps of 2 micro-batches vs a
  plain-torch reference on the global batch: losses and gradient norms (clipping engaged) to a
  relative 1e-6 (1e-6 is about one fp32 ulp at a loss of 8), updated parameters and router biases
  to 1e-6; sp=2 under ZeRO-1/2, sp=2 with ep=2 on the same 2 ranks, and sp=2 x dp=2 with ep=2.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesaic.configs import ConfigError, check_trainable, load_config, validate
from moesaic.parallel.portable import full_model_state

from test_ep import _reference as reference_steps  # plain torch, one process, whole sequences
from trainrun import FAST, assert_identical, command, env, free_port, latest, losses, train

TOL = 1e-6
STEPS = 3
# S = 32 in 2 shards of 16: windows of 4 (CSA) and 8 (HCA) tokens end at the shard edge.
LAYOUT = ["model.num_layers=3", "model.layer_types=[swa,csa,hca]", "model.ffn_types=[dense,moe,moe]",
          "data.seq_len=32", "model.attention.common.window=8", "model.attention.menu.csa.ratio=4", "model.attention.menu.hca.ratio=8",
          "model.attention.menu.csa.index_topk=4", "model.attention.menu.csa.index_heads=4", "model.attention.menu.csa.index_head_dim=16",
          "model.attention.common.rope_head_dim=8", "model.moe.seq_aux_loss_coef=0.01", "model.moe.bias_update_rate=0.01"]
# Window longer than a shard, query chunks that do not align with it, mHC and a hash-routed first layer.
VARIANT = ["model.attention.common.window=20", "model.attention.common.query_chunk=5", "model.hc_mult=2",
           "model.ffn_types=[moe,moe,dense]", "model.moe.num_hash_layers=1"]
# lr 1e-4 and a clip far below the gradient norm, as in test_ep.py: 1e-6 is 1% of an Adam step.
OVERRIDES = FAST + LAYOUT + ["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_clip=0.05",
                             "train.warmup_steps=1", "train.lr=1e-4"]


def _cfg(sp: int = 1, ep: int = 1, zero: int = 1, extra: tuple[str, ...] = ()):
    return load_config("tiny", OVERRIDES + [f"parallel.sp={sp}", f"parallel.ep={ep}", f"train.zero_stage={zero}",
                                            *extra])


def torchrun(nproc: int, timeout: float = 900) -> str:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={free_port()}", __file__],
                          capture_output=True, text=True, timeout=timeout, env=env(), cwd=Path(__file__).parent)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, \
        f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.multiproc
def test_sp2_and_sp2_with_ep2_on_two_ranks_match_one_process() -> None:
    print(torchrun(2))


@pytest.mark.multiproc
def test_sp2_x_dp2_with_ep2_on_four_ranks_matches_one_process() -> None:
    print(torchrun(4))


@pytest.mark.multiproc
def test_sp2_x_dp2_ep2_resume_is_bit_identical_and_resumes_at_another_dp(tmp_path: Path, tiny_corpus) -> None:
    common = FAST + LAYOUT + [f"data.dataset={tiny_corpus.glob}", "model.vocab_size=512",
                              f"data.cache_dir={tmp_path / 'cache'}", "train.steps=4", "checkpoint.every=2",
                              "train.zero_stage=2", "train.lr=1e-4", "train.eval_every=100", "train.sample_tokens=0",
                              "parallel.sp=2", "parallel.ep=2"]
    straight, same, fewer = tmp_path / "straight", tmp_path / "same", tmp_path / "dp1"
    train(common + [f"run_dir={straight}"], nproc=4)
    mid = straight / "checkpoints" / "step_00000002"
    out = train(common + [f"run_dir={same}", f"checkpoint.resume={mid}"], nproc=4)
    assert "resumed from" in out.stdout and "resharding" not in out.stdout
    after = {s: v for s, v in losses(straight).items() if s > 2}
    assert losses(same) == after  # bit-identical floats
    assert_identical(full_model_state(latest(straight)), full_model_state(latest(same)))
    out = train(common + [f"run_dir={fewer}", f"checkpoint.resume={mid}"], nproc=2)  # dp 2 -> 1
    assert "resharding" in out.stdout
    assert losses(fewer).keys() == after.keys()
    assert all(abs(losses(fewer)[s] - v) <= TOL * abs(v) for s, v in after.items()), (losses(fewer), after)
    a, b = full_model_state(latest(straight)), full_model_state(latest(fewer))
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= TOL, f"weights after resuming at dp=1 differ by {worst:.3g}"
    print(f"resume at dp 2 -> 1: max |weight difference| {worst:.2e}")


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.sp=2", "data.seq_len=24"], None,
     "data.seq_len=24 must be divisible by parallel.sp=2 x model.attention.menu.csa.ratio=4 x model.attention.menu.hca.ratio=8"),
    (["parallel.sp=3", "model.layer_types=[swa,swa,swa]", "data.seq_len=32"], None,
     "data.seq_len=32 must be divisible by parallel.sp=3 (equal sequence shards)"),
    (["parallel.sp=2"], 3, "parallel.ep=1 and parallel.sp=2 must divide the world size 3"),
    (["parallel.sp=2", "train.zero_stage=0"], None, "train.zero_stage=0 cannot run parallel.sp=2: use 1 or 2"),
])
def test_sp_misconfigurations_are_one_line(overrides: list[str], world: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate(load_config("tiny", OVERRIDES + overrides), world_size=world)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_sp_with_mtp_is_refused_and_ep_may_share_the_sp_ranks() -> None:
    with pytest.raises(ConfigError, match=r"model.mtp_layers=1 cannot run with parallel.sp=2 yet"):
        check_trainable(load_config("tiny", OVERRIDES + ["parallel.sp=2", "model.mtp_layers=1"]))
    validate(_cfg(sp=2, ep=2, zero=2), world_size=2)  # expert-parallel groups over the sequence-parallel ranks


def test_sp_not_dividing_the_world_fails_at_start_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(command(FAST + [f"run_dir={tmp_path}", "parallel.sp=2"]),
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "moesaic: error: parallel.ep=1 and parallel.sp=2 must divide the " \
                                                   "world size 1", proc.stderr[-3000:]


def test_sequence_shard_splits_inputs_and_labels_of_the_same_positions() -> None:
    from moesaic.trainer.data import sequence_shard

    blocks = torch.arange(2 * 9).view(2, 9)
    shards = [sequence_shard(blocks, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([i for i, _ in shards], dim=1), blocks[:, :-1])
    assert torch.equal(torch.cat([lb for _, lb in shards], dim=1), blocks[:, 1:])
    assert shards[0][1][0, -1] == shards[1][0][0, 0]  # a shard's last label is the next shard's first input


# ---- the torchrun worker ---------------------------------------------------------------------------

def _check_model(topology, extra: tuple[str, ...], worst: dict) -> None:
    """One forward + backward of the sharded model vs the same model on the whole sequences (no DeepSpeed)."""
    import torch.distributed as dist

    from moesaic.model import Transformer
    from moesaic.parallel.sp import apply_sequence_parallel
    from moesaic.trainer.data import sequence_shard
    from moesaic.trainer.rng import seed_everything

    cfg = _cfg(extra=extra)
    seed_everything(cfg.train.seed)
    whole = Transformer(cfg.model)
    sharded = copy.deepcopy(whole)
    apply_sequence_parallel(sharded, topology)
    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=gen)
    ref = whole(blocks[:, :-1], labels=blocks[:, 1:])
    ref.loss.backward()
    inputs, labels = sequence_shard(blocks, topology.sp_rank, topology.sp)
    out = sharded(inputs, labels=labels)
    out.loss.backward()
    s = inputs.shape[1]
    mine = slice(topology.sp_rank * s, (topology.sp_rank + 1) * s)
    shares = torch.stack([out.loss, out.aux_loss]).detach().double()
    dist.all_reduce(shares, group=topology.sp_group)
    grads = {n: p.grad.clone() for n, p in sharded.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g, group=topology.sp_group)
    with torch.no_grad():
        logits_diff = (sharded(inputs).logits - whole(blocks[:, :-1]).logits[:, mine]).abs().max().item()
    diffs = {"logits": logits_diff,
             "loss (relative)": abs(shares[0].item() / ref.loss.item() - 1),
             "aux loss (relative)": abs(shares[1].item() / ref.aux_loss.item() - 1),
             "gradients": max((grads[n] - p.grad).abs().max().item() for n, p in whole.named_parameters())}
    assert ref.aux_loss > 0 and all(p.grad is not None for p in whole.parameters())
    for key, d in diffs.items():
        assert d <= TOL, f"model {extra}: {key} differs from one process by {d:.3g}"
        worst[key] = max(worst.get(key, 0.0), d)


def _param_diff(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> float:
    """Max |difference| to the reference as this rank holds it: routed experts are its expert-parallel slice."""
    from moesaic.model.moe import GroupedExperts

    slices = {name: slice(m.expert_offset, m.expert_offset + m.num_local_experts)
              for name, m in model.named_modules() if isinstance(m, GroupedExperts)}
    diffs = [(p - ref[name][slices.get(name.rpartition(".")[0], slice(None))]).abs().max().item()
             for name, p in model.named_parameters()]
    return max(diffs)


def _check_engine(sp: int, ep: int, zero: int, batches: list[torch.Tensor], ref: list[dict], worst: dict) -> None:
    """The trainer's pieces (topology, shards, mpu) through DeepSpeed vs the one-process reference."""
    import deepspeed
    import torch.distributed as dist

    from moesaic.model import Transformer
    from moesaic.parallel.ep import apply_expert_parallel
    from moesaic.parallel.sp import apply_sequence_parallel
    from moesaic.parallel.topology import Topology
    from moesaic.trainer.balance import update_router_biases
    from moesaic.trainer.data import rank_slice, sequence_shard
    from moesaic.trainer.loop import build_optimizer, deepspeed_config
    from moesaic.trainer.rng import seed_everything
    from moesaic.trainer.schedule import lr_multiplier

    cfg = _cfg(sp, ep, zero)
    topo = Topology(cfg.parallel)
    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model)
    if ep > 1:
        apply_expert_parallel(model, ep)
    apply_sequence_parallel(model, topo)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, topo.dp), mpu=topo)
    tag = f"sp={sp} dp={topo.dp} ep={ep} zero={zero}"
    assert engine.has_moe_layers == (ep > 1) and engine.sequence_parallel_size == sp, tag
    assert _param_diff(model, ref[0]["params"]) == 0.0, f"{tag}: initial parameters differ"
    micro = cfg.train.micro_batch_size
    for step, batch in enumerate(batches, start=1):
        loss = torch.zeros((), dtype=torch.float64)
        for ids in rank_slice(range(len(batch)), topo.dp_rank, topo.dp, micro):
            inputs, labels = sequence_shard(batch[ids], topo.sp_rank, sp)
            out = engine(inputs, labels=labels)
            engine.backward(out.loss)
            engine.step()
            loss += out.lm_loss.detach().double()
        update_router_biases(model.routers())
        dist.all_reduce(loss)  # shares of every shard of every micro-batch
        diffs = {"loss (relative)": abs(loss.item() / (len(batch) // micro) / ref[step]["loss"] - 1),
                 "grad norm (relative)": abs(float(engine.get_global_grad_norm()) / ref[step]["norm"] - 1),
                 "params": _param_diff(model, ref[step]["params"]),
                 "bias": max((r.expert_bias - b).abs().max().item()
                             for r, b in zip(model.routers(), ref[step]["bias"]))}
        for key, d in diffs.items():
            assert d <= TOL, f"{tag} step {step}: {key} differs from one process by {d:.3g}"
            worst[key] = max(worst.get(key, 0.0), d)
    assert ref[-1]["norm"] > 10 * cfg.train.grad_clip, "the test should exercise clipping"


def main() -> None:
    import torch.distributed as dist

    from moesaic.configs import ParallelConfig
    from moesaic.parallel.topology import Topology
    from moesaic.trainer.distributed import destroy, init_distributed

    init_distributed("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = _cfg()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (8, cfg.data.seq_len + 1), generator=gen) for _ in range(STEPS)]
    worst: dict[str, float] = {}
    try:
        topology = Topology(ParallelConfig(sp=2))
        for extra in [(), tuple(VARIANT)] if world == 2 else [()]:
            _check_model(topology, extra, worst)
        ref = reference_steps(cfg, batches)
        runs = [(2, 1, 1), (2, 1, 2), (2, 2, 2)] if world == 2 else [(2, 2, 2), (2, 1, 1)]  # (sp, ep, zero)
        for sp, ep, zero in runs:
            _check_engine(sp, ep, zero, batches, ref, worst)
            if rank == 0:
                print(f"world {world} sp={sp} ep={ep} zero={zero}: ok", flush=True)
        if rank == 0:
            print("max |difference| to one process:", ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
            print("ALL OK", flush=True)
    finally:
        destroy()


if __name__ == "__main__":
    main()
