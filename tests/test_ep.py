"""Expert parallelism on gloo: exactness against one process, dispatch, and the EP configuration checks.

The multi-process checks run ``ep_matches_one_process`` on 2 or 4 ranks through the test harness
(``harness.run_workers``): one launch builds many DeepSpeed engines, because each launch costs
10-30 s here. Each engine comes from the trainer's ``build_engine`` and must match a plain-torch
reference trained on the whole global batch in one process (``exactness.py`` gives the tolerances).
"""

from __future__ import annotations

import pytest
import torch

from moesaic.configs import Config, ConfigError, load_config, validate

from attention_types import MOSAIC, menu_overrides
from exactness import TOL, check_engine, reference_steps
from harness import Checks, run_workers
from trainrun import FAST

STEPS = 3
# Gradient accumulation of 2 micro-batches at world 2; a clip far below the gradient norm, so the
# update depends on the global norm; a sequence aux loss and bias balancing on. lr 1e-4: an Adam
# step moves weights by ~1e-4, so 1e-6 is 1% of an update. (At lr 3e-3 even plain data parallelism
# drifts 1e-5 from one process by step 3: Adam amplifies fp32 summation-order noise in gradients
# near zero, whatever the parallelism.)
OVERRIDES = FAST + ["train.micro_batch_size=2", "train.global_batch_size=8", "train.grad_clip=0.05",
                    "train.warmup_steps=1", "train.lr=1e-4", "model.moe.seq_aux_loss_coef=0.01",
                    "model.moe.bias_update_rate=0.01"]


def _cfg(overrides: list[str], ep: int = 1, zero: int = 1) -> Config:
    return load_config("tiny", overrides + [f"parallel.ep={ep}", f"train.zero_stage={zero}"])


@pytest.mark.multiproc
def test_ep2_matches_single_process_zero1_zero2() -> None:
    run_workers(ep_matches_one_process, world=2, timeout=600, overrides=OVERRIDES,
                runs=[(1, 1), (2, 1), (2, 2)]).assert_ok()


@pytest.mark.multiproc
def test_dp2_x_ep2_and_ep4_match_single_process() -> None:
    run_workers(ep_matches_one_process, world=4, timeout=600, overrides=OVERRIDES,
                runs=[(2, 1), (2, 2), (4, 2)]).assert_ok()


# Gemma 4's FFN: the dense MLP beside the MoE (the MoE sharded), GeGLU, its router, sandwich norms; on the attention
# mosaic (V4 layers beside GQA layers, two reading an earlier layer's K/V). Its per-token options (embed_scale,
# PLE, softcap) stay off: the embedding's Adam step then drifts past TOL from summation-order noise alone
# (observed 1.2e-6 at step 3, every expert parameter within 1e-7). The engine also checkpoints activations
# (selective): the recompute repeats the all-to-all exchanges in the backward; the reference does not checkpoint.
GEMMA = ["model.ffn_types=[dense,dense+moe,dense+moe,moe,dense+moe,dense+moe]", "model.ffn_activation=gelu_tanh",
         "model.moe.swiglu_limit=0", "model.moe.num_shared_experts=0", "model.moe.score_func=softmax",
         "model.moe.routed_scaling_factor=1.0", "model.moe.router_input_norm=true", "model.moe.per_expert_scale=true",
         "model.sandwich_norm=true", "model.layer_scalar=true"]
MOSAIC_EP = [*menu_overrides(window=8, num_heads=2), *MOSAIC, "data.seq_len=32"]


@pytest.mark.multiproc
def test_ep2_with_gemma_ffn_on_the_attention_mosaic_and_checkpointing_matches_single_process() -> None:
    run_workers(ep_matches_one_process, world=2, timeout=600,
                overrides=OVERRIDES + MOSAIC_EP + GEMMA + ["train.activation_checkpointing=selective"],
                runs=[(2, 1)]).assert_ok()


# Laguna (MOSAIC_SPEC §2): sliding layers with twice the query heads of the global ones over one KV shape, per-head
# and per-element gates, YaRN on the global layers; the soft-capped sigmoid router with a shared expert of its own
# width. Under SP (seq_len 32, shards of 16) the sliding window (6) crosses the shard edge.
_LAGUNA_HEAD = "kind: gqa, num_kv_heads: 2, head_dim: 16"
LAGUNA = ["model.num_layers=4", "model.layer_types=[lg_global,lg_sliding,lg_sliding,lg_global]",
          "model.ffn_types=[dense,moe,moe,moe]", "data.seq_len=32",
          f"model.attention.menu.lg_global={{{_LAGUNA_HEAD}, num_heads: 4, gate: head, rope_fraction: 0.5, "
          "rope_theta: 500000.0, yarn_factor: 4.0, yarn_original_max_position: 8}",
          f"model.attention.menu.lg_sliding={{{_LAGUNA_HEAD}, num_heads: 8, gate: element, window: 6, query_chunk: 5}}",
          "model.moe.score_func=sigmoid", "model.moe.router_logit_softcap=2.0", "model.moe.shared_intermediate_size=24",
          "model.moe.routed_scaling_factor=2.5", "model.moe.swiglu_limit=0", "model.moe.seq_aux_loss_coef=0.01",
          "model.moe.bias_update_rate=0.01"]


@pytest.mark.multiproc
def test_ep2_with_laguna_layers_and_router_matches_single_process() -> None:
    run_workers(ep_matches_one_process, world=2, timeout=600, overrides=OVERRIDES + LAGUNA, runs=[(2, 1)]).assert_ok()


# ZAYA1's FFN (MLP router carrying its state from layer 0 to layer 1, skip expert, top-1, no shared expert) beside
# a cca layer: the router and its state stay on the tokens' rank, only the experts' inputs travel.
ZAYA = ["model.layer_types=[cca,swa]", "model.attention.menu.cca={kind: cca, num_kv_heads: 1, window: 0}",
        "model.ffn_types=[moe,moe]", "model.moe.router=mlp", "model.moe.router_hidden_size=16",
        "model.moe.score_func=softmax", "model.moe.top_k=1", "model.moe.norm_topk_prob=false",
        "model.moe.routed_scaling_factor=1.0", "model.moe.num_shared_experts=0"]


@pytest.mark.multiproc
def test_ep2_with_zaya_router_and_cca_matches_single_process() -> None:
    run_workers(ep_matches_one_process, world=2, timeout=600, overrides=OVERRIDES + ZAYA, runs=[(2, 1)]).assert_ok()


# DeepSeek-V3.2's layout: DSA and MLA layers, a sigmoid router limited to 1 of 2 expert groups, no clamp.
V32 = ["model.layer_types=[dsa,mla]", "model.ffn_types=[moe,moe]", "data.seq_len=32",
       "model.attention.menu.dsa={kind: dsa, num_heads: 2, q_lora_rank: 32, kv_lora_rank: 32, index_heads: 16, "
       "index_head_dim: 16, index_topk: 8}", "model.attention.menu.mla={kind: mla, num_heads: 2}",
       "model.moe.score_func=sigmoid", "model.moe.n_group=2", "model.moe.topk_group=1", "model.moe.swiglu_limit=0"]


@pytest.mark.multiproc
def test_ep2_with_deepseek_v32_layout_and_group_routing_matches_single_process() -> None:
    run_workers(ep_matches_one_process, world=2, timeout=600, overrides=OVERRIDES + V32, runs=[(2, 1)]).assert_ok()


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


# ---- the harness worker ---------------------------------------------------------------------------

def _check_dispatcher(checks: Checks, ep: int) -> None:
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
    checks.close(f"dispatch ep={ep}: outputs", y, y_ref[mine], atol=TOL)
    checks.close(f"dispatch ep={ep}: input gradients", x.grad, x_ref.grad[mine], atol=TOL)
    grads = torch.stack([shard.w1.grad, shard.w3.grad]).contiguous()  # summed over the EP group's ranks
    dist.all_reduce(grads, group=groups._get_expert_data_parallel_group(name))
    lo, hi = shard.expert_offset, shard.expert_offset + shard.num_local_experts
    checks.close(f"dispatch ep={ep}: expert gradients", grads, torch.stack([full.w1.grad, full.w3.grad])[:, lo:hi],
                 atol=1e-5, rtol=1e-6)


def ep_matches_one_process(checks: Checks, overrides: list[str], runs: list[tuple[int, int]]) -> None:
    """Harness worker: the all-to-all dispatcher, then an engine per (ep, zero stage) in ``runs``, vs one process."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, _cfg(overrides).model.vocab_size, (8, 33), generator=gen) for _ in range(STEPS)]
    ref = reference_steps(checks, _cfg(overrides), batches)
    for ep in sorted({ep for ep, _ in runs if ep > 1}):
        _check_dispatcher(checks, ep)
    for ep, zero in runs:
        check_engine(checks, _cfg(overrides, ep, zero), batches, ref)
