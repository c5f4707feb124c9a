"""The Gemma 4 text family: transformers' ``Gemma4ForCausalLM`` <-> moesaic (MOSAIC_SPEC §1).

Attention: one ``gqa`` entry per transformers layer type, "sliding" (``head_dim``, ``sliding_window``,
default RoPE over the whole head) and "full" (``global_head_dim``, proportional RoPE; with
``attention_k_eq_v`` V is the raw K projection and ``num_global_key_value_heads`` heads), scale 1,
q/k norms and a weight-free v norm. The last ``num_kv_shared_layers`` layers reuse the K/V of the
last layer of their type before that tail (§1.4): entries "sliding_from_{j}" / "full_from_{j}" with
``kv_source`` j. Blocks: sandwich norms, ``layer_scalar``, per-layer embeddings, a GeGLU MLP (twice as
wide on shared layers with ``use_double_wide_mlp``) and with ``enable_moe_block`` a softmax MoE beside
it ("dense+moe", Gemma's router). Embeddings times sqrt(D), tied head, optional final softcap.

Reading accepts ``model.`` (Gemma4ForCausalLM) and ``model.language_model.`` (the multimodal
checkpoints, whose towers are dropped) and drops shared layers' K/V weights, which released
checkpoints may carry; writing writes what ``Gemma4ForCausalLM.save_pretrained`` writes.
"""

from __future__ import annotations

from typing import Any

from moesaic.configs import AttentionConfig, ModelConfig, MoEConfig
from moesaic.model.attention import layer_specs

from .family import ConfigReader, Family, require, require_values, shared_entry
from .tensor_map import GQA_NAMES, MLP_NAMES, ExpertLayout, TableNames, split_scope

GQA, SLIDING, FULL = "gqa", "sliding_attention", "full_attention"
ENTRY = {SLIDING: "sliding", FULL: "full"}
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}  # transformers' hidden_activation -> moesaic's
TEXT_PREFIX, MULTIMODAL_PREFIX = "model.", "model.language_model."
_SHARED_KV = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
              "self_attn.v_norm.weight")


class Gemma4Names(TableNames):
    family = "Gemma 4"
    experts = ExpertLayout(("gate_proj.weight", "up_proj.weight", "down_proj.weight"), write_fused=True)
    top = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "head.weight": "lm_head.weight",
           "ple.embed.weight": "embed_tokens_per_layer.weight", "ple.proj.weight": "per_layer_model_projection.weight",
           "ple.norm.weight": "per_layer_projection_norm.weight"}
    block = {"attn_norm.weight": "input_layernorm.weight", "post_attn_norm.weight": "post_attention_layernorm.weight",
             "ffn_norm.weight": "pre_feedforward_layernorm.weight",
             "post_ffn_norm.weight": "post_feedforward_layernorm.weight", "layer_scalar": "layer_scalar",
             **GQA_NAMES, **MLP_NAMES, **{k.replace("ffn.", "ffn.dense."): v for k, v in MLP_NAMES.items()},
             "ffn.post_dense_norm.weight": "post_feedforward_layernorm_1.weight",
             "ffn.moe_norm.weight": "pre_feedforward_layernorm_2.weight",
             "ffn.post_moe_norm.weight": "post_feedforward_layernorm_2.weight",
             "ffn.moe.gate.weight": "router.proj.weight", "ffn.moe.gate.scale": "router.scale",
             "ffn.moe.gate.per_expert_scale": "router.per_expert_scale", "ffn.moe.gate.expert_bias": None,
             "ffn.moe.experts.w1": "experts.gate_up_proj", "ffn.moe.experts.w3": "experts.gate_up_proj",
             "ffn.moe.experts.w2": "experts.down_proj",
             "ple.gate.weight": "per_layer_input_gate.weight", "ple.proj.weight": "per_layer_projection.weight",
             "ple.norm.weight": "post_per_layer_input_norm.weight"}

    def __init__(self, tied: bool, prefix: str, first_shared: int) -> None:
        super().__init__(tied, (prefix,))
        self.prefix, self.first_shared = prefix, first_shared

    def ignored(self, key: str) -> bool:
        """Shared layers' K/V weights (transformers ignores them too) and, in a multimodal checkpoint, the towers."""
        if self.prefix == MULTIMODAL_PREFIX and not key.startswith(self.prefix) and key != "lm_head.weight":
            return True
        kind, i, rest = split_scope(key.removeprefix(self.prefix))
        return kind == "layers" and i >= self.first_shared and rest in _SHARED_KV


def _text_config(hf: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """The text config (nested under text_config in the multimodal gemma4 config.json) and where it is."""
    if hf.get("model_type") != "gemma4":
        return hf, source
    require(isinstance(hf.get("text_config"), dict), f"{source}: 'text_config' is missing")
    return hf["text_config"], f"{source} (text_config)"


def _layer_types(r: ConfigReader, num_layers: int) -> list[str]:
    types = list(r.get("layer_types", [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]))
    require(len(types) == num_layers, f"{r.source}: layer_types has {len(types)} entries for {num_layers} layers")
    for t in types:
        require(t in ENTRY, f"{r.source}: layer type '{t}' is not supported ({SLIDING}, {FULL})")
    types[-1] = FULL  # transformers forces the last layer to full attention
    return types


def kv_sources(types: list[str], num_shared: int, source: str) -> list[int]:
    """Per layer: -1 (own K/V) or the layer whose K/V it reuses, the last of its type before the shared tail."""
    first = len(types) - num_shared
    require(0 < first <= len(types), f"{source}: num_kv_shared_layers={num_shared} must leave 1 to {len(types)} "
                                     "layers with their own K/V")
    out = []
    for i, t in enumerate(types):
        own = [j for j in range(first) if types[j] == t]
        require(i < first or bool(own), f"{source}: layer type '{t}' occurs only in the KV-shared tail "
                                        f"(layers {first}..{len(types) - 1}, num_kv_shared_layers={num_shared})")
        out.append(-1 if i < first else own[-1])
    return out


def _rope(r: ConfigReader, layer_type: str, head_dim: int, sliding_head_dim: int) -> dict[str, Any]:
    """gqa RoPE fields of a layer type: default RoPE over the whole head, or proportional (full layers)."""
    params = dict((r.get("rope_parameters", {}) or {}).get(layer_type) or {})
    kind = params.get("rope_type", "default")
    where = f"{r.source}: rope_parameters.{layer_type}"
    require(kind in ("default", "proportional"), f"{where}.rope_type='{kind}' is not supported (default, proportional)")
    require(float(params.get("factor", 1.0)) == 1.0, f"{where}.factor={params.get('factor')} is not supported (1.0)")
    # transformers' default RoPE spans head_dim even on full layers of global_head_dim
    require(kind == "proportional" or head_dim == sliding_head_dim,
            f"{where}.rope_type='default' with global_head_dim={head_dim} != head_dim={sliding_head_dim} is not "
            "supported")
    fraction = float(params.get("partial_rotary_factor", 1.0)) if kind == "proportional" else 1.0
    return {"rope_theta": float(params.get("rope_theta", 10000.0)), "rope_type": kind, "rope_fraction": fraction}


def _attention(r: ConfigReader, types: list[str], sources: list[int]) -> tuple[dict[str, Any], list[str]]:
    """The gqa menu (an entry per layer type, and per type and source for KV-shared layers) and the layers' entries."""
    heads, hd = int(r.get("num_attention_heads")), int(r.get("head_dim"))
    full_hd = int(r.get("global_head_dim", 0)) or hd
    k_eq_v = bool(r.get("attention_k_eq_v", False))
    kv = int(r.get("num_key_value_heads"))
    base = {"kind": GQA, "num_heads": heads, "qk_norm": True, "v_norm": True, "scale": 1.0}
    entries = {
        SLIDING: {**base, "num_kv_heads": kv, "head_dim": hd, "window": int(r.get("sliding_window")),
                  "k_eq_v": False, **_rope(r, SLIDING, hd, hd)},
        FULL: {**base, "num_kv_heads": int(r.get("num_global_key_value_heads")) if k_eq_v else kv,
               "head_dim": full_hd, "window": 0, "k_eq_v": k_eq_v, **_rope(r, FULL, full_hd, hd)},
    }
    menu, names = {}, []
    for t, src in zip(types, sources):
        name = ENTRY[t] if src < 0 else f"{ENTRY[t]}_from_{src}"
        menu.setdefault(name, {**entries[t], "kv_source": src})
        names.append(name)
    return menu, names


def _from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    text, where = _text_config(hf, source)
    r = ConfigReader(text, where)
    r.expect("attention_bias", False, False, "moesaic's gqa projections have no bias")
    require(r.get("use_bidirectional_attention", None) != "all",
            f"{where}: use_bidirectional_attention='all' is not supported (moesaic's layers are causal)")
    act = r.get("hidden_activation", "gelu_pytorch_tanh")
    require(act in ACTIVATIONS, f"{where}: hidden_activation='{act}' is not supported ({', '.join(ACTIVATIONS)})")
    num_layers = int(r.get("num_hidden_layers"))
    types = _layer_types(r, num_layers)
    num_shared = int(r.get("num_kv_shared_layers", 0))
    sources = kv_sources(types, num_shared, where)
    menu, layer_types = _attention(r, types, sources)
    width = int(r.get("intermediate_size"))
    wide = bool(r.get("use_double_wide_mlp", False)) and num_shared > 0
    moe_block = bool(r.get("enable_moe_block", False))
    moe = MoEConfig(num_experts=int(r.get("num_experts")), top_k=int(r.get("top_k_experts")),
                    intermediate_size=int(r.get("moe_intermediate_size")), num_shared_experts=0,
                    score_func="softmax", norm_topk_prob=True, routed_scaling_factor=1.0, swiglu_limit=0.0,
                    bias_update_rate=0.0, router_input_norm=True, per_expert_scale=True) if moe_block else \
        MoEConfig(num_shared_experts=0, swiglu_limit=0.0, bias_update_rate=0.0)
    return ModelConfig(
        vocab_size=int(r.get("vocab_size")), hidden_size=int(r.get("hidden_size")), num_layers=num_layers,
        layer_types=layer_types, ffn_types=["dense+moe" if moe_block else "dense"] * num_layers,
        dense_intermediate_size=width,
        dense_intermediate_sizes=[width * (2 if wide and s >= 0 else 1) for s in sources],
        ffn_activation=ACTIVATIONS[act], rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(r.get("tie_word_embeddings", True)), embed_scale=True, sandwich_norm=True,
        layer_scalar=True, ple_dim=int(r.get("hidden_size_per_layer_input", 256)),
        ple_vocab_size=int(r.get("vocab_size_per_layer_input", 262144)),
        final_logit_softcap=float(r.get("final_logit_softcapping", 0.0)), hc_mult=1, mtp_layers=0,
        attention=AttentionConfig(menu=menu), moe=moe)


def _check_model(cfg: ModelConfig) -> None:
    """The block-level fields Gemma4ForCausalLM fixes."""
    require_values(cfg, "model", "Gemma 4", [("hc_mult", 1), ("mtp_layers", 0), ("embed_scale", True),
                                             ("sandwich_norm", True), ("layer_scalar", True)])
    require(cfg.ffn_activation in ACTIVATIONS.values(),
            f"model.ffn_activation='{cfg.ffn_activation}': Gemma 4 uses {' or '.join(ACTIVATIONS.values())}")
    kinds = {cfg.ffn_type(i) for i in range(cfg.num_layers)}
    require(kinds in ({"dense"}, {"dense+moe"}), f"model.ffn_types={sorted(kinds)}: Gemma 4 layers are all dense or "
                                                 "all dense+moe")
    m = cfg.moe
    require(m.swiglu_limit == 0, f"model.moe.swiglu_limit={m.swiglu_limit}: Gemma 4's MLPs have no clamp (0)")
    if kinds == {"dense+moe"}:
        require_values(m, "model.moe", "Gemma 4", [
            ("score_func", "softmax"), ("norm_topk_prob", True), ("routed_scaling_factor", 1.0),
            ("num_shared_experts", 0), ("num_hash_layers", 0), ("router_input_norm", True), ("per_expert_scale", True),
            ("router_logit_softcap", 0.0), ("n_group", 1), ("router", "linear")])


def _check_sharing(cfg: ModelConfig, types: list[str]) -> int:
    """The number of KV-shared layers: a tail whose sources are transformers' (``kv_sources``)."""
    specs = layer_specs(cfg)
    num_shared = next((cfg.num_layers - i for i in range(cfg.num_layers) if all(
        s.kv_source >= 0 for s in specs[i:cfg.num_layers])), 0)
    expected = kv_sources(types, num_shared, "model.layer_types")
    for i, (spec, src) in enumerate(zip(specs, expected)):
        require(spec.kv_source == src, f"model.attention.menu.{cfg.attention_type(i)}.kv_source={spec.kv_source} "
                                       f"(layer {i}): Gemma 4 shares the K/V of the last layer of the same type "
                                       f"before the shared tail ({src})")
    widths = {cfg.dense_width(i) for i in range(cfg.num_layers - num_shared)}
    wide = {cfg.dense_width(i) for i in range(cfg.num_layers - num_shared, cfg.num_layers)}
    require(widths == {cfg.dense_intermediate_size} and wide <= {cfg.dense_intermediate_size,
                                                                 2 * cfg.dense_intermediate_size} and len(wide) <= 1,
            f"model.dense_intermediate_sizes={cfg.dense_intermediate_sizes}: Gemma 4's dense width is "
            "dense_intermediate_size, doubled on every KV-shared layer or none")
    return num_shared


def _attention_keys(cfg: ModelConfig, types: list[str]) -> dict[str, Any]:
    """config.json's attention keys: one gqa setting per layer type (kv_source aside)."""
    require(types[-1] == FULL, f"model.layer_types[{cfg.num_layers - 1}]: Gemma 4's last layer is full attention "
                               "(window 0)")
    out: dict[str, Any] = {"layer_types": types, "rope_parameters": {}, "attention_k_eq_v": False}
    specs: dict[str, Any] = {}
    for t in (SLIDING, FULL):
        layers = [i for i in range(cfg.num_layers) if types[i] == t]
        if not layers:
            continue
        name, spec = shared_entry(cfg, "Gemma 4", layers, varying=("kv_source",))
        where = f"model.attention.menu.{name}"
        require_values(spec, where, "Gemma 4", [("qk_norm", True), ("v_norm", True), ("scale", 1.0), ("gate", "none"),
                                                ("yarn_factor", 1.0)])
        rope = {"rope_type": spec.rope_type, "rope_theta": spec.rope_theta}
        if spec.rope_type == "proportional":
            require(t == FULL, f"{where}.rope_type='proportional': Gemma 4 uses it on full layers only")
            rope["partial_rotary_factor"] = spec.rope_fraction
        else:
            require(spec.rope_fraction == 1.0, f"{where}.rope_fraction={spec.rope_fraction}: Gemma 4's default RoPE "
                                               "covers the whole head (1.0)")
        require(t == FULL or not spec.k_eq_v, f"{where}.k_eq_v=true: Gemma 4 derives V from K on full layers only")
        out["rope_parameters"][t] = rope
        specs[t] = (where, spec)
    sliding, full = specs.get(SLIDING), specs[FULL][1]
    head = sliding[1] if sliding else full
    require(full.num_heads == head.num_heads, f"{specs[FULL][0]}.num_heads={full.num_heads}: Gemma 4 uses "
                                              f"{head.num_heads} query heads on every layer")
    require(full.k_eq_v or full.num_kv_heads == head.num_kv_heads,
            f"{specs[FULL][0]}.num_kv_heads={full.num_kv_heads}: without k_eq_v Gemma 4's full layers have the "
            f"sliding layers' {head.num_kv_heads}")
    require(full.rope_type == "proportional" or full.head_dim == head.head_dim,
            f"{specs[FULL][0]}.rope_type='default': transformers' default RoPE needs head_dim {head.head_dim}")
    out.update({"num_attention_heads": head.num_heads, "num_key_value_heads": head.num_kv_heads,
                "head_dim": head.head_dim, "global_head_dim": full.head_dim, "attention_k_eq_v": full.k_eq_v,
                "num_global_key_value_heads": full.num_kv_heads if full.k_eq_v else None,
                "sliding_window": sliding[1].window if sliding else 512})
    return out


class Gemma4(Family):
    name = "Gemma 4"
    model_types = ("gemma4_text", "gemma4")

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.sandwich_norm and any(spec.kind == GQA for spec in layer_specs(cfg))

    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        return _from_hf(hf, source)

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        _check_model(cfg)
        for i, spec in enumerate(layer_specs(cfg)):
            require(spec.kind == GQA, f"model.attention.menu.{cfg.attention_type(i)}.kind='{spec.kind}': Gemma 4 "
                                      "layers are gqa")
        types = [SLIDING if spec.window > 0 else FULL for spec in layer_specs(cfg)[:cfg.num_layers]]
        num_shared = _check_sharing(cfg, types)
        moe, m = cfg.ffn_type(0) == "dense+moe", cfg.moe
        return {
            "architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "dtype": dtype,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "intermediate_size": cfg.dense_intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
            "hidden_activation": next(k for k, v in ACTIVATIONS.items() if v == cfg.ffn_activation),
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            **_attention_keys(cfg, types), "num_kv_shared_layers": num_shared,
            "use_double_wide_mlp": num_shared > 0 and cfg.dense_width(cfg.num_layers - 1) > cfg.dense_intermediate_size,
            "hidden_size_per_layer_input": cfg.ple_dim,
            "vocab_size_per_layer_input": cfg.ple_vocab_size or cfg.vocab_size,
            "final_logit_softcapping": cfg.final_logit_softcap or None, "enable_moe_block": moe,
            "num_experts": m.num_experts if moe else None, "top_k_experts": m.top_k if moe else None,
            "moe_intermediate_size": m.intermediate_size if moe else None,
        }

    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> Gemma4Names:
        prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in tensor_names) else TEXT_PREFIX
        first_shared = next((i for i, s in enumerate(layer_specs(cfg)) if s.kv_source >= 0), cfg.num_layers)
        return Gemma4Names(cfg.tie_embeddings, prefix, first_shared)
