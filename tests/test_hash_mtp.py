"""Hash routing (MODEL_SPEC §6) and multi-token prediction (§7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import Transformer
from moesaic.model.attention.presets import v4_attention
from moesaic.model.moe import MoE, Router
from moesaic.model.moe.router import hash_routing_table

from numerics import assert_close_scaled, fp64_copy

pytestmark = pytest.mark.numerics

VOCAB = 64


def cfg(**kw: object) -> ModelConfig:
    a = v4_attention(num_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8,
                     window=8)
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, attention=a,
                  moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=16, num_hash_layers=1))
    fields.update(kw)
    return ModelConfig(**fields)


@pytest.mark.parametrize("vocab,experts,k", [(64, 8, 2), (1000, 7, 3), (50, 6, 6), (12000, 256, 6)])
def test_hash_table_is_deterministic_distinct_and_balanced(vocab: int, experts: int, k: int) -> None:
    table = hash_routing_table(vocab, experts, k, seed=3)
    assert table.shape == (vocab, k) and table.dtype == torch.long
    assert torch.equal(table, hash_routing_table(vocab, experts, k, seed=3))
    assert not torch.equal(table, hash_routing_table(vocab, experts, k, seed=4))  # per-layer tables differ
    assert (table.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts per token id
    load = torch.bincount(table.flatten(), minlength=experts)
    assert load.max() - load.min() <= 1  # floor or ceil of vocab * k / experts ids each
    if k < experts:  # expert pairs vary between rows (not a fixed round-robin block)
        assert len({tuple(r) for r in table.sort(dim=1).values.tolist()}) > experts


def test_hash_router_routes_by_token_id_with_learned_gates() -> None:
    c = cfg(moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=16, num_hash_layers=1,
                          routed_scaling_factor=2.5, score_func="sqrtsoftplus"))
    hashed, learned = Router(c, 0), Router(c, 1)
    assert hashed.hash and not learned.hash and not hasattr(learned, "tid2eid")
    x, ids = torch.randn(2, 5, 32), torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        hashed.expert_bias.fill_(100.0)  # would dominate a biased top-k; a hash layer never reads it
    out = hashed(x, ids)
    assert torch.equal(out.topk_idx, hashed.tid2eid[ids.flatten()])
    scores = F.softplus(x.flatten(0, 1) @ hashed.weight.T).sqrt()
    picked = scores.gather(1, out.topk_idx)
    torch.testing.assert_close(out.gates, 2.5 * picked / picked.sum(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="needs input_ids"):
        hashed(x)
    hashed.update_bias(torch.arange(8.0))  # no bias to balance in a hash layer
    assert (hashed.expert_bias == 100.0).all()
    assert "tid2eid" in hashed.state_dict()


def test_hash_moe_layer_uses_the_table_experts() -> None:
    c = cfg()
    moe = MoE(c, 0)
    x, ids = torch.randn(1, 6, 32), torch.randint(0, VOCAB, (1, 6))
    y, _ = moe(x, ids)
    ref = fp64_copy(moe)  # the reference in fp64
    ex, sh = ref.experts, ref.shared_experts
    for t in range(6):
        h = x[0, t].double()
        scores = F.softplus(ref.gate.weight @ h).sqrt()
        chosen = ref.gate.tid2eid[ids[0, t]]
        gates = scores[chosen] / scores[chosen].sum() * c.moe.routed_scaling_factor
        expect = sh(h)
        for g, e in zip(gates, chosen):
            a, u = (ex.w1[e] @ h).clamp(max=10), (ex.w3[e] @ h).clamp(-10, 10)
            expect = expect + g * (ex.w2[e] @ (F.silu(a) * u))
        assert_close_scaled(y[0, t], expect, 16, f"token {t}")


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_mtp_predicts_one_token_further_from_the_next_input_token(hc_mult: int) -> None:
    """Depth 1 at position t sees the main model's state at t and token t+1, and predicts labels[t+1]."""
    torch.manual_seed(0)
    model = Transformer(cfg(hc_mult=hc_mult, mtp_layers=1)).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    mtp_logits, original = [], model.mtp[0].predict

    def spy(*args: object) -> tuple:
        result = original(*args)
        with torch.no_grad():
            mtp_logits.append(model.head(result[0]))  # the logits the fused loss never forms
        return result

    model.mtp[0].predict = spy
    out = model(ids, labels=labels)
    (logits,) = mtp_logits
    assert logits.shape == (2, 11, VOCAB)
    expect = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.mtp_loss, expect)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + model.cfg.mtp_loss_coef * out.mtp_loss)
    # Changing input token 7 changes MTP logits from position 6 on (it is position 6's next token), not before.
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    mtp_logits.clear()
    model(changed, labels=labels)
    # Before position 6 rounding only (expert batches regroup: observed up to 1.4 fp32 eps of the
    # largest logit), from there on a change.
    assert_close_scaled(mtp_logits[0][:, :6], logits[:, :6], 16, "before position 6", scale=logits.abs().max().item())
    assert ((mtp_logits[0] - logits)[:, 6:].abs().amax(dim=(0, 2)) > 1e-4).all()


def test_training_forward_never_forms_full_logits_mtp_included() -> None:
    """With labels the head is fused into the loss for the main model and every MTP depth: no [B, S, V] logits."""
    model = Transformer(cfg(hc_mult=1, mtp_layers=2))
    calls = []
    model.head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    model(torch.randint(0, VOCAB, (2, 10)), labels=torch.randint(0, VOCAB, (2, 10))).loss.backward()
    assert calls == []
    model(torch.randint(0, VOCAB, (2, 10)))  # inference does use it
    assert calls == [(2, 10, VOCAB)]


def test_mtp_depths_chain_and_train() -> None:
    model = Transformer(cfg(hc_mult=4, mtp_layers=2))
    ids = torch.randint(0, VOCAB, (2, 10))
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model(ids[:, :2], labels=ids[:, :2]).mtp_loss.isfinite()  # depth 2 has no position left: skipped
    assert model(ids).mtp_loss is None  # inference: no MTP work
    assert len(model.routers()) == 2 + 2  # MTP blocks' routers are balanced like the others


def test_mtp_parameters_carry_the_official_names() -> None:
    keys = set(Transformer(cfg(hc_mult=4, mtp_layers=1)).state_dict())
    for name in ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn",
                 "hc_head_base", "hc_head_scale", "attn_norm.weight", "ffn_norm.weight", "hc_attn_fn", "hc_ffn_scale",
                 "attn.wq_a.weight", "ffn.gate.weight", "ffn.gate.expert_bias", "ffn.experts.w1"):
        assert f"mtp.0.{name}" in keys, name
    assert "mtp.0.ffn.gate.tid2eid" not in keys and "mtp.0.attn.compressor.wkv.weight" not in keys  # SWA + learned MoE
