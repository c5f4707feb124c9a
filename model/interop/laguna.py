"""The Laguna family: transformers' ``LagunaForCausalLM`` (Poolside XS.2) <-> moesaic (MOSAIC_SPEC §2).

Attention: gqa entries with Laguna's softplus output gate (``gating``: True / "per-head" -> "head",
"per-element" -> "element"; transformers reads False as per-element too), weighted q/k norms, partial
half-split RoPE and, per transformers layer type ("full_attention" / "sliding_attention"), its own
``rope_parameters`` (default or YaRN, whose attention factor scales the rotated channels) and window.
Every layer has its own query-head count (``num_attention_heads_per_layer``) over one KV shape: one
menu entry per (layer type, head count), named "full"/"sliding" when a type has one count and
"full_h48"-style otherwise. Blocks are Llama's pre-norm; ``mlp_layer_types`` picks a dense SwiGLU
(layer 0 by default) or the sigmoid MoE: soft-capped logits, selection-only bias
(``e_score_correction_bias`` = ``expert_bias``), renormalised gates times ``moe_routed_scaling_factor``
and one shared expert of ``shared_expert_intermediate_size``. transformers' aux loss (a softmax Switch
loss over the sigmoid router's logits, §2.5) is not Laguna's recipe and has no counterpart here.

On disk (``save_pretrained``, released checkpoints) the experts are one matrix per expert, the bias is
``mlp.experts.e_score_correction_bias`` and the shared expert ``mlp.shared_expert.``; transformers'
module names (``mlp.gate.e_score_correction_bias``, ``mlp.shared_experts.``, fused experts) are read too.
"""

from __future__ import annotations

import math
from typing import Any

from moesaic.configs import AttentionConfig, ModelConfig, MoEConfig
from moesaic.model.attention import layer_specs

from .family import ConfigReader, Family, require, require_values, shared_entry
from .qwen3_moe import Qwen3MoeNames
from .tensor_map import NamePlan, split_scope

GQA, SLIDING, FULL = "gqa", "sliding_attention", "full_attention"
ENTRY = {SLIDING: "sliding", FULL: "full"}
GATING = {True: "head", "per-head": "head", "per-element": "element", False: "element"}
DEFAULT_ROPE = {FULL: {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
                SLIDING: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}
_SHARED = {f"ffn.shared_experts.{ours}.weight": f"{theirs}.weight"
           for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))}


class LagunaNames(Qwen3MoeNames):
    """Qwen3-MoE's names, the gate, the selection bias and the shared expert added (as written on disk)."""

    family = "Laguna"
    block = {**Qwen3MoeNames.block, "attn.g_proj.weight": "self_attn.g_proj.weight",
             "ffn.gate.expert_bias": "mlp.experts.e_score_correction_bias",
             **{k: f"mlp.shared_expert.{v}" for k, v in _SHARED.items()}}
    # transformers' module names, which conversion_mapping renames on load: read, never written
    module_names = {"ffn.gate.expert_bias": "mlp.gate.e_score_correction_bias",
                    **{k: f"mlp.shared_experts.{v}" for k, v in _SHARED.items()}}

    def keys(self, native: str) -> list[str]:
        kind, i, rest = split_scope(native)
        theirs = self.module_names.get(rest) if kind == "layers" else None
        return super().keys(native) + ([p + f"layers.{i}.{theirs}" for p in self.prefixes] if theirs else [])


def _yarn(r: ConfigReader, params: dict[str, Any], where: str) -> dict[str, Any]:
    """gqa YaRN fields of a YaRN rope_parameters entry (attention factor as transformers derives it)."""
    require("original_max_position_embeddings" in params, f"{where}.original_max_position_embeddings is missing")
    original = int(params["original_max_position_embeddings"])
    factor = float(params.get("factor") or r.get("max_position_embeddings") / original)
    attention = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if attention is None:
        def get_mscale(m: float) -> float:
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
        attention = get_mscale(mscale) / get_mscale(mscale_all) if mscale and mscale_all else get_mscale(1.0)
    return {"yarn_factor": factor, "yarn_original_max_position": original,
            "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(params.get("beta_slow") or 1.0), "yarn_attention_factor": float(attention)}


def _rope(r: ConfigReader, layer_type: str) -> dict[str, Any]:
    rope = r.get("rope_parameters", DEFAULT_ROPE)
    require(isinstance(rope, dict) and "rope_type" not in rope,
            f"{r.source}: rope_parameters must hold one entry per layer type ({FULL}, {SLIDING})")
    # transformers reads YaRN's truncate from the top level only (MOSAIC_SPEC §0.1); moesaic's YaRN truncates
    require(rope.get("truncate", True) is True, f"{r.source}: rope_parameters.truncate=false is not supported")
    params = dict(rope.get(layer_type) or DEFAULT_ROPE[layer_type])
    where = f"{r.source}: rope_parameters.{layer_type}"
    kind = params.get("rope_type", "default")
    require(kind in ("default", "yarn"), f"{where}.rope_type='{kind}' is not supported (default, yarn)")
    out = {"rope_theta": float(params.get("rope_theta", DEFAULT_ROPE[layer_type]["rope_theta"])),
           "rope_fraction": float(params.get("partial_rotary_factor", 1.0)), "rope_type": "default"}
    return {**out, **_yarn(r, params, where)} if kind == "yarn" else out


def _attention(r: ConfigReader, num_layers: int) -> tuple[dict[str, Any], list[str]]:
    types = list(r.get("layer_types", [FULL] * num_layers))
    heads = list(r.get("num_attention_heads_per_layer", [int(r.get("num_attention_heads", 48))] * num_layers))
    kv = int(r.get("num_key_value_heads", 8))
    for name, values in (("layer_types", types), ("num_attention_heads_per_layer", heads)):
        require(len(values) == num_layers, f"{r.source}: {name} has {len(values)} entries for {num_layers} layers")
    gating = r.get("gating", True)
    require(gating in GATING, f"{r.source}: gating={gating!r} is not supported (true, per-head, per-element)")
    base = {"kind": GQA, "num_kv_heads": kv, "head_dim": int(r.get("head_dim", 128)), "qk_norm": True,
            "gate": GATING[gating]}
    menu: dict[str, Any] = {}
    names = []
    for t, h in zip(types, heads):
        require(t in ENTRY, f"{r.source}: layer type '{t}' is not supported ({SLIDING}, {FULL})")
        require(h % kv == 0, f"{r.source}: num_attention_heads_per_layer entry {h} is not a multiple of "
                             f"num_key_value_heads={kv}")
        counts = {hh for tt, hh in zip(types, heads) if tt == t}
        name = ENTRY[t] if len(counts) == 1 else f"{ENTRY[t]}_h{h}"
        window = int(r.get("sliding_window", 512)) if t == SLIDING else 0
        menu.setdefault(name, {**base, "num_heads": h, "window": window, **_rope(r, t)})
        names.append(name)
    return menu, names


def _from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    r = ConfigReader(hf, source)
    r.expect("attention_bias", False, False, "moesaic's gqa projections have no bias")
    r.expect("hidden_act", "silu", "silu", "moesaic's experts and dense layers are SwiGLU")
    r.expect("moe_apply_router_weight_on_input", False, False, "transformers' Laguna does not implement it either")
    num_layers = int(r.get("num_hidden_layers"))
    menu, layer_types = _attention(r, num_layers)
    mlp = list(r.get("mlp_layer_types", ["dense"] + ["sparse"] * (num_layers - 1)))
    require(len(mlp) == num_layers and set(mlp) <= {"dense", "sparse"},
            f"{source}: mlp_layer_types={mlp} must hold {num_layers} entries of dense or sparse")
    moe = MoEConfig(num_experts=int(r.get("num_experts", 256)), top_k=int(r.get("num_experts_per_tok", 8)),
                    intermediate_size=int(r.get("moe_intermediate_size", 512)), num_shared_experts=1,
                    shared_intermediate_size=int(r.get("shared_expert_intermediate_size", 512)),
                    score_func="sigmoid", norm_topk_prob=True,
                    routed_scaling_factor=float(r.get("moe_routed_scaling_factor", 1.0)), swiglu_limit=0.0,
                    router_logit_softcap=float(r.get("moe_router_logit_softcapping", 0.0)))
    return ModelConfig(vocab_size=int(r.get("vocab_size")), hidden_size=int(r.get("hidden_size")),
                       num_layers=num_layers, layer_types=layer_types,
                       ffn_types=["moe" if t == "sparse" else "dense" for t in mlp],
                       dense_intermediate_size=int(r.get("intermediate_size")),
                       rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
                       tie_embeddings=bool(r.get("tie_word_embeddings", False)), hc_mult=1, mtp_layers=0,
                       attention=AttentionConfig(menu=menu), moe=moe)


def _check_model(cfg: ModelConfig) -> None:
    """The block-level fields LagunaForCausalLM fixes."""
    require(cfg.hc_mult == 1, f"model.hc_mult={cfg.hc_mult}: Laguna has a plain residual (hc_mult=1)")
    require_values(cfg, "model", "Laguna", [
        ("mtp_layers", 0), ("embed_scale", False), ("sandwich_norm", False), ("layer_scalar", False), ("ple_dim", 0),
        ("final_logit_softcap", 0.0), ("ffn_activation", "silu")])
    for i in range(cfg.num_layers):
        require(cfg.ffn_type(i) in ("dense", "moe"), f"model.ffn_types[{i}]='{cfg.ffn_type(i)}': Laguna layers are "
                                                     "dense or moe")
        require(cfg.ffn_type(i) == "moe" or cfg.dense_width(i) == cfg.dense_intermediate_size,
                f"model.dense_intermediate_sizes[{i}]={cfg.dense_width(i)}: Laguna's dense layers all have "
                f"intermediate_size ({cfg.dense_intermediate_size})")
    m = cfg.moe
    require_values(m, "model.moe", "Laguna", [
        ("score_func", "sigmoid"), ("norm_topk_prob", True), ("swiglu_limit", 0.0), ("num_hash_layers", 0),
        ("router_input_norm", False), ("per_expert_scale", False), ("router", "linear"), ("n_group", 1)])
    require(m.num_shared_experts >= 1, f"model.moe.num_shared_experts={m.num_shared_experts}: Laguna's MoE layers "
                                       "have a shared expert")


def _attention_keys(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's attention keys: per layer type one gqa setting but for num_heads, the heads per layer."""
    specs = layer_specs(cfg)[:cfg.num_layers]
    for i, spec in enumerate(specs):
        where = f"model.attention.menu.{cfg.attention_type(i)}"
        require(spec.kind == GQA, f"{where}.kind='{spec.kind}' (layer {i}): Laguna layers are gqa")
        require(spec.gate != "none", f"{where}.gate='none' (layer {i}): Laguna gates every layer (head or element)")
        require_values(spec, where, "Laguna", [("qk_norm", True), ("v_norm", False), ("k_eq_v", False),
                                               ("rope_type", "default"), ("kv_source", -1)])
        require(spec.scale in (0.0, spec.head_dim ** -0.5),
                f"{where}.scale={spec.scale}: Laguna scales by head_dim^-0.5 (0)")
        for field in ("num_kv_heads", "head_dim", "gate"):
            require(getattr(spec, field) == getattr(specs[0], field),
                    f"{where}.{field}={getattr(spec, field)!r} (layer {i}): Laguna has one {field} for every layer "
                    f"({getattr(specs[0], field)!r} at layer 0)")
    types = [SLIDING if spec.window > 0 else FULL for spec in specs]
    rope: dict[str, Any] = {}
    for t in (FULL, SLIDING):
        layers = [i for i in range(cfg.num_layers) if types[i] == t]
        if layers:
            _, spec = shared_entry(cfg, "Laguna", layers, varying=("num_heads",))
            params = {"rope_type": "default", "rope_theta": spec.rope_theta,
                      "partial_rotary_factor": spec.rope_fraction}
            if spec.yarn_factor > 1.0:
                params.update(rope_type="yarn", factor=spec.yarn_factor, beta_fast=spec.yarn_beta_fast,
                              original_max_position_embeddings=spec.yarn_original_max_position,
                              beta_slow=spec.yarn_beta_slow, attention_factor=spec.rope_scaling())
            rope[t] = params
    sliding = [s.window for s in specs if s.window > 0]
    yarn = [s.yarn_factor * s.yarn_original_max_position for s in specs if s.yarn_factor > 1.0]
    return {"layer_types": types, "rope_parameters": rope, "num_attention_heads": specs[0].num_heads,
            "num_attention_heads_per_layer": [s.num_heads for s in specs], "num_key_value_heads": specs[0].num_kv_heads,
            "head_dim": specs[0].head_dim, "sliding_window": sliding[0] if sliding else 512,
            "gating": "per-head" if specs[0].gate == "head" else "per-element",
            "max_position_embeddings": int(max(yarn)) if yarn else 131072}


class Laguna(Family):
    name = "Laguna"
    model_types = ("laguna",)

    def claims(self, cfg: ModelConfig) -> bool:
        return any(getattr(spec, "gate", "none") != "none" for spec in layer_specs(cfg))

    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        return _from_hf(hf, source)

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        _check_model(cfg)
        m = cfg.moe
        return {
            "architectures": ["LagunaForCausalLM"], "model_type": "laguna", "dtype": dtype,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "intermediate_size": cfg.dense_intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            **_attention_keys(cfg),
            "mlp_layer_types": ["sparse" if cfg.ffn_type(i) == "moe" else "dense" for i in range(cfg.num_layers)],
            "num_experts": m.num_experts, "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.intermediate_size,
            "shared_expert_intermediate_size": m.shared_intermediate_size or m.intermediate_size * m.num_shared_experts,
            "moe_routed_scaling_factor": m.routed_scaling_factor,
            "moe_router_logit_softcapping": m.router_logit_softcap,
            "moe_apply_router_weight_on_input": False,
        }

    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> NamePlan:
        return LagunaNames(cfg.tie_embeddings)
