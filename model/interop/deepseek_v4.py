"""The DeepSeek-V4 family: transformers' ``config.json`` <-> moesaic ``ModelConfig`` (names: deepseek_v4_names).

Export writes the modern layout transformers' own ``save_pretrained`` writes (explicit
``layer_types``/``mlp_layer_types``/``compress_rates`` and nested ``rope_parameters``; never the
off-by-one default layout, §4.1). Import also reads the legacy keys transformers folds in
(``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, flat or ``rope_scaling`` YaRN).

What one side can express and the other cannot is refused with a ConfigError naming the field:
transformers always builds mHC (moesaic's hc_mult = 1, a plain residual, exports as the one-stream
mHC whose mappings are constant, ``plain_residual_tensors``, and is not imported back), an MoE FFN in
every layer with exactly one shared expert of ``moe_intermediate_size``, normalised top-k gates, untied
embeddings (V4), no YaRN attention scaling, and no FP8 weights.
Each layer's attention type writes and reads its own keys (``AttentionSpec.to_hf``/``from_hf``); one
config.json has one value per key, so the layers of an exported model must agree on shared keys.
"""

from __future__ import annotations

from typing import Any

import torch

from moesaic.configs import AttentionConfig, ModelConfig, MoEConfig
from moesaic.model.attention import layer_specs, registered, spec_for_hf
from moesaic.model.attention.base import HFReader

from .deepseek_v4_names import DeepSeekV4Names, count_mtp_blocks
from .family import ConfigReader, Family, require

HASH_MOE, MOE = "hash_moe", "moe"
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid")  # transformers 5.14 has no "softmax" router activation


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse models transformers' DeepseekV4ForCausalLM cannot reproduce exactly."""
    m = cfg.moe
    dense = [i for i in range(cfg.num_layers) if cfg.ffn_type(i) != "moe"]
    require(not dense, f"model.ffn_types[{dense[0] if dense else 0}]='{cfg.ffn_type(dense[0]) if dense else ''}': "
                       "DeepSeek-V4 has an MoE FFN in every layer")
    gemma = {"embed_scale": cfg.embed_scale, "sandwich_norm": cfg.sandwich_norm, "layer_scalar": cfg.layer_scalar,
             "ple_dim": cfg.ple_dim, "final_logit_softcap": cfg.final_logit_softcap,
             "moe.router_input_norm": m.router_input_norm, "moe.per_expert_scale": m.per_expert_scale}
    for name, value in gemma.items():
        require(not value, f"model.{name}={value}: a Gemma 4 option that DeepSeek-V4 checkpoints cannot express")
    require(cfg.ffn_activation == "silu",
            f"model.ffn_activation='{cfg.ffn_activation}': DeepSeek-V4 uses SwiGLU (silu)")
    require(m.num_shared_experts == 1, f"model.moe.num_shared_experts={m.num_shared_experts}: "
                                       "DeepSeek-V4 has exactly one shared expert")
    require(m.shared_intermediate_size in (0, m.intermediate_size),
            f"model.moe.shared_intermediate_size={m.shared_intermediate_size}: DeepSeek-V4's shared expert is as "
            f"wide as a routed one (0 or {m.intermediate_size})")
    require(m.router_logit_softcap == 0, f"model.moe.router_logit_softcap={m.router_logit_softcap}: DeepSeek-V4's "
                                         "router has no softcap (0)")
    require(m.norm_topk_prob, "model.moe.norm_topk_prob=false: DeepSeek-V4 always normalises the top-k gates")
    require(m.router == "linear", f"model.moe.router='{m.router}': DeepSeek-V4 routes with a linear router")
    require(m.n_group == 1, f"model.moe.n_group={m.n_group}: DeepSeek-V4 routes without expert groups (1)")
    require(m.score_func in SCORE_FUNCS, f"model.moe.score_func='{m.score_func}': transformers' DeepSeek-V4 "
                                         f"builds only {' and '.join(SCORE_FUNCS)} routers")
    require(not cfg.tie_embeddings, "model.tie_embeddings=true: DeepSeek-V4 checkpoints have an untied head")
    mtp = layer_specs(cfg)[cfg.num_layers:]
    require(all(spec.hf_layer_type == "sliding_attention" for spec in mtp),
            f"model.mtp_layer_type='{cfg.mtp_layer_type}': transformers' DeepSeek-V4 MTP blocks use sliding-window "
            "attention")


# A plain residual is the one-stream mHC with constant mappings: fn = 0 (no input dependence), pre = the head's
# weight = sigmoid(PLAIN_PRE_BASE), which is 1.0 exactly in fp32 and bf16, post = 2 sigmoid(0) = 1, comb = 1 (a 1x1
# softmax); with hc_eps = 0 nothing is added, so each sublayer gives X + F(X), as moesaic's hc_mult = 1 does.
PLAIN_PRE_BASE = 40.0


def plain_residual_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers name -> tensor of the constant one-stream mHC standing for moesaic's plain residual
    (empty for an mHC model), for every layer, the head and the MTP blocks."""
    if cfg.hc_mult > 1:
        return {}
    names, dim = DeepSeekV4Names(cfg), cfg.hidden_size
    site = {"fn": torch.zeros(3, dim), "base": torch.tensor([PLAIN_PRE_BASE, 0.0, 0.0]), "scale": torch.ones(3)}
    head = {"fn": torch.zeros(1, dim), "base": torch.tensor([PLAIN_PRE_BASE]), "scale": torch.ones(1)}
    blocks = [f"layers.{i}." for i in range(cfg.num_layers)] + [f"mtp.{i}." for i in range(cfg.mtp_layers)]
    out = {}
    for prefix in blocks:
        for sub in ("attn", "ffn"):
            out.update({names.keys(f"{prefix}hc_{sub}_{k}")[0]: v for k, v in site.items()})
    for prefix in ["", *blocks[cfg.num_layers:]]:
        out.update({names.keys(f"{prefix}hc_head_{k}")[0]: v for k, v in head.items()})
    return out


def _merge(out: dict[str, Any], part: dict[str, Any], owner: dict[str, str], name: str, path: str = "") -> None:
    """Add a layer's config.json keys to ``out``; a key two menu entries set differently is refused
    (``owner``: the entry that set each key; keys without one hold defaults)."""
    for key, value in part.items():
        where = path + key
        if isinstance(value, dict):
            _merge(out.setdefault(key, {}), value, owner, name, f"{where}.")
            continue
        require(where not in owner or out[key] == value,
                f"model.attention.menu.{name} and model.attention.menu.{owner.get(where)} disagree on transformers' "
                f"'{where}' ({value!r} vs {out.get(key)!r}): a DeepSeek-V4 config.json has one value for every layer")
        out[key] = value
        owner.setdefault(where, name)


def _attention_keys(cfg: ModelConfig) -> dict[str, Any]:
    """The attention keys of config.json, merged over every layer's entry, on top of every type's defaults
    (transformers reads some keys of types no layer uses, e.g. every compression rate)."""
    out: dict[str, Any] = {}
    for cls in registered().values():
        if cls.hf_layer_type is not None:
            _merge(out, cls().to_hf(f"the default {cls.__name__}"), {}, "")
    owner: dict[str, str] = {}
    for i, spec in enumerate(layer_specs(cfg)):
        name = cfg.attention_type(i)
        require(spec.hf_layer_type is not None, f"model.attention.menu.{name}: kind '{spec.kind}' has no "
                                                "transformers DeepSeek-V4 layer type")
        _merge(out, spec.to_hf(f"model.attention.menu.{name}"), owner, name)
    out["layer_types"] = [spec.hf_layer_type for spec in layer_specs(cfg)[:cfg.num_layers]]
    return out


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of the transformers checkpoint of ``cfg`` (weights stored as ``dtype``)."""
    check_exportable(cfg)
    m = cfg.moe
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "dtype": dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_nextn_predict_layers": cfg.mtp_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **_attention_keys(cfg),
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps if cfg.hc_mult > 1 else 0.0,  # 0: the plain residual's mHC adds nothing
        "n_routed_experts": m.num_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": m.top_k,
        "moe_intermediate_size": m.intermediate_size,
        "scoring_func": m.score_func,
        "norm_topk_prob": True,
        "routed_scaling_factor": m.routed_scaling_factor,
        "swiglu_limit": m.swiglu_limit,
        "mlp_layer_types": [HASH_MOE if i < m.num_hash_layers else MOE for i in range(cfg.num_layers)],
    }


class _Reader(ConfigReader, HFReader):
    """config.json as the V4 attention types read it (``AttentionSpec.from_hf``): parsed RoPE and rates."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        super().__init__(hf, source)
        self.rope = _rope(self)
        self.rates = dict(self.get("compress_rates", {}))


def _rope(r: _Reader) -> dict[str, Any]:
    """rope_head_dim, rope_theta, compress_rope_theta and YaRN fields, from any layout transformers accepts."""
    params = r.get("rope_parameters", None) or r.get("rope_scaling", None) or {}
    nested = isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict)
    main = params["main"] if nested else {}
    # Flat layouts hold the compress-rope settings; transformers then defaults attention_factor to 1.
    compress = params["compress"] if nested else {"attention_factor": 1.0, **params}
    head_dim = r.get("head_dim")
    if "qk_rope_head_dim" in r.hf:
        rope_head_dim = r.get("qk_rope_head_dim")
    else:
        partial = r.get("partial_rotary_factor", main.get("partial_rotary_factor", 64 / 512))
        rope_head_dim = int(head_dim * partial)
    if nested:
        theta = main.get("rope_theta", r.get("rope_theta", 10000.0))
        compress_theta = compress.get("rope_theta", r.get("compress_rope_theta", 160000.0))
    else:  # as transformers: the flat dict's own rope_theta is the main one
        theta = r.get("rope_theta", params.get("rope_theta", 10000.0))
        compress_theta = r.get("compress_rope_theta", 160000.0)
    out: dict[str, Any] = {"rope_head_dim": rope_head_dim, "rope_theta": float(theta),
                           "compress_rope_theta": float(compress_theta)}
    kind = compress.get("rope_type", compress.get("type", "default"))
    require(kind in ("default", "yarn"), f"{r.source}: compress rope_type '{kind}' is not supported (default, yarn)")
    if kind == "yarn":
        require(compress.get("attention_factor") == 1.0,
                f"{r.source}: YaRN attention_factor={compress.get('attention_factor')!r} is not supported "
                "(V4 applies no YaRN scaling to cos/sin; set it to 1.0)")
        out.update(yarn_factor=float(compress["factor"]),
                   yarn_original_max_position=int(compress["original_max_position_embeddings"]),
                   yarn_beta_fast=float(compress.get("beta_fast") or 32),
                   yarn_beta_slow=float(compress.get("beta_slow") or 1))
    return out


def _layer_types(r: _Reader, num_layers: int) -> list[str]:
    """transformers' layer type of each decoder layer (the official layout gives compression ratios instead)."""
    if "layer_types" in r.hf:
        names = r.get("layer_types")
    else:
        by_ratio = {getattr(cls.from_hf(r), "ratio", 0): cls.hf_layer_type for cls in registered().values()
                    if cls.hf_layer_type is not None}  # 0: no compression
        ratios = r.get("compress_ratios")  # official layout: one per layer, plus one per MTP block
        require(all(x in by_ratio for x in ratios), f"{r.source}: compress_ratios {ratios} use a ratio other than "
                                                    f"{sorted(by_ratio)}")
        names = [by_ratio[x] for x in ratios]
    require(len(names) >= num_layers, f"{r.source}: layer_types has {len(names)} entries for {num_layers} layers")
    for name in names[:num_layers]:
        require(spec_for_hf(name) is not None, f"{r.source}: layer type '{name}' is not an attention type of moesaic")
    return names[:num_layers]


def _menu(r: _Reader, hf_types: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The attention menu (one entry per transformers layer type, named by its kind) and the layers' entries;
    MTP blocks (sliding window in transformers) use the sliding type's entry."""
    specs = {hf: spec_for_hf(hf).from_hf(r) for hf in dict.fromkeys([*hf_types, "sliding_attention"])}
    return {spec.kind: spec for spec in specs.values()}, [specs[hf].kind for hf in hf_types]


def _score_func(r: _Reader) -> str:
    score_func = r.get("scoring_func", "sqrtsoftplus")
    require(score_func in SCORE_FUNCS, f"{r.source}: scoring_func='{score_func}' is not supported "
                                       f"(transformers builds {' and '.join(SCORE_FUNCS)} routers)")
    return score_func


def _num_hash_layers(r: _Reader, num_layers: int) -> int:
    if "mlp_layer_types" not in r.hf:
        return min(num_layers, int(r.get("num_hash_layers", 3)))  # transformers' default is 3
    kinds = list(r.get("mlp_layer_types"))[:num_layers]
    n = next((i for i, k in enumerate(kinds) if k != HASH_MOE), len(kinds))
    require(all(k == MOE for k in kinds[n:]), f"{r.source}: mlp_layer_types {kinds} must be hash_moe layers "
                                              "followed by moe layers")
    return n


def from_hf_config(hf: dict[str, Any], mtp_layers: int, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a transformers DeepSeek-V4 checkpoint with ``mtp_layers`` MTP blocks present.

    (transformers writes ``num_nextn_predict_layers`` but never saves MTP weights, so the count of
    MTP blocks actually in the checkpoint is what the caller passes.)
    """
    r = _Reader(hf, source)
    r.expect("model_type", "deepseek_v4", "deepseek_v4", "not a DeepSeek-V4 checkpoint")
    require("quantization_config" not in hf, f"{source}: quantized (FP8/FP4) checkpoints are not supported; "
                                             "dequantize to bf16/fp32 first")
    r.expect("num_key_value_heads", 1, 1, "V4 has one shared K=V head")
    r.expect("hidden_act", "silu", "silu", "V4 experts use SwiGLU")
    r.expect("attention_bias", False, False, "V4 projections have no bias")
    r.expect("mlp_bias", False, False, "V4 projections have no bias")
    r.expect("n_shared_experts", 1, 1, "V4 has exactly one shared expert")
    r.expect("tie_word_embeddings", False, False, "V4 has an untied head")
    r.expect("norm_topk_prob", True, True, "transformers always normalises the top-k gates")
    hc_mult = int(r.get("hc_mult", 4))
    require(hc_mult > 1, f"{source}: hc_mult={hc_mult} is a one-stream mHC, which moesaic does not build "
                         "(its hc_mult=1 is a plain residual)")
    num_layers = int(r.get("num_hidden_layers"))
    menu, layer_types = _menu(r, _layer_types(r, num_layers))
    moe = MoEConfig(
        num_experts=int(r.get("n_routed_experts")), top_k=int(r.get("num_experts_per_tok")),
        intermediate_size=int(r.get("moe_intermediate_size")), num_shared_experts=1,
        score_func=_score_func(r), norm_topk_prob=True,
        routed_scaling_factor=float(r.get("routed_scaling_factor")), swiglu_limit=float(r.get("swiglu_limit", 0.0)),
        num_hash_layers=_num_hash_layers(r, num_layers))
    return ModelConfig(
        vocab_size=int(r.get("vocab_size")), hidden_size=int(r.get("hidden_size")), num_layers=num_layers,
        layer_types=layer_types, ffn_types=[], rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        tie_embeddings=False, hc_mult=hc_mult, hc_sinkhorn_iters=int(r.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(r.get("hc_eps", 1e-6)), mtp_layers=mtp_layers,
        attention=AttentionConfig(menu=menu), moe=moe)


class DeepSeekV4(Family):
    """transformers' ``DeepseekV4ForCausalLM``: mHC, SWA/CSA/HCA attention, hash + routed MoE, MTP blocks."""

    name = "DeepSeek-V4"
    model_types = ("deepseek_v4",)

    def claims(self, cfg: ModelConfig) -> bool:
        return True  # the fallback: check_exportable names what stops a config that fits no family

    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        return from_hf_config(hf, count_mtp_blocks(tensor_names), source)

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        return to_hf_config(cfg, dtype)

    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> DeepSeekV4Names:
        return DeepSeekV4Names(cfg)

    def constant_tensors(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return plain_residual_tensors(cfg)
