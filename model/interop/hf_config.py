"""transformers' DeepSeek-V4 ``config.json`` <-> moesaic ``ModelConfig``.

Export writes the modern layout transformers' own ``save_pretrained`` writes (explicit
``layer_types``/``mlp_layer_types``/``compress_rates`` and nested ``rope_parameters``; never the
off-by-one default layout, §4.1). Import also reads the legacy keys transformers folds in
(``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, flat or ``rope_scaling`` YaRN).

What one side can express and the other cannot is refused with a ConfigError naming the field:
transformers always builds mHC (its hc_mult = 1 is a one-stream mHC, moesaic's is a plain
residual), an MoE FFN in every layer with exactly one shared expert of ``moe_intermediate_size``,
normalised top-k gates, untied embeddings (V4), no YaRN attention scaling, and no FP8 weights.
"""

from __future__ import annotations

from typing import Any

from moesaic.configs import AttentionConfig, ConfigError, ModelConfig, MoEConfig

HF_LAYER_TYPES = {"swa": "sliding_attention", "csa": "compressed_sparse_attention",
                  "hca": "heavily_compressed_attention"}
_LAYER_TYPES = {hf: ours for ours, hf in HF_LAYER_TYPES.items()}
HASH_MOE, MOE = "hash_moe", "moe"
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid")  # transformers 5.14 has no "softmax" router activation


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse models transformers' DeepseekV4ForCausalLM cannot reproduce exactly."""
    m = cfg.moe
    _require(cfg.hc_mult > 1, f"model.hc_mult={cfg.hc_mult}: DeepSeek-V4 checkpoints always use mHC; "
                              "moesaic's hc_mult=1 (plain residual) has no equivalent")
    dense = [i for i in range(cfg.num_layers) if cfg.ffn_type(i) != "moe"]
    _require(not dense, f"model.ffn_types[{dense[0] if dense else 0}]='dense': DeepSeek-V4 has an MoE FFN in every layer")
    _require(m.num_shared_experts == 1, f"model.moe.num_shared_experts={m.num_shared_experts}: "
                                        "DeepSeek-V4 has exactly one shared expert")
    _require(m.norm_topk_prob, "model.moe.norm_topk_prob=false: DeepSeek-V4 always normalises the top-k gates")
    _require(m.score_func in SCORE_FUNCS, f"model.moe.score_func='{m.score_func}': transformers' DeepSeek-V4 "
                                          f"builds only {' and '.join(SCORE_FUNCS)} routers")
    _require(not cfg.tie_embeddings, "model.tie_embeddings=true: DeepSeek-V4 checkpoints have an untied head")
    a = cfg.attention
    _require(int(a.head_dim * (a.rope_head_dim / a.head_dim)) == a.rope_head_dim,
             f"model.attention.rope_head_dim={a.rope_head_dim} is not representable as a partial_rotary_factor "
             f"of head_dim={a.head_dim}")


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of the transformers checkpoint of ``cfg`` (weights stored as ``dtype``)."""
    check_exportable(cfg)
    a, m = cfg.attention, cfg.moe
    partial = a.rope_head_dim / a.head_dim
    compress: dict[str, Any] = {"rope_type": "default"}
    if a.yarn_factor > 1.0:
        compress = {"rope_type": "yarn", "factor": a.yarn_factor,
                    "original_max_position_embeddings": a.yarn_original_max_position,
                    "beta_fast": a.yarn_beta_fast, "beta_slow": a.yarn_beta_slow, "attention_factor": 1.0}
    compress.update(rope_theta=a.compress_rope_theta, partial_rotary_factor=partial)
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
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": 1,
        "head_dim": a.head_dim,
        "qk_rope_head_dim": a.rope_head_dim,
        "partial_rotary_factor": partial,
        "q_lora_rank": a.q_lora_rank,
        "o_groups": a.o_groups,
        "o_lora_rank": a.o_lora_rank,
        "sliding_window": a.window,
        "rope_theta": a.rope_theta,
        "compress_rope_theta": a.compress_rope_theta,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": a.rope_theta,
                                     "partial_rotary_factor": partial},
                            "compress": compress},
        "max_position_embeddings": int(a.yarn_factor * a.yarn_original_max_position),
        "layer_types": [HF_LAYER_TYPES[cfg.attention_type(i)] for i in range(cfg.num_layers)],
        "compress_rates": {HF_LAYER_TYPES["csa"]: a.csa_ratio, HF_LAYER_TYPES["hca"]: a.hca_ratio},
        "index_n_heads": a.index_heads,
        "index_head_dim": a.index_head_dim,
        "index_topk": a.index_topk,
        "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps,
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


class _Reader:
    """Typed access to config.json keys; every problem names the key and the file."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        _require(default is not ..., f"{self.source}: '{key}' is missing")
        return default

    def expect(self, key: str, allowed: Any, default: Any, why: str) -> None:
        value = self.get(key, default)
        _require(value == allowed, f"{self.source}: {key}={value!r} is not supported ({why})")


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
    _require(kind in ("default", "yarn"), f"{r.source}: compress rope_type '{kind}' is not supported (default, yarn)")
    if kind == "yarn":
        _require(compress.get("attention_factor") == 1.0,
                 f"{r.source}: YaRN attention_factor={compress.get('attention_factor')!r} is not supported "
                 "(V4 applies no YaRN scaling to cos/sin; set it to 1.0)")
        out.update(yarn_factor=float(compress["factor"]),
                   yarn_original_max_position=int(compress["original_max_position_embeddings"]),
                   yarn_beta_fast=float(compress.get("beta_fast") or 32), yarn_beta_slow=float(compress.get("beta_slow") or 1))
    return out


def _layer_types(r: _Reader, num_layers: int, rates: dict[str, int]) -> list[str]:
    if "layer_types" in r.hf:
        names = r.get("layer_types")
    else:
        by_ratio = {0: HF_LAYER_TYPES["swa"], rates[HF_LAYER_TYPES["csa"]]: HF_LAYER_TYPES["csa"],
                    rates[HF_LAYER_TYPES["hca"]]: HF_LAYER_TYPES["hca"]}
        ratios = r.get("compress_ratios")  # official layout: one per layer, plus one per MTP block
        _require(all(x in by_ratio for x in ratios), f"{r.source}: compress_ratios {ratios} use a ratio other than "
                                                     f"0, {sorted(by_ratio)[1:]}")
        names = [by_ratio[x] for x in ratios]
    _require(len(names) >= num_layers, f"{r.source}: layer_types has {len(names)} entries for {num_layers} layers")
    _require(all(t in _LAYER_TYPES for t in names), f"{r.source}: layer_types {names} must be among {list(_LAYER_TYPES)}")
    return [_LAYER_TYPES[t] for t in names[:num_layers]]


def _score_func(r: _Reader) -> str:
    score_func = r.get("scoring_func", "sqrtsoftplus")
    _require(score_func in SCORE_FUNCS, f"{r.source}: scoring_func='{score_func}' is not supported "
                                        f"(transformers builds {' and '.join(SCORE_FUNCS)} routers)")
    return score_func


def _num_hash_layers(r: _Reader, num_layers: int) -> int:
    if "mlp_layer_types" not in r.hf:
        return min(num_layers, int(r.get("num_hash_layers", 3)))  # transformers' default is 3
    kinds = list(r.get("mlp_layer_types"))[:num_layers]
    n = next((i for i, k in enumerate(kinds) if k != HASH_MOE), len(kinds))
    _require(all(k == MOE for k in kinds[n:]), f"{r.source}: mlp_layer_types {kinds} must be hash_moe layers "
                                               "followed by moe layers")
    return n


def from_hf_config(hf: dict[str, Any], mtp_layers: int, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a transformers DeepSeek-V4 checkpoint with ``mtp_layers`` MTP blocks present.

    (transformers writes ``num_nextn_predict_layers`` but never saves MTP weights, so the count of
    MTP blocks actually in the checkpoint is what the caller passes.)
    """
    r = _Reader(hf, source)
    r.expect("model_type", "deepseek_v4", "deepseek_v4", "not a DeepSeek-V4 checkpoint")
    _require("quantization_config" not in hf, f"{source}: quantized (FP8/FP4) checkpoints are not supported; "
                                              "dequantize to bf16/fp32 first")
    r.expect("num_key_value_heads", 1, 1, "V4 has one shared K=V head")
    r.expect("hidden_act", "silu", "silu", "V4 experts use SwiGLU")
    r.expect("attention_bias", False, False, "V4 projections have no bias")
    r.expect("mlp_bias", False, False, "V4 projections have no bias")
    r.expect("n_shared_experts", 1, 1, "V4 has exactly one shared expert")
    r.expect("tie_word_embeddings", False, False, "V4 has an untied head")
    r.expect("norm_topk_prob", True, True, "transformers always normalises the top-k gates")
    hc_mult = int(r.get("hc_mult", 4))
    _require(hc_mult > 1, f"{source}: hc_mult={hc_mult} is a one-stream mHC, which moesaic does not build "
                          "(its hc_mult=1 is a plain residual)")
    num_layers = int(r.get("num_hidden_layers"))
    rates = {HF_LAYER_TYPES["csa"]: 4, HF_LAYER_TYPES["hca"]: 128, **r.get("compress_rates", {})}
    rates[HF_LAYER_TYPES["csa"]] = int(r.get("compress_rate_csa", rates[HF_LAYER_TYPES["csa"]]))
    rates[HF_LAYER_TYPES["hca"]] = int(r.get("compress_rate_hca", rates[HF_LAYER_TYPES["hca"]]))
    attention = AttentionConfig(
        num_heads=int(r.get("num_attention_heads")), head_dim=int(r.get("head_dim")),
        q_lora_rank=int(r.get("q_lora_rank")), o_groups=int(r.get("o_groups")), o_lora_rank=int(r.get("o_lora_rank")),
        window=int(r.get("sliding_window")), csa_ratio=rates[HF_LAYER_TYPES["csa"]],
        hca_ratio=rates[HF_LAYER_TYPES["hca"]], index_heads=int(r.get("index_n_heads")),
        index_head_dim=int(r.get("index_head_dim")), index_topk=int(r.get("index_topk")), **_rope(r))
    moe = MoEConfig(
        num_experts=int(r.get("n_routed_experts")), top_k=int(r.get("num_experts_per_tok")),
        intermediate_size=int(r.get("moe_intermediate_size")), num_shared_experts=1,
        score_func=_score_func(r), norm_topk_prob=True,
        routed_scaling_factor=float(r.get("routed_scaling_factor")), swiglu_limit=float(r.get("swiglu_limit", 0.0)),
        num_hash_layers=_num_hash_layers(r, num_layers))
    return ModelConfig(
        vocab_size=int(r.get("vocab_size")), hidden_size=int(r.get("hidden_size")), num_layers=num_layers,
        layer_types=_layer_types(r, num_layers, rates), ffn_types=[], rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        tie_embeddings=False, hc_mult=hc_mult, hc_sinkhorn_iters=int(r.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(r.get("hc_eps", 1e-6)), mtp_layers=mtp_layers, attention=attention, moe=moe)


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide a model's weights and outputs, keyed by their config path.

    Fields a model does not use (e.g. CSA settings without CSA layers) are left out, so that two
    configs compare equal exactly when a checkpoint of one is a checkpoint of the other.
    """
    a, m, n = cfg.attention, cfg.moe, cfg.num_layers
    kinds = [cfg.attention_type(i) for i in range(n)]
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": n, "layer_types": kinds,
        "ffn_types": [cfg.ffn_type(i) for i in range(n)], "rms_norm_eps": cfg.rms_norm_eps,
        "tie_embeddings": cfg.tie_embeddings, "hc_mult": cfg.hc_mult, "mtp_layers": cfg.mtp_layers,
        "attention.num_heads": a.num_heads, "attention.head_dim": a.head_dim, "attention.rope_head_dim": a.rope_head_dim,
        "attention.q_lora_rank": a.q_lora_rank, "attention.o_groups": a.o_groups, "attention.o_lora_rank": a.o_lora_rank,
        "attention.window": a.window, "attention.rope_theta": a.rope_theta,
        "moe.num_experts": m.num_experts, "moe.top_k": m.top_k, "moe.intermediate_size": m.intermediate_size,
        "moe.num_shared_experts": m.num_shared_experts, "moe.score_func": m.score_func,
        "moe.norm_topk_prob": m.norm_topk_prob, "moe.routed_scaling_factor": m.routed_scaling_factor,
        "moe.swiglu_limit": m.swiglu_limit, "moe.num_hash_layers": m.num_hash_layers,
    }
    if cfg.hc_mult > 1:
        out.update({"hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps})
    if {"csa", "hca"} & set(kinds):
        out.update({"attention.compress_rope_theta": a.compress_rope_theta, "attention.yarn_factor": a.yarn_factor})
        if a.yarn_factor > 1.0:
            out.update({"attention.yarn_original_max_position": a.yarn_original_max_position,
                        "attention.yarn_beta_fast": a.yarn_beta_fast, "attention.yarn_beta_slow": a.yarn_beta_slow})
    if "csa" in kinds:
        out.update({"attention.csa_ratio": a.csa_ratio, "attention.index_heads": a.index_heads,
                    "attention.index_head_dim": a.index_head_dim, "attention.index_topk": a.index_topk})
    if "hca" in kinds:
        out["attention.hca_ratio"] = a.hca_ratio
    return out


def check_same_architecture(run: ModelConfig, checkpoint: ModelConfig, source: str) -> None:
    """ConfigError naming the first ``model.*`` field where the run config disagrees with the checkpoint's."""
    mine, theirs = architecture(run), architecture(checkpoint)
    for key in sorted(mine.keys() | theirs.keys()):
        ours, ckpt = mine.get(key, "(unused)"), theirs.get(key, "(unused)")
        _require(ours == ckpt, f"model.{key}={ours!r} disagrees with the checkpoint {source} ({ckpt!r}); "
                               f"set model.{key}={ckpt!r} or use another checkpoint")
