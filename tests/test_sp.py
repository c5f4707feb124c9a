"""Sequence parallelism on gloo: exactness against one process, resume, and the SP configuration checks.

The multi-process checks run ``sp_matches_one_process`` on 2 or 4 ranks through the test harness
(``harness.run_workers``); one launch runs many checks, because each launch costs 10-40 s here.
The worker takes the layout (config overrides) as an argument, so other layouts can reuse it.

* Model level (no DeepSpeed): the sequence-parallel model on each rank's shard vs the same model on
  whole sequences, for a SWA + CSA + HCA layout whose shards start at a compression window, so the
  sliding window, a CSA entry's look-back and the HCA entries all cross the shard edge (and, in a
  second variant, a window longer than a shard, query chunks, mHC and a hash-routed layer):
  logits, loss (the shards' shares summed), aux loss and every gradient (summed over the shards).
* Engine level (DeepSpeed, the trainer's own ``build_engine``): 3 optimizer steps of 2 micro-batches vs a
  plain-torch reference on the global batch: losses and gradient norms (clipping engaged) to a
  relative 1e-6 (1e-6 is about one fp32 ulp at a loss of 8), updated parameters and router biases
  to 1e-6; sp=2 under ZeRO-1/2, sp=2 with ep=2 on the same 2 ranks, and sp=2 x dp=2 with ep=2.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from moesaic.configs import Config, ConfigError, check_trainable, load_config, validate
from moesaic.parallel.portable import full_model_state

from attention_types import KINDS, MOSAIC, every_entry, menu_overrides
from exactness import TOL, check_engine, reference_steps
from test_ep import GEMMA, LAGUNA
from harness import Checks, run_workers
from trainrun import FAST, assert_identical, command, env, latest, losses, train

if TYPE_CHECKING:
    from moesaic.parallel.topology import Topology

STEPS = 3
# Every registered type in one model (tests/attention_types.py settings, with SHARED for every layer
# that has the field), S = 32 in 2 shards of 16: windows of 4 (CSA) and 8 (HCA) tokens end at the shard
# edge. With these settings the steps' parameters agree to about 4e-7.
SHARED = dict(window=8, query_chunk=1024, num_heads=2, q_lora_rank=32, o_lora_rank=32, index_heads=4, index_topk=4,
              yarn_factor=1.0, yarn_original_max_position=65536)
LAYOUT = [f"model.num_layers={len(KINDS)}", f"model.layer_types=[{','.join(KINDS)}]",
          f"model.ffn_types=[{','.join(['dense'] + ['moe'] * (len(KINDS) - 1))}]", "data.seq_len=32",
          *menu_overrides(**SHARED), "model.moe.seq_aux_loss_coef=0.01", "model.moe.bias_update_rate=0.01"]
# Window longer than a shard, query chunks that do not align with it, mHC and a hash-routed first layer.
VARIANT = [*every_entry("window", 20), *every_entry("query_chunk", 5), "model.hc_mult=2",
           f"model.ffn_types=[{','.join(['moe'] * (len(KINDS) - 1) + ['dense'])}]", "model.moe.num_hash_layers=1"]
# The attention mosaic (attention_types.MOSAIC) on top of LAYOUT's menu: the sharing layers reuse the keys their
# source exchanged between shards.
MOSAIC_LAYOUT = [*LAYOUT, *MOSAIC]
# Gemma 4's block on it (test_ep.GEMMA: dense MLP beside the MoE, GeGLU, its router, sandwich norms, layer scalars)
# and its per-token parts: the scaled embedding, per-layer embeddings, the final-logit softcap in the fused loss.
GEMMA_MODEL = [*GEMMA, "model.embed_scale=true", "model.ple_dim=8", "model.final_logit_softcap=30.0"]
# lr 1e-4 and a clip far below the gradient norm, as in test_ep.py: 1e-6 is 1% of an Adam step.
TRAIN = ["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_clip=0.05", "train.warmup_steps=1",
         "train.lr=1e-4"]
OVERRIDES = FAST + LAYOUT + TRAIN


def _cfg(layout: list[str], sp: int = 1, ep: int = 1, zero: int = 1, extra: Sequence[str] = ()) -> Config:
    return load_config("tiny", FAST + layout + TRAIN + [f"parallel.sp={sp}", f"parallel.ep={ep}",
                                                        f"train.zero_stage={zero}", *extra])


@pytest.mark.multiproc
def test_sp2_and_sp2_with_ep2_on_two_ranks_match_one_process() -> None:
    run_workers(sp_matches_one_process, world=2, layout=LAYOUT, variants=[[], VARIANT],
                runs=[(2, 1, 1), (2, 1, 2), (2, 2, 2)]).assert_ok()


@pytest.mark.multiproc
def test_attention_mosaic_with_kv_sharing_at_sp2_and_sp2_x_ep2_matches_one_process() -> None:
    run_workers(sp_matches_one_process, world=2, layout=MOSAIC_LAYOUT,
                variants=[[], [*every_entry("query_chunk", 5)], GEMMA_MODEL], runs=[(2, 1, 1), (2, 2, 2)]).assert_ok()


@pytest.mark.multiproc
def test_laguna_layers_and_router_at_sp2_and_sp2_x_ep2_match_one_process() -> None:
    run_workers(sp_matches_one_process, world=2, layout=LAGUNA, variants=[[]], runs=[(2, 1, 1), (2, 2, 2)]).assert_ok()


@pytest.mark.multiproc
def test_sp2_x_dp2_with_ep2_on_four_ranks_matches_one_process() -> None:
    run_workers(sp_matches_one_process, world=4, layout=LAYOUT, variants=[[]], runs=[(2, 2, 2), (2, 1, 1)]).assert_ok()


@pytest.mark.multiproc
def test_sp2_x_dp2_ep2_resume_is_bit_identical_and_resumes_at_another_dp(tmp_path: Path, tiny_corpus) -> None:
    common = FAST + MOSAIC_LAYOUT + [f"data.dataset={tiny_corpus.glob}", "model.vocab_size=512",
                                     f"data.cache_dir={tmp_path / 'cache'}", "train.steps=4", "checkpoint.every=2",
                                     "train.zero_stage=2", "train.lr=1e-4", "train.eval_every=100",
                                     "train.sample_tokens=0", "parallel.sp=2", "parallel.ep=2",
                                     "data.val_fraction=0.2"]  # 24 documents: hold some out
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
     "data.seq_len=24 must be divisible by parallel.sp=2 x 8 (equal sequence shards, starting "
     "model.attention.menu.csa at multiples of 4, model.attention.menu.hca at multiples of 8, "
     "model.attention.menu.elastic at multiples of 8)"),
    (["parallel.sp=3", "model.num_layers=3", "model.layer_types=[swa,swa,swa]",
      "model.ffn_types=[dense,moe,moe]", "data.seq_len=32"], None,
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
    validate(_cfg(LAYOUT, sp=2, ep=2, zero=2), world_size=2)  # expert-parallel groups over the sequence-parallel ranks


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


# ---- the harness worker ---------------------------------------------------------------------------

def _check_model(checks: Checks, cfg: Config, topology: Topology, tag: str, doc_ends: Sequence[int] = ()) -> None:
    """One forward + backward of the sharded model vs the same model on the whole sequences (no DeepSpeed).

    ``doc_ends``: positions of every block where a document ends (token 0 there is the models' doc_end_token)."""
    import torch.distributed as dist

    from moesaic.parallel.sp import apply_sequence_parallel
    from moesaic.trainer.data import sequence_shard
    from moesaic.trainer.engine import build_model

    whole = build_model(cfg)
    whole.doc_end_token = 0 if doc_ends else None
    sharded = copy.deepcopy(whole)
    apply_sequence_parallel(sharded, topology)
    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len + 1), generator=gen)
    blocks[:, list(doc_ends)] = 0
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
    checks.that(f"{tag}: the reference has an aux loss and every gradient",
                bool(ref.aux_loss > 0) and all(p.grad is not None for p in whole.parameters()))
    for key, d in diffs.items():
        checks.at_most(f"{tag}: {key}", d, TOL)


def sp_matches_one_process(checks: Checks, layout: list[str], variants: list[list[str]],
                           runs: list[tuple[int, int, int]]) -> None:
    """Harness worker: the sharded model at sp=2 for ``layout`` + each of ``variants``, then an engine per
    (sp, ep, zero stage) in ``runs``, each against one process."""
    from moesaic.configs import ParallelConfig
    from moesaic.parallel.topology import Topology

    cfg = _cfg(layout)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (8, cfg.data.seq_len + 1), generator=gen) for _ in range(STEPS)]
    topology = Topology(ParallelConfig(sp=2))
    for extra in variants:
        _check_model(checks, _cfg(layout, extra=extra), topology, f"model {' '.join(extra) or 'layout'}")
    ref = reference_steps(checks, cfg, batches)
    for sp, ep, zero in runs:
        check_engine(checks, _cfg(layout, sp, ep, zero), batches, ref)
