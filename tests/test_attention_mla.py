"""The mla and dsa attention types against naive fp64 references written from transformers' formulas
(MOSAIC_SPEC §4.2-4.3): values, gradients, the DSA indexer's picks and KL loss, where that loss's
gradient goes, linear memory, YaRN against transformers, and KV bytes (V3.2: 1408 B/token/layer in bf16)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moesaic.configs.schema import AttentionConfig, ModelConfig
from moesaic.model.attention.dsa import DSASpec
from moesaic.model.attention.mla import MLASpec
from moesaic.model.kv_accounting import layer_kv_bytes

from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics

D = 48
YARN = dict(yarn_factor=4.0, yarn_original_max_position=8, yarn_mscale=1.0, yarn_mscale_all_dim=1.0)
MLA = {
    "v3_yarn": MLASpec(num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                       v_head_dim=12, query_chunk=5, **YARN),
    "no_q_latent_wide_v": MLASpec(num_heads=2, q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=4,
                                  qk_rope_head_dim=4, v_head_dim=16, yarn_factor=4.0, yarn_original_max_position=8,
                                  query_chunk=7),
}
DSA = DSASpec(num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
              index_heads=16, index_head_dim=16, index_topk=6, query_chunk=5, indexer_loss_coef=1.0, **YARN)


def build(spec: MLASpec, seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=256, hidden_size=D, num_layers=1, layer_types=["a"], ffn_types=["dense"],
                      attention=AttentionConfig(menu={"a": spec}))
    torch.manual_seed(seed)
    layer = spec.build(cfg, 0)
    with torch.no_grad():  # norms start at one (and LayerNorm biases at zero): randomise so a misplaced one shows
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
            else:
                p.normal_(0.0, 0.3)
    return layer


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def hf_yarn(spec: MLASpec) -> tuple[torch.Tensor, float]:
    """transformers' inv_freq and attention factor for the spec's RoPE (a DeepseekV3 config)."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": spec.rope_theta, "factor": spec.yarn_factor,
            "original_max_position_embeddings": spec.yarn_original_max_position, "beta_fast": spec.yarn_beta_fast,
            "beta_slow": spec.yarn_beta_slow}
    rope.update({k: v for k, v in (("mscale", spec.yarn_mscale), ("mscale_all_dim", spec.yarn_mscale_all_dim)) if v})
    cfg = DeepseekV3Config(qk_rope_head_dim=spec.qk_rope_head_dim, rope_parameters=rope, max_position_embeddings=256)
    return ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")


def interleave_rope(x: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb_interleave on x [B,S,(H,)r]: pairs (2i, 2i+1), output evens then odds."""
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    freqs = pos[:, None] * inv_freq.double()
    cos, sin = torch.cat([freqs, freqs], -1).cos() * factor, torch.cat([freqs, freqs], -1).sin() * factor
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    x = torch.cat([x[..., 0::2], x[..., 1::2]], -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def half_split_rope(x: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb (rotate_half) on the leading 2 * len(inv_freq) channels."""
    rot = 2 * inv_freq.numel()
    freqs = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq.double()
    cos, sin = torch.cat([freqs, freqs], -1).cos() * factor, torch.cat([freqs, freqs], -1).sin() * factor
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + torch.cat([-head[..., rot // 2:], head[..., :rot // 2]], -1) * sin, rest], -1)


def naive(spec: MLASpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """DeepseekV32Attention.forward (eager; the indexer too for a DSASpec), with full [S, S] tensors."""
    B, S, _ = x.shape
    H, nope, rope, dv = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    inv_freq, factor = hf_yarn(spec)
    if spec.q_lora_rank:
        q_lat = rms(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"])
        q = (q_lat @ w["q_b_proj.weight"].T).view(B, S, H, nope + rope)
    else:
        q = (x @ w["q_proj.weight"].T).view(B, S, H, nope + rope)
    c, k_rot = (x @ w["kv_a_proj_with_mqa.weight"].T).split([spec.kv_lora_rank, rope], -1)
    kv = (rms(c, w["kv_a_layernorm.weight"]) @ w["kv_b_proj.weight"].T).view(B, S, H, nope + dv)
    k_nope, v = kv.split([nope, dv], -1)
    q = torch.cat([q[..., :nope], interleave_rope(q[..., nope:], inv_freq, factor)], -1)
    k = torch.cat([k_nope, interleave_rope(k_rot, inv_freq, factor)[:, :, None].expand(-1, -1, H, -1)], -1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * spec.softmax_scale()
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    visible = causal.expand(B, S, S)
    out: dict[str, torch.Tensor] = {}
    if isinstance(spec, DSASpec):
        n, d = spec.index_heads, spec.index_head_dim
        qi = half_split_rope((q_lat @ w["indexer.wq_b.weight"].T).view(B, S, n, d), inv_freq, factor)
        ki = torch.nn.functional.layer_norm(x @ w["indexer.wk.weight"].T, (d,), w["indexer.k_norm.weight"],
                                            w["indexer.k_norm.bias"], 1e-6)
        ki = half_split_rope(ki, inv_freq, factor)
        scores = torch.relu(torch.einsum("bshd,btd->bsht", qi, ki) * d ** -0.5)
        weights = (x @ w["indexer.weights_proj.weight"].T) * n ** -0.5
        index = torch.einsum("bsh,bsht->bst", weights, scores).masked_fill(~causal, float("-inf"))
        k_top = min(spec.index_topk, S)
        picks = index.sort(dim=-1, descending=True, stable=True).indices[..., :k_top]  # ties: earlier token
        visible = torch.zeros(B, S, S, dtype=torch.bool).scatter(-1, picks, True) & causal
        out.update(index=index, visible=visible)
    probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, S, H * dv)
    out.update(out=o @ w["o_proj.weight"].T, probs=probs)
    return out


def fp64_weights(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}


def check_against_naive(spec: MLASpec, S: int) -> None:
    layer = build(spec)
    x = torch.randn(2, S, D, requires_grad=True, generator=torch.Generator().manual_seed(1))
    out, aux = layer(x)
    w, x64 = fp64_weights(layer), x.detach().double().requires_grad_()
    ref = naive(spec, w, x64)["out"]
    assert_close_scaled(out, ref, 16, "output")
    g = torch.randn_like(out)
    (out * g).sum().backward()  # the LM side only: the indexer loss is checked on its own
    main = {n: p for n, p in w.items() if not n.startswith("indexer.")}
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), [x64, *main.values()])
    assert_close_scaled(x.grad, ref_grads[0], 32, "grad x")
    params = dict(layer.named_parameters())
    for name, ref_grad in zip(main, ref_grads[1:]):
        assert_close_scaled(params[name].grad, ref_grad, 32, f"grad {name}")
    for name, p in params.items():  # the LM loss never reaches the indexer (its input is detached)
        assert not name.startswith("indexer.") or p.grad is None, name


@pytest.mark.parametrize("name", list(MLA))
def test_mla_matches_naive_reference_forward_and_backward(name):
    check_against_naive(MLA[name], 19)


def test_dsa_matches_naive_reference_forward_and_backward():
    check_against_naive(DSA, 19)  # 19 tokens > index_topk 6: most queries attend to a strict subset


def test_yarn_matches_transformers():
    for spec in (*MLA.values(), dataclasses.replace(DSA, yarn_mscale=0.707, yarn_mscale_all_dim=0.0)):
        inv_freq, factor = hf_yarn(spec)
        layer = build(spec)
        assert torch.equal(layer.rope.inv_freq, inv_freq.float())
        assert layer.rope_factor == pytest.approx(factor, rel=1e-12)


def test_dsa_selection_and_indexer_loss_match_the_dense_reference_and_train_only_the_indexer():
    layer = build(DSA)
    x = torch.randn(2, 23, D, generator=torch.Generator().manual_seed(2))
    ref = naive(DSA, fp64_weights(layer), x.double())
    _, aux = layer(x)
    # The KL of the reference: target = head-summed attention mass on the picks, renormalised; the indexer's
    # softmax over its scores at the picks.
    visible = ref["visible"]
    p = ref["probs"].sum(1).masked_fill(~visible, 0)
    p = p / p.sum(-1, keepdim=True)
    log_q = ref["index"].masked_fill(~visible, float("-inf")).log_softmax(-1).masked_fill(~visible, 0)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1).mean()
    assert_close_scaled(aux, DSA.indexer_loss_coef * kl, 64, "indexer loss")
    aux.backward()
    for name, p in layer.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"the indexer loss reached {name}"


def test_dsa_picks_equal_the_dense_top_k():
    layer = build(DSA)
    x = torch.randn(1, 23, D, generator=torch.Generator().manual_seed(3))
    ref = naive(DSA, fp64_weights(layer), x.double())
    captured = {}
    select = layer.indexer.select
    layer.indexer.select = lambda *a: captured.setdefault("idx", select(*a))
    with torch.no_grad():
        layer(x)
    idx = captured["idx"][0][0]  # [S, k] of the first sequence
    ours = torch.zeros(23, 24, dtype=torch.bool).scatter_(-1, idx.masked_fill(idx < 0, 23), True)[:, :23]
    assert torch.equal(ours, ref["visible"][0])
    assert (ours.sum(-1) == torch.arange(1, 24).clamp(max=DSA.index_topk)).all()


@pytest.mark.parametrize("spec", [dataclasses.replace(MLA["v3_yarn"], query_chunk=64),
                                  dataclasses.replace(DSA, query_chunk=64, index_topk=32)], ids=["mla", "dsa"])
def test_backward_keeps_memory_linear_in_sequence_length(spec):
    """The storage autograd keeps for backward (views counted once), in total and largest, doubles (not
    quadruples) with the sequence."""
    layer = build(spec)
    saved = {}
    for S in (256, 512):
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out, aux = layer(torch.randn(1, S, D, requires_grad=True))
        (out.sum() + aux).backward()
        saved[S] = (sum(storages.values()), max(storages.values()))
    assert saved[512][0] <= 2.1 * saved[256][0] and saved[512][1] <= 2 * saved[256][1], saved


def test_kv_bytes_are_the_latents_and_the_cache_holds_exactly_them():
    v32 = dict(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128)
    mla, dsa = MLASpec(**v32), DSASpec(**v32, index_heads=64, index_head_dim=128, index_topk=2048)
    assert mla.kv_bytes(1, "bf16", "bf16") == (1152, 0.0)  # (512 + 64) x 2: V3's MLA
    assert dsa.kv_bytes(1, "bf16", "bf16") == (1408, 0.0)  # + the 128-wide index key: V3.2 (MOSAIC_SPEC §9)
    assert dsa.kv_bytes(10, "bf16", "fp8") == (10 * (1152 + 132), 0.0)
    cfg = ModelConfig(vocab_size=256, hidden_size=D, num_layers=2, layer_types=["mla", "dsa"],
                      ffn_types=["dense"] * 2, attention=AttentionConfig(menu={"mla": MLA["v3_yarn"], "dsa": DSA}))
    from moesaic.model import Transformer

    model = Transformer(cfg)
    caches = model.make_caches(1)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 9)), caches=caches)
        model(torch.randint(0, 256, (1, 1)), caches=caches)
    for layer, cache in zip(layer_kv_bytes(cfg, 10, "fp32"), caches):
        assert cache.kv_bytes() == layer.total
    assert caches[0].kv_bytes() == 10 * (16 + 8) * 4 and caches[1].kv_bytes() == 10 * (16 + 8 + 16) * 4


def test_mixed_v4_dsa_mla_model_trains_in_the_demo_loop_with_its_panels(tmp_path):
    """V4's CSA and HCA beside DSA and MLA layers (mosaic_tiny's menu plus two entries) in the trainer: the loss
    falls, the DSA layer logs its indexer's selection statistics and the KV panel counts its latent + index key."""
    from trainrun import train_briefly

    logged = train_briefly(
        tmp_path, "mosaic_tiny", "model.num_layers=4", "model.layer_types=[csa,dsa,hca,mla]",
        "model.ffn_types=[dense,moe,moe,moe]",
        "model.attention.menu.dsa={kind: dsa, num_heads: 4, q_lora_rank: 32, kv_lora_rank: 32, qk_nope_head_dim: 16, "
        "qk_rope_head_dim: 8, v_head_dim: 16, index_heads: 16, index_head_dim: 16, index_topk: 16, query_chunk: 32}",
        "model.attention.menu.mla={kind: mla, num_heads: 4, q_lora_rank: 32, kv_lora_rank: 32, qk_nope_head_dim: 16, "
        "qk_rope_head_dim: 8, v_head_dim: 16}")
    assert 0 < logged["attn_layers/L01/index_coverage"] <= 1 and logged["attn_layers/L01/index_distance"] > 0
    assert 0 < logged["attn_layers/L03/mass_first"] < 1
    assert logged["kv_layers/L01/4k/bytes_per_token"] == (32 + 8 + 16) * 4  # latent + RoPE key + index key, fp32
    assert logged["kv_layers/L03/4k/bytes_per_token"] == (32 + 8) * 4


def test_share_topk_needs_a_dsa_layer_before_it():
    from moesaic.configs import Config, ConfigError, validate

    shared = dataclasses.replace(DSA, share_topk=True, index_rope="interleave")
    for layers in (["shared", "dsa"], ["mla", "shared"]):
        cfg = ModelConfig(vocab_size=256, hidden_size=D, num_layers=2, layer_types=layers, ffn_types=["dense"] * 2,
                          attention=AttentionConfig(menu={"dsa": DSA, "mla": MLA["v3_yarn"], "shared": shared}))
        with pytest.raises(ConfigError, match="model.attention.menu.shared.share_topk=true .* the layer before it "
                                              "must be a dsa decoder layer"):
            validate(Config(model=cfg))
    assert shared.kv_bytes(10, "bf16", "bf16") == (10 * (16 + 8) * 2, 0.0)  # no index key of its own
