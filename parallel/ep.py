"""Expert parallelism applied from outside onto the single-device model (torchtitan style).

``apply_expert_parallel(model, ep)`` rewrites every ``moesaic.model.moe.MoE`` layer in place:
its routed experts become ``ShardedExperts``, the slice ``[r*L, (r+1)*L)`` (``L = E / ep``) of
global ids on expert-parallel rank r, initialised per global id exactly as the single-device
build; its dispatcher becomes the all-to-all ``AllToAllDispatcher``. The router and the shared
expert stay replicated. Expert parallelism borrows data-parallel ranks: every rank still trains on
its own data, and an expert's gradient collects the tokens of the ``ep`` ranks of its group.

How DeepSpeed is told. The groups are DeepSpeed's own (``groups._create_expert_and_data_parallel``,
named ``ep_size_{ep}``: expert-parallel groups of consecutive ranks, expert-data-parallel groups of
ranks ``ep`` apart), and the expert parameters carry DeepSpeed's MoE tags (``allreduce=False``,
``group_name``). The tags alone steer ``_broadcast_model`` and the optimizer-group split
(``split_expert_param_groups``), but the engine switches its MoE paths (ZeRO-1/2 expert
partitioning and reduction over the expert-data-parallel group, ZeRO-0's expert all-reduce, the MoE
checkpoint layout) on ``has_moe_layers``, which it sets only on finding an instance of
``deepspeed.moe.layer.MoE`` (or of AutoEP's layer, which replaces the whole MoE and has no bias
balancing). There is no other switch, so ``ShardedExperts`` is also a ``deepspeed.moe.layer.MoE``:
it inherits only the type (DeepSpeed's ``__init__``, gate and capacity-based dispatch are never
run; ``forward`` is ``GroupedExperts.forward``) and provides the attributes the engine reads
(``num_experts``, ``num_local_experts``, ``expert_group_name``, ``ep_size``). Making the experts
module the DeepSpeed layer, rather than adding an empty marker elsewhere, is what scopes
DeepSpeed's expert-key filter to the routed experts: ``mp_rank_00_model_states.pt`` keeps the
router and the shared expert and drops the per-rank expert slices, which go to per-expert files
instead (``parallel/portable.py``).

Limits, checked by the config: the ZeRO-0 gradient norm (``trainer/step_guard.py``) is this rank's
parameters' alone, which misses the experts other ranks hold, and ZeRO-3 refuses native MoE; so EP
runs ZeRO-1/2, whose norm sums the squares of every partition and so counts each expert once (tested
against one process).
"""

from __future__ import annotations

from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from moesaic.model.moe import GroupedExperts, MoE

from .dispatch import AllToAllDispatcher


class ShardedExperts(DeepSpeedMoE, GroupedExperts):
    """This rank's slice of a layer's routed experts, typed as a DeepSpeed MoE layer (see module doc)."""

    def __init__(self, full: GroupedExperts, ep_rank: int, ep: int, group_name: str) -> None:
        local = full.num_experts // ep
        # GroupedExperts' own __init__ (DeepSpeed's is skipped on purpose): weights per global id.
        GroupedExperts.__init__(self, full.num_experts, full.w1.shape[2], full.w1.shape[1], full.swiglu_limit,
                                init_std=full.init_std, seed=full.seed, expert_offset=ep_rank * local,
                                num_local_experts=local, activation=full.activation)
        self.ep_size = ep
        self.expert_group_name = group_name
        for p in self.parameters():
            p.allreduce = False  # deepspeed.moe.utils.is_moe_param
            p.group_name = group_name

    forward = GroupedExperts.forward

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine calls this to create groups; apply_expert_parallel has already made them."""


def expert_group_name(ep: int) -> str:
    """Name of DeepSpeed's expert-parallel and expert-data-parallel groups of degree ``ep``, created once.

    DeepSpeed's group helpers need ``deepspeed.comm`` started, which ``trainer.distributed.init_distributed``
    does before the model is built (``deepspeed.initialize`` would start it only after the model
    must already be sharded).
    """
    name = f"ep_size_{ep}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return name


def apply_expert_parallel(model: nn.Module, ep: int) -> None:
    """Shard every MoE layer's routed experts over groups of ``ep`` ranks, in place.

    Call on every rank after the default process group exists and before the optimizer is built.
    """
    name = expert_group_name(ep)
    group = groups._get_expert_parallel_group(name)
    ep_rank = groups._get_expert_parallel_rank(name)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"expert parallelism (ep={ep}) needs MoE layers, and the model has none")
    for moe in layers:
        moe.experts = ShardedExperts(moe.experts, ep_rank, ep, name)
        moe.dispatcher = AllToAllDispatcher(moe.experts.num_experts, group)


def split_expert_param_groups(param_groups: list[dict]) -> list[dict]:
    """Move expert parameters into their own optimizer groups, as ZeRO-1/2 require under EP.

    DeepSpeed's splitter keys the new groups by the original group's ``name``, so every group is
    named by its position; without expert parameters nothing else changes.
    """
    named = [{"name": f"group{i}", **g} for i, g in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)
