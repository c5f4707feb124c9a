"""ZAYA1's MLP router (model/moe/mlp_router.py): against an fp64 reference of MOSAIC_SPEC §3.5 over a chain of
layers (the state carried from layer to layer), the skip expert (gate 0, no load), and its config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moesaic.configs import ConfigError, load_config, validate
from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model.moe import MoE
from moesaic.model.moe.mlp_router import STATE_KEY, MLPRouter

from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics

E, R, D = 4, 8, 16


def cfg(**moe) -> ModelConfig:
    fields = dict(num_experts=E, top_k=1, intermediate_size=8, num_shared_experts=0, score_func="softmax",
                  norm_topk_prob=False, routed_scaling_factor=1.0, router="mlp", router_hidden_size=R)
    return ModelConfig(hidden_size=D, num_layers=3, ffn_types=["moe"] * 3, rms_norm_eps=1e-5,
                       moe=MoEConfig(**{**fields, **moe}))


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, norm and state scales away from 1, biases of the experts and the skip class random."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith(("norm.weight", "router_states_scale")) else p.normal_(0, 0.5)
        module.balancing_biases.uniform_(-0.2, 0.2)
        module.balancing_biases[-1] = 0.05
    return module


def reference(routers: list[MLPRouter], xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(class chosen incl. skip = E, its probability) per token per layer, in fp64 from the formulas."""
    out, prev = [], None
    for router, x in zip(routers, xs):
        w = {n: p.double() for n, p in router.named_parameters()}
        r = x.double() @ w["down_proj.weight"].T + w["down_proj.bias"]
        if prev is not None:
            r = r + prev * w["router_states_scale"]
        prev = r
        h = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * w["norm.weight"]
        h = F.gelu(h @ w["fc1.weight"].T + w["fc1.bias"])
        h = F.gelu(h @ w["fc2.weight"].T + w["fc2.bias"])
        p = (h @ w["out_proj.weight"].T).softmax(-1).flatten(0, 1)  # [T, E+1]
        choice = (p + router.balancing_biases.double()).argmax(-1)
        out.append((choice, p.gather(-1, choice[:, None])[:, 0]))
    return out


def test_chain_of_routers_matches_reference_with_state_carry_and_skip():
    c = cfg()
    routers = [randomised(MLPRouter(c, i), seed=i) for i in range(3)]
    assert routers[0].router_states_scale is None and routers[1].router_states_scale is not None
    xs = [torch.randn(2, 12, D) for _ in routers]
    carry: dict = {}
    for router in routers:
        router.train()
    outs = [router(x, carry=carry) for router, x in zip(routers, xs)]
    ref = reference(routers, xs)
    skipped = 0
    for out, (choice, prob), router in zip(outs, ref, routers):
        skip = choice == E
        skipped += int(skip.sum())
        assert torch.equal(out.topk_idx[:, 0], choice.masked_fill(skip, 0))
        assert_close_scaled(out.gates[:, 0], prob.masked_fill(skip, 0.0), 16, "gates")
        assert torch.equal(router.load_counts, torch.bincount(choice[~skip], minlength=E).float())
    assert 0 < skipped < 3 * 24, "the settings must make some tokens skip and others not"
    # The state reaches the later layers: without the carry layer 1 scores differently.
    alone = MLPRouter(c, 1)
    alone.load_state_dict(routers[1].state_dict())
    probs_alone = alone.probabilities(xs[1], {})
    assert (probs_alone - routers[1].probabilities(xs[1], {STATE_KEY: carry_of(routers[0], xs[0])})).abs().max() > 1e-3


def carry_of(router: MLPRouter, x: torch.Tensor) -> torch.Tensor:
    carry: dict = {}
    router.probabilities(x, carry)
    return carry[STATE_KEY]


def test_skipping_tokens_get_no_expert_output_and_gradients_reach_the_carry():
    c = cfg()
    torch.manual_seed(0)
    first, second = MoE(c, 0), MoE(c, 1)
    for moe in (first, second):
        randomised(moe.gate, seed=3)
    second.gate.balancing_biases[-1] = 0.2  # most tokens skip in the second layer
    x = torch.randn(2, 10, D, requires_grad=True)
    carry: dict = {}
    y0, _ = first(x, carry=carry)
    y1, _ = second(x, carry=carry)
    skip = second.gate(x, carry={STATE_KEY: carry_of(first.gate, x)}).gates[:, 0] == 0
    assert 0 < int(skip.sum()) < 20
    assert torch.equal(y1.view(-1, D)[skip], torch.zeros(int(skip.sum()), D))
    y1.sum().backward()
    assert first.gate.down_proj.weight.grad.abs().sum() > 0  # through the state the second router read


@pytest.mark.parametrize("overrides, message", [
    (["model.moe.router=deep"], "model.moe.router='deep'"),
    (["model.moe.router=mlp"], "model.moe.router='mlp' scores with a softmax"),
    (["model.moe.router=mlp", "model.moe.score_func=softmax", "model.moe.router_hidden_size=0"],
     "model.moe.router_hidden_size=0 must be > 0"),
])
def test_bad_router_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny", overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bias_update_moves_the_experts_entries_only_and_buffers_stay_fp32():
    router = MLPRouter(cfg(bias_update_rate=0.1), 1).bfloat16()
    assert router.balancing_biases.dtype == torch.float32 and router.expert_bias.dtype == torch.float32
    router.update_bias(torch.tensor([5.0, 0.0, 1.0, 3.0]))
    assert torch.equal(router.balancing_biases, torch.tensor([-0.1, 0.1, 0.1, -0.1, -1.0]))
    assert set(router.state_dict()) >= {"balancing_biases"} and "expert_bias" not in router.state_dict()
