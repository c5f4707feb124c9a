"""The DeepSeek-V3, V3.2 and GLM-MoE-DSA families: transformers' ``DeepseekV3ForCausalLM`` /
``DeepseekV32ForCausalLM`` / ``GlmMoeDsaForCausalLM`` <-> moesaic (MOSAIC_SPEC §4, §5; GLM's deltas: ``GlmMoeDsa``).

Every layer is one ``mla`` (V3) or ``dsa`` (V3.2: MLA + the lightning indexer) entry; RoPE is default or
YaRN with transformers' mscale rules (mla.py). The FFN is a dense SwiGLU in the first layers
(``first_k_dense_replace``, or V3.2's ``mlp_layer_types``) and elsewhere a sigmoid-scored MoE with one
shared expert group, aux-loss-free selection bias (``e_score_correction_bias``), group-limited routing
(``n_group``/``topk_group``), renormalised top-k gates times ``routed_scaling_factor``. Plain residual,
untied head unless configured, no MTP (checkpoint layers past ``num_hidden_layers``, the MTP block, are
dropped on import, as transformers drops them).

Config traps (§4.1): V3.2 needs ``q_lora_rank`` (its indexer reads the query latent); the latent norms
use eps 1e-6 whatever ``rms_norm_eps`` says (mla.py fixes them so); ``n_group`` must split the experts
into groups of two or more. Experts are written one matrix per expert, as ``save_pretrained`` does.
"""

from __future__ import annotations

from typing import Any

from moesaic.configs import AttentionConfig, ModelConfig, MoEConfig
from moesaic.model.attention import layer_specs
from moesaic.model.attention.mla import MLASpec

from .family import ConfigReader, Family, require, require_values, shared_entry
from .tensor_map import MLP_NAMES, ExpertLayout, NamePlan, TableNames, split_scope

MLA, DSA = "mla", "dsa"
_ATTN = ("q_proj.weight", "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
         "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight", "indexer.wq_b.weight", "indexer.wk.weight",
         "indexer.k_norm.weight", "indexer.k_norm.bias", "indexer.weights_proj.weight")
_YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "truncate"}


class DeepSeekV3Names(TableNames):
    experts = ExpertLayout(("gate_proj.weight", "up_proj.weight", "down_proj.weight"), write_fused=False)
    top = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "head.weight": "lm_head.weight"}
    block = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             **{f"attn.{n}": f"self_attn.{n}" for n in _ATTN}, **MLP_NAMES,
             "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.expert_bias": "mlp.gate.e_score_correction_bias",
             "ffn.experts.w1": "mlp.experts.gate_up_proj", "ffn.experts.w3": "mlp.experts.gate_up_proj",
             "ffn.experts.w2": "mlp.experts.down_proj",
             **{f"ffn.shared_experts.{k.removeprefix('ffn.')}": v.replace("mlp.", "mlp.shared_experts.")
                for k, v in MLP_NAMES.items()}}

    def __init__(self, family: str, tied: bool, num_layers: int) -> None:
        super().__init__(tied)
        self.family, self.num_layers = family, num_layers

    def ignored(self, key: str) -> bool:
        """The MTP block(s) stored as layers past the last decoder layer (transformers skips them too)."""
        kind, i, _ = split_scope(key.removeprefix("model."))
        return kind == "layers" and i >= self.num_layers


def _rope(r: ConfigReader) -> dict[str, Any]:
    """An mla entry's RoPE fields: default, or YaRN with its factor, betas and mscales."""
    params = dict(r.get("rope_parameters", None) or r.get("rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", r.get("rope_theta", 10000.0)))
    if kind == "default":
        return {"rope_theta": theta}
    where = f"{r.source}: rope_parameters"
    require(kind == "yarn", f"{where}.rope_type='{kind}' is not supported (default, yarn)")
    extra = sorted(set(params) - _YARN_KEYS)
    require(not extra, f"{where}.{extra[0] if extra else ''} is not supported (moesaic derives YaRN's attention "
                       "factor from mscale and mscale_all_dim)")
    require(params.get("truncate", True), f"{where}.truncate=false is not supported")
    require(params.get("factor") is not None, f"{where}.factor is missing")
    return {"rope_theta": theta, "yarn_factor": float(params["factor"]),
            "yarn_original_max_position": int(params["original_max_position_embeddings"]),
            "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(params.get("beta_slow") or 1.0), "yarn_mscale": float(params.get("mscale") or 0.0),
            "yarn_mscale_all_dim": float(params.get("mscale_all_dim") or 0.0)}


def _ffn_types(r: ConfigReader, num_layers: int) -> list[str]:
    mlp = r.get("mlp_layer_types", None)
    if mlp is None:
        dense = min(int(r.get("first_k_dense_replace", 0)), num_layers)
        return ["dense"] * dense + ["moe"] * (num_layers - dense)
    require(len(mlp) == num_layers and set(mlp) <= {"dense", "sparse"},
            f"{r.source}: mlp_layer_types must hold 'dense' or 'sparse' for each of the {num_layers} layers")
    return ["moe" if t == "sparse" else "dense" for t in mlp]


class DeepSeekV3(Family):
    """DeepSeek-V3 (mla layers); ``DeepSeekV32`` adds the indexer (dsa layers)."""

    name = "DeepSeek-V3"
    model_types = ("deepseek_v3",)
    kind = MLA
    architecture = "DeepseekV3ForCausalLM"

    def claims(self, cfg: ModelConfig) -> bool:
        return any(spec.kind == self.kind for spec in layer_specs(cfg)) and not cfg.sandwich_norm

    def attention(self, r: ConfigReader) -> dict[str, Any]:
        """The menu entry of every layer."""
        heads = int(r.get("num_attention_heads"))
        require(int(r.get("num_key_value_heads", heads)) == heads,
                f"{r.source}: num_key_value_heads={r.get('num_key_value_heads')} must equal num_attention_heads "
                f"({heads}): MLA expands keys and values per head")
        r.expect("rope_interleave", True, True, "moesaic's mla rotates interleaved pairs")
        return {"kind": self.kind, "num_heads": heads, "q_lora_rank": int(r.get("q_lora_rank", 0)),
                "kv_lora_rank": int(r.get("kv_lora_rank")), "qk_nope_head_dim": int(r.get("qk_nope_head_dim")),
                "qk_rope_head_dim": int(r.get("qk_rope_head_dim")), "v_head_dim": int(r.get("v_head_dim")), **_rope(r)}

    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        r = ConfigReader(hf, source)
        r.expect("attention_bias", False, False, "moesaic's mla projections have no bias")
        r.expect("mlp_bias", False, False, "moesaic's FFN projections have no bias")
        r.expect("hidden_act", "silu", "silu", "moesaic's experts and dense layers are SwiGLU here")
        num_layers = int(r.get("num_hidden_layers"))
        moe = MoEConfig(num_experts=int(r.get("n_routed_experts")), top_k=int(r.get("num_experts_per_tok")),
                        intermediate_size=int(r.get("moe_intermediate_size")),
                        num_shared_experts=int(r.get("n_shared_experts", 0)), score_func="sigmoid",
                        norm_topk_prob=bool(r.get("norm_topk_prob", True)),
                        routed_scaling_factor=float(r.get("routed_scaling_factor", 1.0)), swiglu_limit=0.0,
                        n_group=int(r.get("n_group", 1)), topk_group=int(r.get("topk_group", 1)))
        layer_types, menu = self.layers(r, num_layers)
        return ModelConfig(vocab_size=int(r.get("vocab_size")), hidden_size=int(r.get("hidden_size")),
                           num_layers=num_layers, layer_types=layer_types,
                           ffn_types=_ffn_types(r, num_layers), dense_intermediate_size=int(r.get("intermediate_size")),
                           rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
                           tie_embeddings=bool(r.get("tie_word_embeddings", False)), hc_mult=1, mtp_layers=0,
                           attention=AttentionConfig(menu=menu), moe=moe)

    def layers(self, r: ConfigReader, num_layers: int) -> tuple[list[str], dict[str, Any]]:
        """Each layer's menu entry name, and the menu."""
        return [self.kind] * num_layers, {self.kind: self.attention(r)}

    def check_exportable(self, cfg: ModelConfig) -> MLASpec:
        """Refuse what the transformers model cannot reproduce, naming the field; the layers' shared entry."""
        require_values(cfg, "model", self.name, [
            ("hc_mult", 1), ("mtp_layers", 0), ("embed_scale", False), ("sandwich_norm", False),
            ("layer_scalar", False), ("ple_dim", 0), ("final_logit_softcap", 0.0), ("ffn_activation", "silu")])
        for i, spec in enumerate(layer_specs(cfg)):
            require(spec.kind == self.kind, f"model.attention.menu.{cfg.attention_type(i)}.kind='{spec.kind}' "
                                            f"(layer {i}): {self.name} layers are all {self.kind}")
        for i in range(cfg.num_layers):
            require(cfg.ffn_type(i) != "dense+moe", f"model.ffn_types[{i}]='dense+moe': {self.name} layers are "
                                                    "dense or moe")
            require(cfg.ffn_type(i) == "moe" or cfg.dense_width(i) == cfg.dense_intermediate_size,
                    f"model.dense_intermediate_sizes[{i}]={cfg.dense_width(i)}: {self.name}'s dense layers all have "
                    f"intermediate_size ({cfg.dense_intermediate_size})")
        require_values(cfg.moe, "model.moe", self.name, [
            ("score_func", "sigmoid"), ("swiglu_limit", 0.0), ("num_hash_layers", 0), ("router_input_norm", False),
            ("per_expert_scale", False), ("router", "linear"), ("router_logit_softcap", 0.0),
            ("shared_intermediate_size", 0)])
        name, spec = shared_entry(cfg, self.name, range(cfg.num_layers), self.varying)
        self.check_entry(spec, f"model.attention.menu.{name}")
        return spec

    varying: tuple[str, ...] = ()  # entry fields config.json sets per layer

    def check_entry(self, spec: Any, where: str) -> None:
        """Refuse an attention option the family cannot express."""

    def ffn_layout(self, cfg: ModelConfig) -> dict[str, Any]:
        """config.json's dense/MoE layout: V3 has only first_k_dense_replace."""
        dense = [i for i in range(cfg.num_layers) if cfg.ffn_type(i) == "dense"]
        late = [i for i in dense if i >= len(dense)]
        require(not late, f"model.ffn_types[{late[0] if late else 0}]='dense': {self.name}'s dense layers are the "
                          "first ones (first_k_dense_replace)")
        return {"first_k_dense_replace": len(dense)}

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        spec, m = self.check_exportable(cfg), cfg.moe
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.yarn_factor > 1:
            rope.update(rope_type="yarn", factor=spec.yarn_factor, beta_fast=spec.yarn_beta_fast,
                        original_max_position_embeddings=spec.yarn_original_max_position,
                        beta_slow=spec.yarn_beta_slow)
            rope.update({k: v for k, v in (("mscale", spec.yarn_mscale), ("mscale_all_dim", spec.yarn_mscale_all_dim))
                         if v})
        out = {"architectures": [self.architecture], "model_type": self.model_types[0], "dtype": dtype,
               "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
               "intermediate_size": cfg.dense_intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
               "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
               "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_heads,
               "q_lora_rank": spec.q_lora_rank or None, "kv_lora_rank": spec.kv_lora_rank,
               "qk_nope_head_dim": spec.qk_nope_head_dim, "qk_rope_head_dim": spec.qk_rope_head_dim,
               "v_head_dim": spec.v_head_dim, "rope_parameters": rope,
               "max_position_embeddings": (int(spec.yarn_factor * spec.yarn_original_max_position)
                                           if spec.yarn_factor > 1 else 4096),
               "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k,
               "moe_intermediate_size": m.intermediate_size, "n_shared_experts": m.num_shared_experts,
               "norm_topk_prob": m.norm_topk_prob, "routed_scaling_factor": m.routed_scaling_factor,
               "n_group": m.n_group, "topk_group": m.topk_group, **self.ffn_layout(cfg)}
        return out

    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> NamePlan:
        return DeepSeekV3Names(self.name, cfg.tie_embeddings, cfg.num_layers)


class DeepSeekV32(DeepSeekV3):
    name = "DeepSeek-V3.2"
    model_types = ("deepseek_v32",)
    kind = DSA
    architecture = "DeepseekV32ForCausalLM"
    index_rope = "half"

    def claims(self, cfg: ModelConfig) -> bool:
        return super().claims(cfg) and all(getattr(spec, "index_rope", self.index_rope) == self.index_rope
                                           for spec in layer_specs(cfg))

    def check_entry(self, spec: Any, where: str) -> None:
        require_values(spec, where, self.name, [("index_rope", self.index_rope), ("share_topk", False)])

    def attention(self, r: ConfigReader) -> dict[str, Any]:
        require(r.get("q_lora_rank", None) is not None, f"{r.source}: q_lora_rank is missing (DeepSeek-V3.2's "
                                                        "indexer reads the query latent)")
        layer_types = r.get("layer_types", None)
        require(layer_types is None or set(layer_types) == {"deepseek_sparse_attention"},
                f"{r.source}: layer_types must all be 'deepseek_sparse_attention'")
        return {**super().attention(r), "index_heads": int(r.get("index_n_heads")),
                "index_head_dim": int(r.get("index_head_dim")), "index_topk": int(r.get("index_topk")),
                "index_rope": self.index_rope}

    def ffn_layout(self, cfg: ModelConfig) -> dict[str, Any]:
        types = ["sparse" if cfg.ffn_type(i) == "moe" else "dense" for i in range(cfg.num_layers)]
        return {"mlp_layer_types": types, "first_k_dense_replace": types.index("sparse") if "sparse" in types
                else len(types)}

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        out = super().to_hf(cfg, dtype)
        spec = layer_specs(cfg)[0]
        return {**out, "index_n_heads": spec.index_heads, "index_head_dim": spec.index_head_dim,
                "index_topk": spec.index_topk, "layer_types": ["deepseek_sparse_attention"] * cfg.num_layers}


class GlmMoeDsa(DeepSeekV32):
    """GLM-MoE-DSA (GLM-5): V3.2 with interleaved index RoPE and "shared" layers reusing the previous layer's picks
    (``indexer_types``; moesaic: entry "dsa_shared" with ``share_topk``), MOSAIC_SPEC §4.8."""

    name = "GLM-MoE-DSA"
    model_types = ("glm_moe_dsa",)
    architecture = "GlmMoeDsaForCausalLM"
    index_rope = "interleave"
    varying = ("share_topk",)

    def layers(self, r: ConfigReader, num_layers: int) -> tuple[list[str], dict[str, Any]]:
        types = list(r.get("indexer_types", ["full"] * num_layers))
        require(len(types) == num_layers and set(types) <= {"full", "shared"} and types[0] == "full",
                f"{r.source}: indexer_types must be 'full' or 'shared' for each of the {num_layers} layers, "
                "the first 'full'")
        entry = self.attention(r)
        names = [DSA if t == "full" else f"{DSA}_shared" for t in types]
        return names, {name: {**entry, "share_topk": name != DSA} for name in dict.fromkeys(names)}

    def check_entry(self, spec: Any, where: str) -> None:
        require_values(spec, where, self.name, [("index_rope", self.index_rope)])

    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        return {**super().to_hf(cfg, dtype),
                "indexer_types": ["shared" if s.share_topk else "full" for s in layer_specs(cfg)[:cfg.num_layers]]}
