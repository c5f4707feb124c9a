"""Gemma 4's model-level options (MOSAIC_SPEC §1.5-1.7): each against a formula written here, and the
whole non-attention model against transformers' Gemma 4 with the attention stubbed out on both sides.

Every weight the models start at 0 or 1 (norm weights, router scales, layer_scalar) is randomised first,
so a mapping error cannot hide behind an identity value.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs import ConfigError, validate
from moesaic.configs.schema import Config, ModelConfig, MoEConfig
from moesaic.model import Transformer
from moesaic.model.attention import ForwardContext
from moesaic.model.block import Block
from moesaic.model.ffn import SwiGLU
from moesaic.model.loss import linear_cross_entropy
from moesaic.model.moe import GroupedExperts
from moesaic.model.moe.router import Router
from moesaic.model.ple import embedding_scale

from attention_types import small_menu, small_spec
from numerics import assert_close_scaled
from test_attention_compressed import cached_logits

pytestmark = pytest.mark.numerics

EPS = 1e-6
GEMMA_MOE = dict(num_experts=4, top_k=2, intermediate_size=24, num_shared_experts=0, score_func="softmax",
                 norm_topk_prob=True, routed_scaling_factor=1.0, swiglu_limit=0.0, bias_update_rate=0.0,
                 router_input_norm=True, per_expert_scale=True)


def gemma_cfg(**overrides) -> ModelConfig:
    """Every Gemma option on, dense+moe in both layers, V4 SWA attention (the attention is not under test)."""
    fields = dict(vocab_size=64, hidden_size=48, num_layers=2, ffn_types=["dense+moe"] * 2, dense_intermediate_size=40,
                  ffn_activation="gelu_tanh", embed_scale=True, sandwich_norm=True, layer_scalar=True, ple_dim=8,
                  ple_vocab_size=40, final_logit_softcap=3.0, tie_embeddings=True, attention=small_menu(),
                  moe=MoEConfig(**GEMMA_MOE))
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and layer_scalar away from its init: vectors (norms, scales) around 1, matrices small."""
    gen = torch.Generator().manual_seed(seed)
    scalars = [b for name, b in module.named_buffers() if name.endswith("layer_scalar")]
    for t in [*module.parameters(), *scalars]:
        noise = torch.randn(t.shape, generator=gen)
        t.copy_(1 + 0.3 * noise if t.dim() <= 1 else 0.3 * noise / math.sqrt(t.shape[-1]))
    return module


def rms(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    y = x * (x.pow(2).mean(-1, keepdim=True) + EPS).rsqrt()
    return y if weight is None else y * weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def geglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (gelu_tanh(x @ w1.T) * (x @ w3.T)) @ w2.T


def gemma_route(r: torch.Tensor, router: Router, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§1.7: z = rms(r) * scale * D^-0.5; p = softmax(z W^T); top-k, renormalised, times per_expert_scale."""
    z = rms(r) * router.scale * r.shape[-1] ** -0.5
    p = (z @ router.weight.T).softmax(-1)
    w, idx = p.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return idx, w * router.per_expert_scale[idx]


def experts_formula(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """x [T,D], idx/w [T,k] -> sum_j w_j GeGLU_{idx_j}(x)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            out[t] += w[t, j] * geglu(x[t], experts.w1[e], experts.w3[e], experts.w2[e])
    return out


class StubAttention(nn.Module):
    """A fixed, causal-free stand-in for attention (x A), so a block is compared without its attention."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) / dim ** 0.5
        self.register_buffer("a", a, persistent=False)  # not in any state dict

    def forward(self, hidden_states: torch.Tensor, ctx: ForwardContext | None = None,
                **_) -> tuple[torch.Tensor, torch.Tensor]:
        """moesaic's call (x, ctx) and transformers' (hidden_states=..., position_embeddings=..., ...) alike."""
        return hidden_states @ self.a, hidden_states.new_zeros(())


# --- the FFN activation -------------------------------------------------------------------------------

def test_geglu_dense_and_experts_match_formula():
    torch.manual_seed(0)
    x = torch.randn(7, 16)
    ffn = SwiGLU(16, 24, activation="gelu_tanh")
    assert_close_scaled(ffn(x), geglu(x, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight), 16, "dense GeGLU")
    experts = GroupedExperts(3, 16, 12, init_std=0.3, activation="gelu_tanh")
    counts = torch.tensor([2, 0, 5])
    got = experts(x, counts)
    want = torch.cat([geglu(x[:2], experts.w1[0], experts.w3[0], experts.w2[0]),
                      geglu(x[2:], experts.w1[2], experts.w3[2], experts.w2[2])])
    assert_close_scaled(got, want, 16, "GeGLU experts")


def test_ffn_activation_reaches_shared_and_routed_experts():
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=16, num_shared_experts=1, swiglu_limit=0.0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=48, num_layers=2, ffn_types=["dense", "moe"],
                                    ffn_activation="gelu_tanh", attention=small_menu(), moe=moe))
    ffn = model.layers[1].ffn
    assert model.layers[0].ffn.activation == ffn.experts.activation == ffn.shared_experts.activation == "gelu_tanh"


# --- the router ---------------------------------------------------------------------------------------

def test_gemma_router_matches_formula_and_transformers():
    cfg = gemma_cfg()
    router = randomise(Router(cfg, 0))
    x = torch.randn(3, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1)) * 2
    out = router(x)
    idx, w = gemma_route(x.reshape(15, -1), router, 2)
    assert torch.equal(out.topk_idx, idx)
    assert_close_scaled(out.gates, w, 16, "gates vs §1.7")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    hf = Gemma4TextRouter(transformers.Gemma4TextConfig(hidden_size=cfg.hidden_size, num_experts=4, top_k_experts=2,
                                                         rms_norm_eps=EPS))
    hf.load_state_dict({"proj.weight": router.weight, "scale": router.scale,
                        "per_expert_scale": router.per_expert_scale})
    _, hf_w, hf_idx = hf(x.reshape(15, -1))
    assert torch.equal(out.topk_idx, hf_idx)
    assert_close_scaled(out.gates, hf_w, 16, "gates vs Gemma4TextRouter")


def test_default_router_has_no_gemma_parameters():
    names = dict(Router(ModelConfig(), 0).named_parameters())
    assert list(names) == ["weight"]


# --- dense + moe --------------------------------------------------------------------------------------

def test_dense_moe_matches_formula():
    """y = post_dense_norm(dense(h)) + post_moe_norm(experts(moe_norm(r))), routed from the un-normed r."""
    cfg = gemma_cfg()
    ffn = randomise(Block(cfg, 0, small_spec("swa")).ffn)
    r = torch.randn(2, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(2)) * 3
    h = rms(r)  # any normed input of the dense half
    y, aux = ffn(h, r)
    flat = r.reshape(10, -1)
    idx, w = gemma_route(flat, ffn.moe.gate, 2)
    dense = ffn.dense
    m1 = rms(geglu(h, dense.w1.weight, dense.w3.weight, dense.w2.weight), ffn.post_dense_norm.weight)
    m2 = rms(experts_formula(rms(flat, ffn.moe_norm.weight), idx, w, ffn.moe.experts), ffn.post_moe_norm.weight)
    assert_close_scaled(y, m1 + m2.view_as(r), 32, "dense+moe")
    assert aux.item() == 0.0


def test_dense_moe_parameter_counts_and_widths():
    cfg = gemma_cfg(dense_intermediate_sizes=[40, 80])
    model = Transformer(cfg)
    assert [layer.ffn.dense.w1.weight.shape[0] for layer in model.layers] == [40, 80]
    routed = sum(p.numel() for layer in model.layers for p in layer.ffn.moe.experts.parameters())
    assert model.num_params(active_only=True) == model.num_params() - routed // 2  # top 2 of 4
    assert len(model.routers()) == 2
    dense = Transformer(ModelConfig(vocab_size=64, hidden_size=48, num_layers=2, ffn_types=["dense"] * 2,
                                    dense_intermediate_sizes=[16, 32], attention=small_menu()))
    assert [layer.ffn.w2.weight.shape[1] for layer in dense.layers] == [16, 32]


# --- block: sandwich norms, PLE, layer scalar --------------------------------------------------------

@pytest.mark.parametrize("hc_mult", [1, 2])
def test_sandwich_norms_and_layer_scalar_match_formula(hc_mult):
    cfg = gemma_cfg(ffn_types=["dense"] * 2, ffn_activation="silu", ple_dim=0, hc_mult=hc_mult)
    block = Block(cfg, 0, small_spec("swa"))
    block.attn = StubAttention(cfg.hidden_size, 3)
    randomise(block)
    assert "layer_scalar" in block.state_dict() and "layer_scalar" not in dict(block.named_parameters())
    shape = (2, 5, hc_mult, cfg.hidden_size) if hc_mult > 1 else (2, 5, cfg.hidden_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    got, _ = block(x, torch.zeros(2, 5, dtype=torch.long), ForwardContext())

    def attn(u):
        return rms(rms(u, block.attn_norm.weight) @ block.attn.a, block.post_attn_norm.weight)

    def ffn(u):
        v, f = rms(u, block.ffn_norm.weight), block.ffn
        return rms((F.silu(v @ f.w1.weight.T) * (v @ f.w3.weight.T)) @ f.w2.weight.T, block.post_ffn_norm.weight)

    if hc_mult == 1:
        x = x + attn(x)
        want = x + ffn(x)
    else:  # the mHC plumbing is mhc.py's; the post norms act on the sublayer outputs before the expand
        from moesaic.model import mhc

        pre, post, comb = mhc.sublayer_mappings(x, block.hc_attn_fn, block.hc_attn_base, block.hc_attn_scale,
                                                block.hc)
        x = mhc.expand(attn(mhc.collapse(x, pre)), x, post, comb)
        pre, post, comb = mhc.sublayer_mappings(x, block.hc_ffn_fn, block.hc_ffn_base, block.hc_ffn_scale, block.hc)
        want = mhc.expand(ffn(mhc.collapse(x, pre)), x, post, comb)
    assert_close_scaled(got, want * block.layer_scalar, 32, "block")


def test_per_layer_embeddings_match_formula():
    """§1.5: ple = (norm(proj(e) D^-0.5) + table(ids) sqrt(P)) 2^-0.5, layer-major; each layer ends with
    h + norm(proj(gelu(gate(h)) * ple_i)), then times layer_scalar."""
    cfg = gemma_cfg(num_layers=3, ffn_types=["dense"] * 3)
    torch.manual_seed(0)
    model = randomise(Transformer(cfg))
    ids = torch.randint(0, 40, (2, 6))
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.ple.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("ple", i), (args, out)))
        layer.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("layer", i), out[0]))
    model(ids)
    D, P, L = cfg.hidden_size, cfg.ple_dim, cfg.num_layers
    e = model.embed.weight[ids] * math.sqrt(D)
    tok = (model.ple.embed.weight[ids] * math.sqrt(P)).view(2, 6, L, P)
    ctx = rms((e @ model.ple.proj.weight.T * D ** -0.5).view(2, 6, L, P), model.ple.norm.weight)
    ple = (ctx + tok) * 2 ** -0.5
    for i, layer in enumerate(model.layers):
        (h, ple_i), out = seen[("ple", i)]
        assert_close_scaled(ple_i, ple[:, :, i], 16, f"ple of layer {i}")
        m = layer.ple
        want = h + rms((gelu_tanh(h @ m.gate.weight.T) * ple[:, :, i]) @ m.proj.weight.T, m.norm.weight)
        assert_close_scaled(out, want, 16, f"PLE of layer {i}")
        assert_close_scaled(seen[("layer", i)], out * layer.layer_scalar, 0, f"layer_scalar of layer {i}")


def test_mtp_blocks_have_no_ple():
    model = Transformer(gemma_cfg(mtp_layers=1, ffn_types=["dense"] * 2))
    assert all(layer.ple is not None for layer in model.layers) and model.mtp[0].ple is None


# --- embedding scale and softcap ---------------------------------------------------------------------

def test_embed_scale_and_tied_head():
    """Layer 0 reads embed(ids) * sqrt(D); the tied head multiplies by the unscaled embedding."""
    model = randomise(Transformer(gemma_cfg(final_logit_softcap=0.0, ple_dim=0)))
    ids = torch.randint(0, 64, (2, 5))
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    model.norm.register_forward_hook(lambda m, args, out: seen.__setitem__("h", out))
    logits = model(ids).logits
    assert_close_scaled(seen["x"], model.embed.weight[ids] * math.sqrt(48), 2, "scaled embedding")
    assert_close_scaled(logits, seen["h"] @ model.embed.weight.T, 16, "tied head")
    assert embedding_scale(1536, torch.bfloat16) == 39.25  # §1.11: sqrt(1536) = 39.19 rounds to bf16


@pytest.mark.parametrize("chunk", [5, 4096])
def test_fused_loss_with_softcap_equals_capped_logits_then_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :4] = -100
    cap = 2.5  # logits have std 4: the cap bends most of them
    got = linear_cross_entropy(h, weight, labels, chunk, cap=cap)
    capped = cap * torch.tanh((h @ weight.T) / cap)
    want = F.cross_entropy(capped.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert_close_scaled(got, want, 8, "loss")
    grads = torch.autograd.grad(got * 0.3, (h, weight)), torch.autograd.grad(want * 0.3, (h, weight))
    for name, a, b in zip(("h", "W"), *grads, strict=True):
        assert_close_scaled(a, b, 32, f"gradient of {name}")
    uncapped = F.cross_entropy((h @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert abs(got.item() - uncapped.item()) > 1.0  # the cap matters here


def test_model_softcaps_logits_lm_loss_and_mtp_loss():
    cap = 0.5  # below the logits' spread at this init, so the cap shows in every loss
    model = randomise(Transformer(gemma_cfg(final_logit_softcap=cap, mtp_layers=1, mtp_loss_coef=1.0)))
    ids = torch.randint(0, 40, (2, 7))
    raw = []
    model.head.register_forward_hook(lambda m, args, out: raw.append(out))
    logits = model(ids).logits
    assert_close_scaled(logits, cap * torch.tanh(raw[0] / cap), 4, "logits")
    raw.clear()
    block, hidden = model.mtp[0], []
    predict = block.predict

    def keep_hidden(*args, **kwargs):  # the MTP block's normed hidden state, which the fused loss takes
        out = predict(*args, **kwargs)
        hidden.append(out[0])
        return out

    block.predict = keep_hidden
    out = model(ids, labels=ids)
    assert raw == []  # both losses are fused: no head call
    want = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert_close_scaled(out.lm_loss, want, 16, "lm loss")
    with torch.no_grad():
        mtp_raw = model.head(hidden[0])
    mtp_want = F.cross_entropy((cap * torch.tanh(mtp_raw / cap)).flatten(0, 1), ids[:, 1:].flatten())
    assert_close_scaled(out.mtp_loss, mtp_want, 16, "MTP loss")
    uncapped = F.cross_entropy(raw_logits(model, ids).flatten(0, 1), ids.flatten())
    assert abs(out.lm_loss.item() - uncapped.item()) > 0.01  # the cap matters here


def raw_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The logits without the cap (the cap read per forward from the config)."""
    cap, model.cfg.final_logit_softcap = model.cfg.final_logit_softcap, 0.0
    try:
        return model(ids).logits
    finally:
        model.cfg.final_logit_softcap = cap


# --- the whole model -----------------------------------------------------------------------------------

def test_all_options_train_decode_and_run_with_mhc():
    for hc_mult in (1, 2):
        torch.manual_seed(0)
        model = Transformer(gemma_cfg(hc_mult=hc_mult, mtp_layers=1))
        ids = torch.randint(0, 40, (2, 9))
        model(ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():  # PLE and the softcap are per token: prefill + decode gives the full forward's logits
        full = model(ids).logits
    assert_close_scaled(cached_logits(model, ids, [6] + [1] * 3), full, 16, "cached logits")


def test_whole_model_matches_transformers_gemma4_with_attention_stubbed():
    """Gemma4ForCausalLM and moesaic with the same stub attention in every layer: embeddings (scaled, tied),
    PLE, sandwich norms, dense MLP + router + experts, layer_scalar, final norm and softcap, name by name."""
    transformers = pytest.importorskip("transformers")
    cfg = gemma_cfg(num_layers=3, ffn_types=["dense+moe"] * 3)
    torch.manual_seed(0)
    ours = randomise(Transformer(cfg)).eval()
    hf_cfg = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=40, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=24, final_logit_softcapping=3.0, rms_norm_eps=EPS, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)
    hf = transformers.Gemma4ForCausalLM(hf_cfg).eval()
    state = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
             "model.embed_tokens_per_layer.weight": ours.ple.embed.weight,
             "model.per_layer_model_projection.weight": ours.ple.proj.weight,
             "model.per_layer_projection_norm.weight": ours.ple.norm.weight}
    for i, layer in enumerate(ours.layers):
        layer.attn = StubAttention(48, 10 + i)
        hf.model.layers[i].self_attn = StubAttention(48, 10 + i)
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffn_norm",
                 "per_layer_input_gate": "ple.gate", "per_layer_projection": "ple.proj",
                 "post_per_layer_input_norm": "ple.norm"}
        names.update({"mlp.gate_proj": "ffn.dense.w1", "mlp.up_proj": "ffn.dense.w3", "mlp.down_proj": "ffn.dense.w2",
                      "post_feedforward_layernorm_1": "ffn.post_dense_norm",
                      "pre_feedforward_layernorm_2": "ffn.moe_norm",
                      "post_feedforward_layernorm_2": "ffn.post_moe_norm", "router.proj": "ffn.moe.gate"})
        moe = layer.ffn.moe
        state.update({f"model.layers.{i}.router.scale": moe.gate.scale,
                      f"model.layers.{i}.router.per_expert_scale": moe.gate.per_expert_scale,
                      f"model.layers.{i}.experts.gate_up_proj": torch.cat([moe.experts.w1, moe.experts.w3], 1),
                      f"model.layers.{i}.experts.down_proj": moe.experts.w2})
        sub = dict(layer.named_parameters())
        state.update({f"model.layers.{i}.{hf_name}.weight": sub[f"{name}.weight"] for hf_name, name in names.items()})
        state[f"model.layers.{i}.layer_scalar"] = layer.layer_scalar
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(input_ids=ids, use_cache=False).logits
        got = ours(ids).logits
    assert_close_scaled(got, want, 64, "logits vs Gemma4ForCausalLM")  # fp32, different rsqrt/pow kernels


# --- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(ffn_activation="gelu_tanh"), "model.ffn_activation='gelu_tanh' has no clamp: set model.moe.swiglu_limit=0"),
    (dict(ffn_activation="relu"), "model.ffn_activation='relu' is not allowed"),
    (dict(dense_intermediate_sizes=[8]), "model.dense_intermediate_sizes has 1 entries but model.num_layers=4"),
    (dict(dense_intermediate_sizes=[8, 8, 0, 8]), "model.dense_intermediate_sizes[2]=0 must be > 0"),
    (dict(ple_dim=-1), "model.ple_dim=-1 must be >= 0"),
    (dict(ple_vocab_size=-2), "model.ple_vocab_size=-2 must be >= 0"),
    (dict(final_logit_softcap=-1.0), "model.final_logit_softcap=-1.0 must be >= 0"),
    (dict(ffn_types=["dense+moe", "bad", "moe", "moe"]), "model.ffn_types[1]='bad' is not allowed"),
])
def test_config_refuses_with_one_line(overrides, message):
    cfg = Config()
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_accepts_the_gemma_layout_with_expert_parallelism():
    cfg = Config()
    cfg.model = gemma_cfg(num_layers=4, ffn_types=["dense+moe"] * 4, dense_intermediate_sizes=[40, 40, 80, 80])
    cfg.parallel.ep = 2
    validate(cfg)
