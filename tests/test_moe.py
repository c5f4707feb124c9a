"""MoE FFN against naive per-token references, on CPU in fp32."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model.ffn import swiglu
from moesaic.model.moe import GroupedExperts, LocalDispatcher, MoE, Router
from moesaic.model.moe.experts import grouped_mm_takes

from host_sync import HostSyncCounter

from numerics import assert_close_scaled, fp64, fp64_copy

pytestmark = pytest.mark.numerics


def make_cfg(dim: int = 16, **moe: object) -> ModelConfig:
    base = dict(num_experts=4, top_k=2, intermediate_size=8, num_shared_experts=1)
    base.update(moe)
    return ModelConfig(hidden_size=dim, moe=MoEConfig(**base))


def naive_scores(logits: list[float], score_func: str) -> list[float]:
    if score_func == "sqrtsoftplus":
        return [math.sqrt(math.log1p(math.exp(v))) for v in logits]
    if score_func == "sigmoid":
        return [1 / (1 + math.exp(-v)) for v in logits]
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def naive_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float) -> torch.Tensor:
    a, u = w1 @ x, w3 @ x
    if limit > 0:
        a, u = a.clamp(max=limit), u.clamp(-limit, limit)
    return w2 @ (F.silu(a) * u)


def naive_moe(moe: MoE, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """Token by token: score, pick k by (biased score, lower index), weight each expert's output."""
    m, ex, sh = cfg.moe, moe.experts, moe.shared_experts
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        logits = moe.gate.weight @ tok
        if m.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif m.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(-1)
        biased = (scores + moe.gate.expert_bias).tolist()
        chosen = sorted(range(m.num_experts), key=lambda e: (-biased[e], e))[: m.top_k]
        gates = torch.stack([scores[e] for e in chosen])
        if m.norm_topk_prob:
            gates = gates / gates.sum()
        gates = gates * m.routed_scaling_factor
        y = sum(g * naive_expert(tok, ex.w1[e], ex.w3[e], ex.w2[e], m.swiglu_limit) for g, e in zip(gates, chosen))
        if sh is not None:
            y = y + naive_expert(tok, sh.w1.weight, sh.w3.weight, sh.w2.weight, m.swiglu_limit)
        out.append(y)
    return torch.stack(out).view_as(x)


def scaled_up(moe: MoE, std: float) -> MoE:
    """Larger weights than init_std so outputs and clamps are not trivially small."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return moe


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_moe_matches_naive_reference_with_grads(score_func: str) -> None:
    torch.manual_seed(0)
    cfg = make_cfg(score_func=score_func, swiglu_limit=1.0, num_experts=6, top_k=3)
    moe = scaled_up(MoE(cfg, 0), 0.4)
    with torch.no_grad():
        moe.gate.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4, 0.2]))
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    probe = torch.randn(2, 5, cfg.hidden_size)
    params = [x, *moe.parameters()]

    y, aux = moe(x)
    # The reference in fp64: both pick alike, the smallest routing margin here (0.017) being far above rounding.
    ref = fp64_copy(moe)
    y_ref = naive_moe(ref, cfg, *fp64(x))
    assert_close_scaled(y, y_ref, 16, "output")
    assert aux.item() == 0.0

    grads = torch.autograd.grad((y * probe).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * probe.double()).sum(), [x, *ref.parameters()])
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter took part
    names = ["x", *(n for n, _ in moe.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert_close_scaled(g, g_ref, 16, name)


def test_swiglu_clamp_applies_to_routed_experts() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    cfg = make_cfg(swiglu_limit=0.5, num_shared_experts=0)
    clamped = scaled_up(MoE(cfg, 0), 1.0)
    free = MoE(make_cfg(swiglu_limit=0.0, num_shared_experts=0), 0)
    free.load_state_dict(clamped.state_dict())
    y_clamped, _ = clamped(x)
    assert_close_scaled(y_clamped, naive_moe(fp64_copy(clamped), cfg, *fp64(x)), 16, "output")
    assert (y_clamped - free(x)[0]).abs().max() > 1.0  # pre-activations ~N(0, 16) hit the 0.5 clamp


@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_swiglu_backward_matches_autograd_of_the_plain_ops(limit: float) -> None:
    """``swiglu`` recomputes its activations in backward; values and both gradients must equal autograd
    through clamp, silu and mul, including inputs exactly at the clamp bounds (gradient passes there)."""
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(64, 32, generator=g) * 2).requires_grad_(), (torch.randn(64, 32, generator=g) * 2)
    with torch.no_grad():
        gate[0, :4] = torch.tensor([limit, -limit, limit + 1e-3, limit - 1e-3])
        up[0, :4] = torch.tensor([limit, -limit, -limit - 1e-3, limit + 1e-3])
    up.requires_grad_()
    cot = torch.randn(64, 32, generator=g)

    def plain(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if limit > 0:
            a, b = a.clamp(max=limit), b.clamp(min=-limit, max=limit)
        return F.silu(a) * b

    out, ref = swiglu(gate, up, limit), plain(gate, up)
    assert_close_scaled(out, ref, 4, "value")
    grads = torch.autograd.grad(out, (gate, up), cot), torch.autograd.grad(ref, (gate, up), cot)
    for name, got, want in zip(("gate", "up"), *grads, strict=True):
        assert_close_scaled(got, want, 4, name)
        if limit > 0:
            assert (got == 0).any()  # the clamps cut some gradients, so the masks were exercised


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [True, False])
def test_gates_match_hand_computation(score_func: str, norm: bool) -> None:
    logits = [0.5, -1.0, 2.0, 0.1, 1.2]
    cfg = make_cfg(dim=5, num_experts=5, top_k=2, score_func=score_func, norm_topk_prob=norm,
                   routed_scaling_factor=2.5)
    router = Router(cfg, 0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(5))  # logits = x
    out = router(torch.tensor(logits).view(1, 1, 5))
    s = naive_scores(logits, score_func)
    picked = [2, 4]  # the two largest logits, for every monotone score function
    want = [s[e] / (s[2] + s[4]) if norm else s[e] for e in picked]
    assert out.topk_idx.tolist() == [picked]
    assert_close_scaled(out.gates, 2.5 * torch.tensor([want], dtype=torch.float64), 8, "gates")


def test_bias_changes_selection_not_gate_values() -> None:
    cfg = make_cfg(dim=4, num_experts=4, top_k=2, score_func="sigmoid", routed_scaling_factor=1.0)
    router = Router(cfg, 0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.tensor([2.0, 1.0, 0.0, -1.0]).view(1, 1, 4)
    s = torch.tensor([2.0, 1.0, 0.0, -1.0]).sigmoid()
    assert router(x).topk_idx.tolist() == [[0, 1]]
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 2.0]))  # demote 1, promote 3
    out = router(x)
    assert out.topk_idx.tolist() == [[3, 0]]
    torch.testing.assert_close(out.gates, torch.stack([s[3], s[0]]).view(1, 2) / (s[3] + s[0]))


def test_ties_go_to_the_lower_expert_index() -> None:
    router = Router(make_cfg(dim=4, num_experts=64, top_k=5), 0)  # wide enough for unstable sorts to reorder
    with torch.no_grad():
        router.weight.zero_()  # every score equal
        router.expert_bias[[3, 30, 47]] = 1.0
    assert router(torch.randn(1, 3, 4)).topk_idx.tolist() == [[3, 30, 47, 0, 1]] * 3


def test_update_bias_moves_exactly_rate_with_signs() -> None:
    router = Router(make_cfg(num_experts=4, bias_update_rate=0.25), 0)
    router.update_bias(torch.tensor([10.0, 2.0, 1.0, 7.0]))  # mean 5
    assert router.expert_bias.tolist() == [-0.25, 0.25, 0.25, -0.25]
    router.update_bias(torch.tensor([1.0, 2.0, 9.0, 4.0]))  # mean 4: the one at the mean stays
    assert router.expert_bias.tolist() == [0.0, 0.5, 0.0, -0.25]

    frozen = Router(make_cfg(num_experts=4, bias_update_rate=0.0), 0)
    frozen.update_bias(torch.tensor([10.0, 2.0, 1.0, 7.0]))
    assert frozen.expert_bias.tolist() == [0.0] * 4


def test_load_counts_accumulate_without_moving_bias() -> None:
    torch.manual_seed(0)
    moe = MoE(make_cfg(num_experts=4, top_k=2, bias_update_rate=0.1), 0).train()
    xs = [torch.randn(2, 3, 16) for _ in range(3)]
    want = torch.zeros(4)
    for x in xs:
        moe(x)
        want += torch.bincount(moe.gate(x).topk_idx.flatten(), minlength=4).float()
    # Each x went through the router twice above (moe and the direct call).
    torch.testing.assert_close(moe.gate.load_counts, 2 * want)
    assert moe.gate.load_counts.sum().item() == 2 * 3 * 6 * 2
    assert moe.gate.expert_bias.tolist() == [0.0] * 4
    moe.gate.reset_load_counts()
    assert moe.gate.load_counts.tolist() == [0.0] * 4
    moe.eval()(xs[0])  # evaluation does not count
    assert moe.gate.load_counts.tolist() == [0.0] * 4


def test_bias_updates_rebalance_a_skewed_router() -> None:
    """Gate weights pulled towards expert 0 overload it; per-step bias updates spread the load."""
    torch.manual_seed(0)
    dim, experts = 32, 8
    moe = MoE(make_cfg(dim=dim, num_experts=experts, top_k=2, intermediate_size=16, bias_update_rate=0.01), 0)
    skew = torch.randn(dim)
    skew /= skew.norm()
    with torch.no_grad():
        moe.gate.weight[0] += 3 * skew
    gen = torch.Generator().manual_seed(1)

    def step(update: bool) -> torch.Tensor:
        with torch.no_grad():
            for _ in range(2):  # micro-batches of one optimizer step
                moe(torch.randn(8, 32, dim, generator=gen) + skew)
        counts = moe.gate.load_counts.clone()
        if update:
            moe.gate.update_bias(counts)
        moe.gate.reset_load_counts()
        return counts

    before = sum(step(False) for _ in range(5))
    for _ in range(150):
        step(True)
    after = sum(step(True) for _ in range(10))
    imbalance = lambda c: (c.max() / c.mean()).item()  # noqa: E731
    assert imbalance(before) > 3.0  # observed 3.38
    assert imbalance(after) < 1.2  # observed 1.08
    assert moe.gate.expert_bias[0] < moe.gate.expert_bias[1:].min()


def test_seq_aux_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    alpha, experts, k = 0.1, 4, 2
    cfg = make_cfg(num_experts=experts, top_k=k, seq_aux_loss_coef=alpha)
    router = Router(cfg, 0)
    x = torch.randn(3, 5, 16)
    out = router(x)
    scores = router.scores(x)  # [B, S, E]
    idx = out.topk_idx.view(3, 5, k)
    want = 0.0
    for b in range(3):
        for i in range(experts):
            f = experts / (k * 5) * sum(int(i in idx[b, t].tolist()) for t in range(5))
            p = sum((scores[b, t, i] / scores[b, t].sum()).item() for t in range(5)) / 5
            want += f * p
    assert out.aux_loss.item() == pytest.approx(alpha * want / 3, rel=1e-6)
    out.aux_loss.backward()
    assert router.weight.grad.abs().sum() > 0

    disabled = Router(make_cfg(num_experts=experts, top_k=k, seq_aux_loss_coef=0.0), 0)
    assert disabled(x).aux_loss.item() == 0.0


def test_dispatch_groups_by_expert_and_combine_unpermutes() -> None:
    x = torch.arange(4.0).view(4, 1).repeat(1, 2)  # token t is [t, t]
    topk_idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    dispatcher = LocalDispatcher(num_experts=4)
    expert_x, counts, state = dispatcher.dispatch(x, topk_idx)
    assert counts.tolist() == [3, 2, 3, 0]
    assert expert_x[:, 0].tolist() == [0, 1, 3, 1, 2, 0, 2, 3]  # stable within each expert
    gates = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    y = dispatcher.combine(expert_x * 10, gates, state)  # "experts" multiply by 10
    torch.testing.assert_close(y, 10 * x * gates.sum(1, keepdim=True))


def test_experts_built_by_global_id_match_a_slice_of_the_full_build() -> None:
    full = GroupedExperts(4, 8, 6, init_std=0.02, seed=123)
    part = GroupedExperts(4, 8, 6, init_std=0.02, seed=123, expert_offset=2, num_local_experts=2)
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(getattr(part, name), getattr(full, name)[2:4], atol=0, rtol=0)
    assert not torch.equal(full.w1[0], full.w1[1])
    assert abs(full.w1.std().item() - 0.02) < 0.004
    with pytest.raises(ValueError):
        GroupedExperts(4, 8, 6, expert_offset=3, num_local_experts=2)


def test_router_state_stays_fp32_and_only_bias_is_saved() -> None:
    moe = MoE(make_cfg(), 0)
    with torch.no_grad():
        moe.gate.expert_bias.fill_(1e-3)
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.expert_bias.dtype == torch.float32 and moe.gate.load_counts.dtype == torch.float32
    assert moe.gate.expert_bias[0].item() == pytest.approx(1e-3, rel=1e-7)  # not rounded through bf16
    keys = moe.state_dict().keys()
    assert "gate.expert_bias" in keys and "gate.load_counts" not in keys
    y, _ = moe(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("softcap", [0.0, 0.5])
def test_laguna_sparse_block_equals_transformers(softcap: float) -> None:
    """Laguna's MoE (MOSAIC_SPEC §2.4): sigmoid of soft-capped logits, the bias for selection only, renormalised
    gates times routed_scaling_factor, plus a shared expert of its own width, against transformers'
    LagunaSparseMoeBlock with every weight and the bias random (softcap 0.5 makes the cap bite: |logits| ~ 1)."""
    from transformers import LagunaConfig
    from transformers.models.laguna.modeling_laguna import LagunaSparseMoeBlock

    hf_cfg = LagunaConfig(hidden_size=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                          shared_expert_intermediate_size=12, moe_routed_scaling_factor=2.5,
                          moe_router_logit_softcapping=softcap, num_hidden_layers=1)
    torch.manual_seed(0)
    theirs = LagunaSparseMoeBlock(hf_cfg).eval()
    ours = MoE(make_cfg(num_experts=6, intermediate_size=8, shared_intermediate_size=12, score_func="sigmoid",
                        routed_scaling_factor=2.5, router_logit_softcap=softcap, swiglu_limit=0.0), 0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
        theirs.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
        ours.gate.weight.copy_(theirs.gate.weight)
        ours.gate.expert_bias.copy_(theirs.gate.e_score_correction_bias)
        gate, up = theirs.experts.gate_up_proj.chunk(2, dim=1)
        ours.experts.w1.copy_(gate), ours.experts.w3.copy_(up), ours.experts.w2.copy_(theirs.experts.down_proj)
        for name in ("w1", "w3", "w2"):
            hf_name = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[name]
            getattr(ours.shared_experts, name).weight.copy_(getattr(theirs.shared_experts, hf_name).weight)
        x = torch.randn(2, 9, 16)
        logits = x.reshape(-1, 16) @ theirs.gate.weight.T
        assert softcap == 0 or logits.abs().max() > 2 * softcap  # the cap changes the scores
        assert_close_scaled(ours(x)[0], theirs(x), 16, "Laguna MoE output")
@pytest.mark.parametrize("hidden", [8, 6])  # 8: grouped_mm; 6 (24-byte rows): the per-expert fallback
@pytest.mark.parametrize("counts", [[3, 0, 5, 0], [0, 0, 0, 7], [0, 0, 0, 0]])
def test_grouped_experts_match_a_per_expert_loop(hidden: int, counts: list[int]) -> None:
    """Each row through its own expert's weights in fp64, forward and every gradient; empty experts get
    exactly zero weight gradient."""
    g = torch.Generator().manual_seed(0)
    experts = GroupedExperts(4, 16, hidden, swiglu_limit=1.0, init_std=0.5, seed=3)
    x = torch.randn(sum(counts), 16, generator=g, requires_grad=True)
    cot = torch.randn(sum(counts), 16, generator=g)
    assert grouped_mm_takes(x, experts.w1) == (hidden == 8)
    y = experts(x, torch.tensor(counts))
    got = torch.autograd.grad((y * cot).sum(), [x, experts.w1, experts.w3, experts.w2], allow_unused=True)

    ref_w = [w.detach().double().requires_grad_() for w in (experts.w1, experts.w3, experts.w2)]
    ref_x = x.detach().double().requires_grad_()
    owner = [e for e, n in enumerate(counts) for _ in range(n)]  # expert of each row
    rows = [naive_expert(ref_x[r], *(w[e] for w in ref_w), 1.0) for r, e in enumerate(owner)]
    y_ref = torch.stack(rows) if rows else ref_x.new_zeros(0, 16)
    assert_close_scaled(y, y_ref, 16, "output")
    if not rows:
        return
    want = torch.autograd.grad((y_ref * cot.double()).sum(), [ref_x, *ref_w])
    for name, a, b in zip(("x", "w1", "w3", "w2"), got, want, strict=True):
        assert_close_scaled(a, b, 16, name)
        for e, n in enumerate(counts):
            if name != "x" and n == 0:
                assert torch.count_nonzero(a[e]) == 0, f"{name}[{e}] of an empty expert"


def test_local_moe_forward_and_backward_do_not_sync_with_the_host() -> None:
    """Router, dispatch, grouped experts and combine keep every size on the device (a CUDA step would not wait)."""
    moe = MoE(make_cfg(num_experts=4, top_k=2, intermediate_size=8, bias_update_rate=0.1), 0).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    with HostSyncCounter() as syncs:
        y, aux = moe(x)
        (y.square().sum() + aux).backward()
    assert syncs.calls == []
    assert moe.experts.w1.grad.abs().sum() > 0
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_router_z_loss_matches_hand_computation(score_func: str) -> None:
    """ST-MoE's z-loss on logits set by hand: token a has logits [0, 0] (logsumexp ln 2), token b [ln 3, 0]
    (logsumexp ln 4 = 2 ln 2), so the loss is coef * ((ln 2)^2 + (2 ln 2)^2) / 2, whatever the score function."""
    coef = 0.01
    router = Router(make_cfg(dim=2, num_experts=2, top_k=1, z_loss_coef=coef, score_func=score_func), 0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])  # [B=1, S=2, D=2]: the logits themselves
    out = router(x)
    assert out.aux_loss.item() == pytest.approx(coef * 2.5 * math.log(2) ** 2, rel=1e-6)
    out.aux_loss.backward()  # d/dW of the loss: it pulls the logits down
    assert router.weight.grad[0, 0] > 0
    off = Router(make_cfg(dim=2, num_experts=2, top_k=1, score_func=score_func), 0)
    assert off(x).aux_loss.item() == 0.0  # z_loss_coef 0 (the default): no loss
