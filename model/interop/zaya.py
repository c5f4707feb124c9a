"""The ZAYA1 family: transformers' ``ZayaForCausalLM`` <-> moesaic (MOSAIC_SPEC §3).

Attention: one ``cca`` entry per transformers layer type, "hybrid" (global) and "hybrid_sliding"
(``sliding_window``), each with its RoPE theta and partial rotary factor; ``doc_reset: false``, since
transformers leaks the previous packed document into the convolution (set it true to train on packed
data). Blocks: every FFN is a top-1 MoE with ZAYA's MLP router (``model.moe.router: mlp``, its state
carried from layer to layer, a skip expert) and SwiGLU experts, no shared expert; residual scaling
and an fp32 residual stream (``model.residual_scale``, ``model.fp32_residual``); tied head.

Tensor names map one to one (the attention's from ``CCASpec.hf_names``); routed experts are fused on
disk, as ``save_pretrained`` writes them.
"""

from __future__ import annotations

from typing import Any

from moesaic.configs import AttentionConfig, ModelConfig, MoEConfig
from moesaic.model.attention import layer_specs
from moesaic.model.attention.cca import CCASpec

from .family import ConfigReader, Family, require, require_values, shared_entry
from .qwen3_moe import rope_theta
from .tensor_map import ExpertLayout, NamePlan, TableNames

CCA, GLOBAL, SLIDING = "cca", "hybrid", "hybrid_sliding"
ENTRY = {GLOBAL: "cca", SLIDING: "cca_sliding"}
DEFAULT_ROPE = {GLOBAL: {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
                SLIDING: {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}
_RESIDUAL = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")


class ZayaNames(TableNames):
    family = "ZAYA1"
    experts = ExpertLayout(("gate_proj.weight", "up_proj.weight", "down_proj.weight"), write_fused=True)
    top = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "head.weight": "lm_head.weight",
           "input_hidden_states_scale": "input_hidden_states_scale",
           "input_hidden_states_bias": "input_hidden_states_bias"}
    block = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             **{f"attn.{ours}": f"self_attn.{theirs}" for ours, theirs in CCASpec.hf_names.items()},
             **{f"{scale}.{p}": f"{scale}.{p}" for scale in ("post_attention_residual_scale",
                                                             "post_mlp_residual_scale") for p in _RESIDUAL},
             **{f"ffn.gate.{p}": f"mlp.gate.{p}" for p in (
                 "down_proj.weight", "down_proj.bias", "router_states_scale", "balancing_biases")},
             "ffn.gate.out_proj.weight": "mlp.gate.router_mlp.out_proj.weight",
             **{f"ffn.gate.{p}": f"mlp.gate.router_mlp.{p}" for p in (
                 "norm.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")},
             "ffn.experts.w1": "mlp.experts.gate_up_proj", "ffn.experts.w3": "mlp.experts.gate_up_proj",
             "ffn.experts.w2": "mlp.experts.down_proj"}


def _entry(r: ConfigReader, layer_type: str, rope: dict[str, Any]) -> dict[str, Any]:
    params = rope.get(layer_type, DEFAULT_ROPE[layer_type])
    heads, kv, hd = int(r.get("num_attention_heads")), int(r.get("num_key_value_heads")), int(r.get("head_dim"))
    return {"kind": CCA, "num_heads": heads, "num_kv_heads": kv, "head_dim": hd,
            "window": int(r.get("sliding_window")) if layer_type == SLIDING else 0,
            "conv_kernel": int(r.get("cca_time0", 2)), "mix_kernel": int(r.get("cca_time1", 2)),
            "rope_theta": rope_theta(r, params), "rope_fraction": float(params.get("partial_rotary_factor", 1.0)),
            "doc_reset": False}


def _from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    r = ConfigReader(hf, source)
    r.expect("attention_bias", False, False, "moesaic's cca projections have no bias")
    r.expect("lm_head_bias", False, False, "moesaic's head has no bias")
    r.expect("hidden_act", "silu", "silu", "moesaic's experts are SwiGLU")
    r.expect("num_experts_per_tok", 1, 1, "ZAYA1 routes each token to one expert")
    num_layers = int(r.get("num_hidden_layers"))
    types = list(r.get("layer_types", [GLOBAL] * num_layers))
    unknown = next((t for t in types if t not in ENTRY), None)
    require(unknown is None, f"{source}: layer type '{unknown}' is not a ZAYA1 layer type ({', '.join(ENTRY)})")
    rope = r.get("rope_parameters", {}) or {}
    menu = {ENTRY[t]: _entry(r, t, rope) for t in dict.fromkeys(types)}
    moe = MoEConfig(num_experts=int(r.get("num_experts")), top_k=1,
                    intermediate_size=int(r.get("moe_intermediate_size")), num_shared_experts=0, score_func="softmax",
                    norm_topk_prob=False, routed_scaling_factor=1.0, swiglu_limit=0.0, bias_update_rate=0.0,
                    router="mlp", router_hidden_size=int(r.get("router_hidden_size")))
    return ModelConfig(vocab_size=int(r.get("vocab_size")), hidden_size=int(r.get("hidden_size")),
                       num_layers=num_layers, layer_types=[ENTRY[t] for t in types], ffn_types=["moe"] * num_layers,
                       rms_norm_eps=float(r.get("rms_norm_eps", 1e-5)),
                       tie_embeddings=bool(r.get("tie_word_embeddings", True)), hc_mult=1, mtp_layers=0,
                       residual_scale=True, fp32_residual=True, attention=AttentionConfig(menu=menu), moe=moe)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what ZayaForCausalLM cannot reproduce, naming the field."""
    require_values(cfg, "model", "ZAYA1", [
        ("hc_mult", 1), ("mtp_layers", 0), ("embed_scale", False), ("sandwich_norm", False), ("layer_scalar", False),
        ("ple_dim", 0), ("final_logit_softcap", 0.0), ("ffn_activation", "silu"), ("residual_scale", True),
        ("fp32_residual", True)])
    for i, spec in enumerate(layer_specs(cfg)):
        require(spec.kind == CCA, f"model.attention.menu.{cfg.attention_type(i)}.kind='{spec.kind}' (layer {i}): "
                                  "ZAYA1 layers are all cca")
        require(cfg.ffn_type(i) == "moe", f"model.ffn_types[{i}]='{cfg.ffn_type(i)}': ZAYA1 layers are all moe")
    require_values(cfg.moe, "model.moe", "ZAYA1", [
        ("router", "mlp"), ("top_k", 1), ("score_func", "softmax"), ("norm_topk_prob", False),
        ("num_shared_experts", 0), ("routed_scaling_factor", 1.0), ("swiglu_limit", 0.0),
        ("n_group", 1), ("router_logit_softcap", 0.0)])


def _groups(cfg: ModelConfig) -> dict[str, list[int]]:
    """Layers per transformers layer type: global (window 0) and sliding."""
    specs = layer_specs(cfg)
    return {t: [i for i in range(cfg.num_layers) if (specs[i].window > 0) == (t == SLIDING)] for t in ENTRY}


class Zaya(Family):
    name = "ZAYA1"
    model_types = ("zaya",)

    def claims(self, cfg: ModelConfig) -> bool:
        return any(spec.kind == CCA for spec in layer_specs(cfg))

    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        return _from_hf(hf, source)

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        check_exportable(cfg)
        groups = _groups(cfg)
        _, spec = shared_entry(cfg, "ZAYA1", range(cfg.num_layers), varying=("rope_theta", "rope_fraction", "window"))
        entries = {t: shared_entry(cfg, "ZAYA1", layers) for t, layers in groups.items() if layers}
        assert isinstance(spec, CCASpec)
        rope = {t: {"rope_type": "default", "rope_theta": s.rope_theta, "partial_rotary_factor": s.rope_fraction}
                for t, (_, s) in entries.items()}
        return {
            "architectures": ["ZayaForCausalLM"], "model_type": "zaya", "dtype": dtype,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "cca_time0": spec.conv_kernel, "cca_time1": spec.mix_kernel,
            "layer_types": [SLIDING if i in groups[SLIDING] else GLOBAL for i in range(cfg.num_layers)],
            "sliding_window": entries[SLIDING][1].window if SLIDING in entries else None,
            "rope_parameters": {**DEFAULT_ROPE, **rope},
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "lm_head_bias": False, "num_experts": cfg.moe.num_experts,
            "num_experts_per_tok": 1, "moe_intermediate_size": cfg.moe.intermediate_size,
            "router_hidden_size": cfg.moe.router_hidden_size,
        }

    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> NamePlan:
        return ZayaNames(cfg.tie_embeddings)
