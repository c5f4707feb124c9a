"""The Qwen3-MoE family: transformers' ``Qwen3MoeForCausalLM`` <-> moesaic (MOSAIC_SPEC §5).

Every layer is one ``gqa`` entry: per-head weighted q/k RMSNorm before RoPE, half-split RoPE over the
whole head (transformers' default RoPE ignores ``partial_rotary_factor``), scale hd^-1/2, and with
``use_sliding_window`` one window for every layer. The FFN is a softmax top-k MoE without shared
experts or selection bias, its top-k gates renormalised iff ``norm_topk_prob`` (transformers' default
is false), or a dense SwiGLU of ``intermediate_size`` in ``mlp_only_layers`` and off the
``decoder_sparse_step`` grid. Residuals are plain (hc_mult 1), no MTP.

Tensor names map one to one; the routed experts are written one matrix per expert, as
``save_pretrained`` writes them, and read in that layout or fused (``tensor_map``).
"""

from __future__ import annotations

from typing import Any

from moesaic.configs import AttentionConfig, ModelConfig, MoEConfig
from moesaic.model.attention import layer_specs

from .family import ConfigReader, Family, require, require_values, shared_entry
from .tensor_map import GQA_NAMES, MLP_NAMES, ExpertLayout, NamePlan, TableNames

GQA = "gqa"


class Qwen3MoeNames(TableNames):
    family = "Qwen3-MoE"
    experts = ExpertLayout(("gate_proj.weight", "up_proj.weight", "down_proj.weight"), write_fused=False)
    top = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "head.weight": "lm_head.weight"}
    block = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             **GQA_NAMES, **MLP_NAMES, "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.expert_bias": None,
             "ffn.experts.w1": "mlp.experts.gate_up_proj", "ffn.experts.w3": "mlp.experts.gate_up_proj",
             "ffn.experts.w2": "mlp.experts.down_proj"}


def rope_theta(r: ConfigReader, params: dict[str, Any]) -> float:
    """theta of a default (unscaled) RoPE; YaRN, linear, dynamic, ... are refused naming their rope_type."""
    kind = params.get("rope_type", params.get("type", "default"))
    require(kind == "default", f"{r.source}: rope_type '{kind}' is not supported (only default RoPE)")
    return float(params.get("rope_theta", r.get("rope_theta", 10000.0)))


def _dense_layers(r: ConfigReader, num_layers: int) -> list[str]:
    only, step = list(r.get("mlp_only_layers", [])), int(r.get("decoder_sparse_step", 1))
    return ["dense" if i in only or (i + 1) % step else "moe" for i in range(num_layers)]


def _from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    r = ConfigReader(hf, source)
    r.expect("attention_bias", False, False, "moesaic's gqa projections have no bias")
    r.expect("hidden_act", "silu", "silu", "moesaic's experts and dense layers are SwiGLU")
    experts = int(r.get("num_experts", r.get("num_local_experts", 128)))  # 5.14 saves num_local_experts
    require(experts > 0, f"{source}: num_experts=0 (no MoE layer) is not supported")
    hidden, heads = int(r.get("hidden_size")), int(r.get("num_attention_heads"))
    num_layers = int(r.get("num_hidden_layers"))
    window = int(r.get("sliding_window")) if r.get("use_sliding_window", False) else 0
    gqa = {"kind": GQA, "num_heads": heads, "num_kv_heads": int(r.get("num_key_value_heads")),
           "head_dim": int(r.get("head_dim", hidden // heads)), "window": window, "qk_norm": True,
           "rope_theta": rope_theta(r, r.get("rope_parameters", None) or r.get("rope_scaling", {})),
           "rope_fraction": 1.0, "rope_type": "default"}
    moe = MoEConfig(num_experts=experts,
                    top_k=int(r.get("num_experts_per_tok")), intermediate_size=int(r.get("moe_intermediate_size")),
                    num_shared_experts=0, score_func="softmax", norm_topk_prob=bool(r.get("norm_topk_prob", False)),
                    routed_scaling_factor=1.0, swiglu_limit=0.0, bias_update_rate=0.0)
    return ModelConfig(vocab_size=int(r.get("vocab_size")), hidden_size=hidden, num_layers=num_layers,
                       layer_types=[GQA] * num_layers, ffn_types=_dense_layers(r, num_layers),
                       dense_intermediate_size=int(r.get("intermediate_size")),
                       rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(r.get("tie_word_embeddings", False)), hc_mult=1, mtp_layers=0,
                       attention=AttentionConfig(menu={GQA: gqa}), moe=moe)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what Qwen3MoeForCausalLM cannot reproduce, naming the field."""
    require(cfg.hc_mult == 1, f"model.hc_mult={cfg.hc_mult}: Qwen3-MoE has a plain residual (hc_mult=1)")
    require_values(cfg, "model", "Qwen3-MoE", [
        ("mtp_layers", 0), ("embed_scale", False), ("layer_scalar", False), ("ple_dim", 0),
        ("final_logit_softcap", 0.0), ("ffn_activation", "silu")])
    for i in range(cfg.num_layers):
        require(cfg.ffn_type(i) != "dense+moe",
                f"model.ffn_types[{i}]='dense+moe': Qwen3-MoE layers are dense or moe")
        require(cfg.ffn_type(i) == "moe" or cfg.dense_width(i) == cfg.dense_intermediate_size,
                f"model.dense_intermediate_sizes[{i}]={cfg.dense_width(i)}: Qwen3-MoE's dense layers all have "
                f"intermediate_size ({cfg.dense_intermediate_size})")
    for i, layer in enumerate(layer_specs(cfg)):
        require(layer.kind == GQA, f"model.attention.menu.{cfg.attention_type(i)}.kind='{layer.kind}' (layer {i}): "
                                   "Qwen3-MoE layers are all gqa")
    name, spec = shared_entry(cfg, "Qwen3-MoE", range(cfg.num_layers))
    where = f"model.attention.menu.{name}"
    require_values(spec, where, "Qwen3-MoE", [("qk_norm", True), ("v_norm", False), ("k_eq_v", False),
                                              ("rope_type", "default"), ("rope_fraction", 1.0), ("kv_source", -1),
                                              ("gate", "none"), ("yarn_factor", 1.0)])
    require(spec.scale in (0.0, spec.head_dim ** -0.5),
            f"{where}.scale={spec.scale}: Qwen3-MoE scales by head_dim^-0.5 (0)")
    require_values(cfg.moe, "model.moe", "Qwen3-MoE", [
        ("score_func", "softmax"), ("num_shared_experts", 0), ("routed_scaling_factor", 1.0), ("swiglu_limit", 0.0),
        ("num_hash_layers", 0), ("router_input_norm", False), ("per_expert_scale", False),
        ("router_logit_softcap", 0.0), ("n_group", 1), ("router", "linear")])


class Qwen3Moe(Family):
    name = "Qwen3-MoE"
    model_types = ("qwen3_moe",)

    def claims(self, cfg: ModelConfig) -> bool:
        return any(spec.kind == GQA for spec in layer_specs(cfg)) and not cfg.sandwich_norm

    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        return _from_hf(hf, source)

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        check_exportable(cfg)
        spec, m = layer_specs(cfg)[0], cfg.moe
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": dtype,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "intermediate_size": cfg.dense_intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
            "use_sliding_window": spec.window > 0, "sliding_window": spec.window or None,
            "num_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.intermediate_size,
            "norm_topk_prob": m.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.num_layers) if cfg.ffn_type(i) == "dense"],
        }

    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> NamePlan:
        return Qwen3MoeNames(cfg.tie_embeddings)
