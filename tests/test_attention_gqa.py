"""The gqa attention type: against a naive masked-softmax reference in fp64, transformers' RoPE, KV sharing
(outputs, gradients into the source, decode, config checks), linear memory and KV bytes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moesaic.configs import ConfigError, validate
from moesaic.configs.schema import AttentionConfig, Config, ModelConfig
from moesaic.model import Transformer
from moesaic.model.attention import ForwardContext, StatsSink
from moesaic.model.attention.gqa import GQASpec
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.model.rope import half_split_inv_freq, rope_half_split

from attention_types import SMALL
from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics

D = 48
SPECS = {
    "qwen3": GQASpec(num_heads=4, num_kv_heads=2, head_dim=16, query_chunk=5),
    "sliding_partial_rope": GQASpec(num_heads=6, num_kv_heads=3, head_dim=8, window=5, qk_norm=False,
                                    rope_fraction=0.5, query_chunk=4),
    "gemma_global": GQASpec(num_heads=4, num_kv_heads=1, head_dim=32, k_eq_v=True, v_norm=True, scale=1.0,
                            rope_type="proportional", rope_fraction=0.25, rope_theta=1e6, query_chunk=7),
    "gemma_sliding": GQASpec(num_heads=4, num_kv_heads=2, head_dim=16, window=4, v_norm=True, scale=1.0,
                             query_chunk=3),
    # Laguna (MOSAIC_SPEC §2.2): per-head gate, half the head rotated, YaRN; sliding: more heads, per-element gate
    "laguna_global": GQASpec(num_heads=6, num_kv_heads=2, head_dim=16, rope_fraction=0.5, rope_theta=5e5,
                             gate="head", yarn_factor=4.0, yarn_original_max_position=8, query_chunk=5),
    "laguna_sliding": GQASpec(num_heads=8, num_kv_heads=2, head_dim=16, window=4, gate="element", query_chunk=6),
}


def model_cfg(menu: dict, layer_types: list[str], **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=D, num_layers=len(layer_types), layer_types=layer_types,
                       ffn_types=["dense"] * len(layer_types), dense_intermediate_size=64,
                       attention=AttentionConfig(menu=menu), **overrides)


def randomised(layer: torch.nn.Module) -> torch.nn.Module:
    """Norm weights start at one; make them random so a missing or misplaced norm shows."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return layer


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_half_rope(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor,
                     scaling: float = 1.0) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on the leading 2 * len(inv_freq) channels, cos/sin times ``scaling``."""
    rot = 2 * inv_freq.numel()
    freqs = positions.double()[:, None] * inv_freq.double()
    cos, sin = (scaling * torch.cat([freqs, freqs], -1).cos()[:, None],
                scaling * torch.cat([freqs, freqs], -1).sin()[:, None])
    head, rest = x[..., :rot], x[..., rot:]
    rotated = torch.cat([-head[..., rot // 2:], head[..., :rot // 2]], -1)
    return torch.cat([head * cos + rotated * sin, rest], -1)


def naive(spec: GQASpec, weights: dict[str, torch.Tensor], x: torch.Tensor, kv_x: torch.Tensor | None = None,
          kv_weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Full [S, S] masked softmax, written from the formulas; K/V from ``kv_x``/``kv_weights`` when shared.
    The rotary frequencies and YaRN factor are the spec's (checked against transformers' separately)."""
    B, S, _ = x.shape
    H, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    kv_x, kv_weights = (x, weights) if kv_x is None else (kv_x, kv_weights)
    inv_freq, scaling = spec.rotary().inv_freq, spec.rope_scaling()
    pos = torch.arange(S)
    q = (x @ weights["q_proj.weight"].T).view(B, S, H, hd)
    raw = (kv_x @ kv_weights["k_proj.weight"].T).view(B, S, n_kv, hd)
    v = raw if spec.k_eq_v else (kv_x @ kv_weights["v_proj.weight"].T).view(B, S, n_kv, hd)
    k = raw
    if spec.qk_norm:
        q, k = rms(q) * weights["q_norm.weight"], rms(k) * kv_weights["k_norm.weight"]
    if spec.v_norm:
        v = rms(v)
    q, k = rotate_half_rope(q, inv_freq, pos, scaling), rotate_half_rope(k, inv_freq, pos, scaling)
    k, v = k.repeat_interleave(H // n_kv, dim=2), v.repeat_interleave(H // n_kv, dim=2)  # [B,S,H,hd]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * (spec.scale or hd ** -0.5)
    qi, ki = pos[:, None], pos[None]
    visible = (ki <= qi) & ((ki > qi - spec.window) if spec.window else True)
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B,S,H,hd]
    if spec.gate != "none":  # softplus of the layer input's projection, one per head (broadcast) or per channel
        o = o * torch.nn.functional.softplus(x @ weights["g_proj.weight"].T).view(B, S, H, -1)
    return o.reshape(B, S, H * hd) @ weights["o_proj.weight"].T


def fp64_weights(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.double() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_naive_reference_forward_and_backward(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    layer = randomised(spec.build(model_cfg({"a": spec}, ["a"]), 0))
    x = torch.randn(2, 19, D, requires_grad=True)
    out, aux = layer(x)
    assert aux.item() == 0.0
    weights = fp64_weights(layer)
    x64 = x.double()
    ref = naive(spec, weights, x64)
    assert_close_scaled(out, ref, 16, "output")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), [x64, *weights.values()])
    assert_close_scaled(x.grad, ref_grads[0], 32, "grad x")
    for (pname, p), ref_grad in zip(layer.named_parameters(), ref_grads[1:]):
        assert_close_scaled(p.grad, ref_grad, 32, f"grad {pname}")


@pytest.mark.parametrize("proportional,fraction", [(False, 1.0), (False, 0.5), (True, 0.25), (True, 1.0)])
def test_rope_matches_transformers(proportional, fraction):
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    hd, theta = 32, 1e6
    rope = {"rope_type": "proportional" if proportional else "default", "rope_theta": theta,
            "partial_rotary_factor": fraction}
    cfg = Gemma4TextConfig(head_dim=hd, global_head_dim=hd, layer_types=["full_attention"], num_hidden_layers=1,
                           rope_parameters={"full_attention": rope, "sliding_attention": rope})
    if proportional:
        theirs, _ = ROPE_INIT_FUNCTIONS["proportional"](cfg, "cpu", layer_type="full_attention")
    else:
        rot = int(hd * fraction)
        theirs = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot)  # "default" with p
    ours = half_split_inv_freq(hd, theta, fraction, proportional)
    assert torch.equal(ours, theirs)
    x, pos = torch.randn(3, 11, 2, hd), torch.arange(5, 16)
    freqs = pos.float()[:, None] * ours
    cos, sin = freqs.cos(), freqs.sin()  # [S, rot/2]
    emb_cos, emb_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rot = 2 * ours.numel()
    expected = torch.cat([apply_rotary_pos_emb(x[..., :rot], emb_cos, emb_sin, unsqueeze_dim=1), x[..., rot:]], -1)
    assert_close_scaled(rope_half_split(x, cos[:, None], sin[:, None]), expected, 4, "rotated")


# A mosaic of V4 and GQA layers with two KV-sharing layers (one per GQA flavour).
MOSAIC_MENU = {
    "csa": dict(kind="csa", **SMALL["csa"]),
    "hca": dict(kind="hca", **SMALL["hca"]),
    "sliding": dict(kind="gqa", num_heads=4, num_kv_heads=2, head_dim=16, window=6, v_norm=True, scale=1.0,
                    query_chunk=5),
    "global": dict(kind="gqa", num_heads=4, num_kv_heads=1, head_dim=32, k_eq_v=True, v_norm=True, scale=1.0,
                   rope_type="proportional", rope_fraction=0.25, rope_theta=1e6, query_chunk=7),
    "sliding_shared": dict(kind="gqa", num_heads=2, num_kv_heads=2, head_dim=16, window=6, v_norm=True, scale=1.0,
                           kv_source=1, query_chunk=4),
    "global_shared": dict(kind="gqa", num_heads=4, num_kv_heads=1, head_dim=32, k_eq_v=True, v_norm=True,
                          scale=1.0, rope_type="proportional", rope_fraction=0.25, rope_theta=1e6, kv_source=3),
}
MOSAIC_LAYERS = ["csa", "sliding", "hca", "global", "sliding_shared", "global_shared"]


def mosaic_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_cfg(MOSAIC_MENU, MOSAIC_LAYERS))


def test_shared_layers_read_the_source_kv_and_send_it_gradients():
    spec_src = SPECS["gemma_sliding"]
    spec_shared = dataclasses.replace(spec_src, num_heads=2, kv_source=0)
    cfg = model_cfg({"src": spec_src, "shared": spec_shared}, ["src", "shared"])
    torch.manual_seed(0)
    src, shared = randomised(spec_src.build(cfg, 0)), randomised(spec_shared.build(cfg, 1))
    assert shared.k_proj is None and shared.v_proj is None and shared.k_norm is None
    assert shared.make_cache(1) is None
    x0, x1 = torch.randn(2, 15, D), torch.randn(2, 15, D)
    ctx = ForwardContext()
    src(x0, ctx)
    out, _ = shared(x1, ctx)
    w_src, w_shared = fp64_weights(src), fp64_weights(shared)
    ref = naive(spec_shared, w_shared, x1.double(), kv_x=x0.double(), kv_weights=w_src)
    assert_close_scaled(out, ref, 16, "shared output")
    out.sum().backward()  # the consumer alone: its gradient reaches the source's K projection and norm
    ref_k, ref_norm = torch.autograd.grad(ref.sum(), [w_src["k_proj.weight"], w_src["k_norm.weight"]])
    assert_close_scaled(src.k_proj.weight.grad, ref_k, 32, "source k_proj grad")
    assert_close_scaled(src.k_norm.weight.grad, ref_norm, 32, "source k_norm grad")


def test_mosaic_model_causal_and_prefill_plus_decode_equals_full():
    model = mosaic_model()
    S = 23
    ids = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.make_caches(2)
        assert caches[4] is None and caches[5] is None  # shared layers keep no cache
        steps = [model(ids[:, :9], caches=caches).logits]
        steps += [model(ids[:, t:t + 1], caches=caches).logits for t in range(9, S)]
        ids2 = ids.clone()
        ids2[:, 12:] = 7
        changed = model(ids2).logits
    # Six layers of rounding (31 eps seen on an AVX-512 host); in fp64 the GQA layers alone agree to 1e-16.
    assert_close_scaled(torch.cat(steps, dim=1), full, 64, "cached logits")
    torch.testing.assert_close(changed[:, :12], full[:, :12], atol=1e-6, rtol=0)
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_statistics_on_log_steps():
    model = mosaic_model()
    sink = StatsSink()
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 20)), stats=sink)
    layers = dict(sink.items())
    for i in (1, 3, 4, 5):
        total, count = layers[i].means["mass_first"]
        assert count == 2 * 20 * MOSAIC_MENU[MOSAIC_LAYERS[i]]["num_heads"]
        assert 0 < total.item() / count < 1
        assert math.isfinite(layers[i].maxima["max_logit"].item())


def test_backward_keeps_nothing_quadratic_in_sequence_length():
    S = 512
    for spec in (dataclasses.replace(SPECS["qwen3"], query_chunk=64), SPECS["gemma_sliding"]):
        layer = spec.build(model_cfg({"a": spec}, ["a"]), 0)
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(torch.randn(1, S, D, requires_grad=True))
        assert max(sizes) < S * S // 4, (spec, max(sizes))


def test_kv_bytes_and_cache_agree_and_shared_layers_cost_nothing():
    cfg = model_cfg(MOSAIC_MENU, MOSAIC_LAYERS)
    by_layer = layer_kv_bytes(cfg, 20, "fp32")
    assert [layer.total for layer in by_layer[4:]] == [0.0, 0.0]
    assert by_layer[1].total == 6 * 2 * 2 * 16 * 4  # window 6 of 2 KV heads x 16, K and V, fp32
    assert by_layer[3].total == 20 * 2 * 1 * 32 * 4
    assert layer_kv_bytes(cfg, 20, "bf16")[3].total == 20 * 2 * 1 * 32 * 2
    model = mosaic_model()
    caches = model.make_caches(1)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 20)), caches=caches)
    for i in (1, 3):
        assert caches[i].kv_bytes() == by_layer[i].total


@pytest.mark.parametrize("change,message", [
    ({"kv_source": 5}, "kv_source=5 must be an earlier layer than layer 4"),
    ({"kv_source": 0}, "layer 0 must compute its own K/V with a gqa entry"),
    ({"head_dim": 8}, "head_dim=8 differs from layer 1's (16)"),
    ({"window": 0}, "window=0 sees keys that layer 1 (window=6) does not keep"),
    ({"rope_theta": 500.0}, "rope_theta=500.0 differs from layer 1's"),
])
def test_bad_kv_sharing_is_one_line(change, message):
    cfg = Config(model=model_cfg({**MOSAIC_MENU, "sliding_shared": {**MOSAIC_MENU["sliding_shared"], **change}},
                                 MOSAIC_LAYERS))
    with pytest.raises(ConfigError, match="model.attention.menu.sliding_shared") as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_fields_are_one_line():
    for change, message in [({"num_kv_heads": 3}, "num_kv_heads=3 must divide"),
                            ({"rope_type": "yarn"}, "rope_type='yarn' must be one of"),
                            ({"rope_fraction": 0.3}, "rope_fraction=0.3 must be in (0, 1]")]:
        menu = {"g": {"kind": "gqa", **change}}
        with pytest.raises(ConfigError, match="model.attention.menu.g") as err:
            validate(Config(model=model_cfg(menu, ["g"])))
        assert message in str(err.value)


@pytest.mark.parametrize("config, shared, source", [("mosaic_tiny", "L05", "L04"), ("gemma4_tiny", "L05", "L02")])
def test_demo_configs_train_with_their_panels(config, shared, source, tmp_path):
    """configs/mosaic_tiny.yaml (V4 + Gemma-style GQA + a KV-shared layer) and gemma4_tiny.yaml in the trainer: the
    loss falls, the GQA layers log their statistics, and the KV panel counts a shared layer as 0 bytes."""
    from trainrun import train_briefly

    logged = train_briefly(tmp_path, config)
    for layer in (shared, source):
        assert 0 < logged[f"attn_layers/{layer}/mass_first"] < 1
        assert math.isfinite(logged[f"attn_layers/{layer}/max_logit"])
    assert logged[f"kv_layers/{shared}/4k/bytes_per_token"] == 0.0
    assert logged[f"kv_layers/{source}/4k/bytes_per_token"] == 2 * 1 * 64 * 4  # K and V of one 64-wide head, fp32


def test_flops_count_the_keys_each_query_sees():
    sliding, glob = SPECS["sliding_partial_rope"], SPECS["qwen3"]
    assert sliding.flops_per_token(8) == pytest.approx(12 * 6 * 8 * (1 + 2 + 3 + 4 + 5 + 5 + 5 + 5) / 8)
    assert glob.flops_per_token(8) == pytest.approx(12 * 4 * 16 * 4.5)


@pytest.mark.parametrize("factor, attention_factor", [(1.0, None), (4.0, None), (8.0, 1.3)])
def test_laguna_rope_and_yarn_match_transformers(factor, attention_factor):
    """Frequencies and cos/sin multiplier of a partial (half the head) RoPE layer, YaRN or not, equal
    transformers' Laguna rotary embedding (its per-layer-type rope_parameters)."""
    from transformers import LagunaConfig
    from transformers.models.laguna.modeling_laguna import LagunaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}
    if factor > 1:
        rope.update(rope_type="yarn", factor=factor, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0)
        if attention_factor:
            rope["attention_factor"] = attention_factor
    cfg = LagunaConfig(head_dim=32, num_hidden_layers=1, layer_types=["full_attention"], max_position_embeddings=512,
                       rope_parameters={"full_attention": rope})
    theirs = LagunaRotaryEmbedding(cfg)
    spec = GQASpec(head_dim=32, rope_theta=5e5, rope_fraction=0.5, yarn_factor=factor, yarn_original_max_position=64,
                   yarn_beta_fast=16.0, yarn_beta_slow=2.0, yarn_attention_factor=attention_factor or 0.0)
    torch.testing.assert_close(spec.rotary().inv_freq, theirs.full_attention_inv_freq, rtol=2 * 2 ** -23, atol=0)
    assert spec.rope_scaling() == pytest.approx(theirs.full_attention_attention_scaling, rel=1e-12)


def test_gate_statistics_and_bad_gate_fields():
    spec = SPECS["laguna_sliding"]
    torch.manual_seed(0)
    layer = randomised(spec.build(model_cfg({"a": spec}, ["a"]), 0))
    assert layer.g_proj.weight.shape == (8 * 16, D)
    sink = StatsSink()
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        layer(x, ForwardContext(stats=sink))
        g = torch.nn.functional.softplus(layer.g_proj(x))
    stats = dict(sink.items())[0]
    total, count = stats.means["gate_mean"]
    assert count == g.numel() and total.item() / count == pytest.approx(g.mean().item(), rel=1e-5)
    closed, _ = stats.means["gate_closed"]
    assert closed.item() == (g < 0.1).sum().item() > 0
    assert stats.maxima["gate_max"].item() == pytest.approx(g.max().item(), rel=1e-6)
    for change, message in [({"gate": "sigmoid"}, "gate='sigmoid' must be one of none, head, element"),
                            ({"yarn_factor": 0.5}, "yarn_factor=0.5 must be >= 1"),
                            ({"yarn_factor": 2.0, "rope_type": "proportional"}, "needs rope_type='default'")]:
        with pytest.raises(ConfigError, match="model.attention.menu.g") as err:
            validate(Config(model=model_cfg({"g": {"kind": "gqa", **change}}, ["g"])))
        assert message in str(err.value)


def test_layers_with_different_query_heads_account_their_own():
    """Laguna's budget: a 6-head and an 8-head layer over one KV shape cost the same KV bytes; FLOPs, weights and
    the panel's static head count follow each layer's heads."""
    from moesaic.trainer.metrics import head_metrics

    glob, sliding = SPECS["laguna_global"], dataclasses.replace(SPECS["laguna_global"], num_heads=8)
    cfg = model_cfg({"g": glob, "s": sliding}, ["g", "s", "g"])
    assert head_metrics(Config(model=cfg)) == {"attn_layers/L00/query_heads": 6.0, "attn_layers/L01/query_heads": 8.0,
                                               "attn_layers/L02/query_heads": 6.0}
    kv = layer_kv_bytes(cfg, 20, "bf16")
    assert kv[0].total == kv[1].total == 20 * 2 * 2 * 16 * 2
    assert sliding.flops_per_token(8) == pytest.approx(glob.flops_per_token(8) * 8 / 6)
    model = Transformer(cfg)
    assert model.layers[1].attn.q_proj.weight.shape == (8 * 16, D)
    assert model.layers[1].attn.g_proj.weight.shape == (8, D)
    assert model.layers[2].attn.o_proj.weight.shape == (D, 6 * 16)


def test_laguna_tiny_trains_with_its_gate_and_head_panel(tmp_path):
    """configs/laguna_tiny.yaml in the trainer: the loss falls; the panel logs each layer's query heads (6 global,
    8 sliding), the gates' statistics and equal KV bytes for both layer kinds (one KV shape, the budget aside)."""
    from trainrun import train_briefly

    logged = train_briefly(tmp_path, "laguna_tiny", kv_context=32)
    assert [logged[f"attn_layers/L0{i}/query_heads"] for i in range(4)] == [6, 8, 8, 6]
    for i in range(4):
        assert 0 < logged[f"attn_layers/L0{i}/gate_mean"] <= logged[f"attn_layers/L0{i}/gate_max"]
        assert 0 <= logged[f"attn_layers/L0{i}/gate_closed"] < 1
        assert logged[f"kv_layers/L0{i}/32/bytes_per_token"] == 2 * 2 * 32 * 4  # 2 KV heads of 32, K and V, fp32
