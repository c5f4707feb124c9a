"""The single-device Transformer: loss at init, gradients, causality, KV-cache decoding, generate,
initialisation and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import ModelOutput, Transformer
from moesaic.model.loss import linear_cross_entropy

from attention_types import KINDS, SMALL, small_menu
from numerics import assert_close_scaled
from test_attention_compressed import cached_logits

pytestmark = pytest.mark.numerics

WINDOW = SMALL["swa"]["window"]
# Attention layouts the cache and causality tests run on: every registered type alone, and V4's three
# types in one model; the short test sequences cross many window and compression boundaries.
LAYOUTS = [[kind] * 3 for kind in KINDS] + [["csa", "hca", "swa"]]


def test_every_registered_type_has_small_settings():
    assert set(SMALL) == set(KINDS), "add the new type's small settings to tests/attention_types.py"


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=256, hidden_size=48, num_layers=3, ffn_types=["dense"] * 3, dense_intermediate_size=64,
                  attention=small_menu())
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**overrides))


def test_loss_at_init_is_log_vocab_and_backward_reaches_every_parameter():
    model = tiny_model()
    ids = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    assert isinstance(out, ModelOutput) and out.logits is None  # the head is fused into the loss
    assert model(ids).logits.shape == (4, 40, 256)
    # Logits have std ~ init_std * sqrt(D) = 0.14 at init, so the loss is log(V) + ~0.01.
    assert abs(out.lm_loss.item() - math.log(256)) < 0.05
    assert out.aux_loss.item() == 0.0 and torch.equal(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_lm_loss_ignores_masked_labels():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(ids, labels=labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(model(ids).logits[keep], labels[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    assert model(ids).loss is None
    assert model(ids, labels=torch.full_like(ids, -100)).lm_loss.item() == 0.0  # no NaN from 0 / 0


@pytest.mark.parametrize("layer_types", LAYOUTS)
def test_causality(layer_types):
    model = tiny_model(layer_types=layer_types)
    ids = torch.randint(0, 256, (2, 30))
    t = 17
    ids2 = ids.clone()
    ids2[:, t + 1:] = torch.randint(0, 256, (2, 30 - t - 1))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(b[:, :t + 1], a[:, :t + 1], atol=1e-6, rtol=0)
    assert (b[:, t + 1:] - a[:, t + 1:]).abs().amax(dim=(0, 2)).min() > 1e-4  # every later position changed


@pytest.mark.parametrize("layer_types", LAYOUTS)
@pytest.mark.parametrize("k", [1, 7, 20])
def test_prefill_plus_decode_equals_full_prefill(k, layer_types):
    model = tiny_model(layer_types=layer_types)
    S = 3 * WINDOW + 5
    ids = torch.randint(0, 256, (2, S))
    with torch.no_grad():
        full = model(ids).logits
    assert_close_scaled(cached_logits(model, ids, [S - k] + [1] * k), full, 16, "cached logits")


def test_cache_bytes_per_layer():
    model = tiny_model()
    caches = model.make_caches(1)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 2 * WINDOW + 3)), caches=caches)
        model(torch.randint(0, 256, (1, 1)), caches=caches)
    assert len(caches) == 3
    assert [c.nbytes() for c in caches] == [WINDOW * 32 * 4] * 3


@pytest.mark.parametrize("layer_types", LAYOUTS)
def test_greedy_generate_matches_uncached_decoding(layer_types):
    model = tiny_model(layer_types=layer_types)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, max_new_tokens=2 * WINDOW)
    assert out.shape == (2, 5 + 2 * WINDOW) and torch.equal(out[:, :5], prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(2 * WINDOW):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_sampling():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 4))

    def sample(seed, **kw):
        return model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))
    assert torch.equal(sample(3, top_k=1), model.generate(prompt, 10))  # top-1 sampling is greedy


def test_init_is_deterministic_and_uses_init_std():
    a, b, c = tiny_model(seed=5), tiny_model(seed=5), tiny_model(seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)
    for w in (a.embed.weight, a.head.weight, a.layers[0].attn.wq_b.weight, a.layers[1].ffn.w2.weight):
        assert abs(w.std().item() - 0.02) < 0.002


def test_tied_embeddings_and_param_counts():
    untied, tied = tiny_model(), tiny_model(tie_embeddings=True)
    assert tied.head.weight is tied.embed.weight
    total = sum(p.numel() for p in untied.parameters())
    assert untied.num_params() == total
    assert untied.num_params(active_only=True) == total  # dense FFNs only: everything is active
    assert tied.num_params() == total - 256 * 48
    assert untied.routers() == []


def test_moe_layers_plug_in():
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=32)
    model = tiny_model(ffn_types=["dense", "moe", "moe"], moe=moe)
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert len(model.routers()) == 2
    routed = sum(p.numel() for layer in model.layers[1:] for p in layer.ffn.experts.parameters())
    assert model.num_params(active_only=True) == model.num_params() - routed // 2


@pytest.mark.parametrize("chunk", [5, 4096])
def test_fused_head_loss_equals_logits_then_cross_entropy(chunk):
    """linear_cross_entropy == F.cross_entropy(h @ W^T) in value and in the gradients of h and W, to fp32
    rounding, with ignored labels and a chunk that does not divide the tokens; without gradients too."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :4] = -100
    got = linear_cross_entropy(h, weight, labels, chunk)
    want = torch.nn.functional.cross_entropy((h @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=-100,
                                             reduction="sum")
    assert_close_scaled(got, want, 8, "loss")
    grads = torch.autograd.grad(got * 0.3, (h, weight)), torch.autograd.grad(want * 0.3, (h, weight))
    for name, a, b in zip(("h", "W"), *grads, strict=True):
        assert_close_scaled(a, b, 32, f"gradient of {name}")  # sums over tokens or classes (observed: 5 eps)
    with torch.no_grad():
        assert_close_scaled(linear_cross_entropy(h, weight, labels, chunk), want, 8, "loss without gradients")
