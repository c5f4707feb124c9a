"""Whether a checkpoint fits a model: the config fields that decide its weights and outputs.

``model.init_from`` and resuming compare a run's ModelConfig with a checkpoint's through
``architecture``; the first field that differs is named with the value to set.
"""

from __future__ import annotations

from typing import Any

from moesaic.configs import ModelConfig
from moesaic.configs.schema import MOE_FFN_TYPES
from moesaic.model.attention import layer_specs

from .family import require


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide a model's weights and outputs, keyed by their config path (attention: per layer).

    Fields a model does not use, and training-only ones (``AttentionSpec.not_architecture``), are
    left out, so that two configs compare equal exactly when a checkpoint of one is a checkpoint of
    the other.
    """
    m, n = cfg.moe, cfg.num_layers
    ffn_types = [cfg.ffn_type(i) for i in range(n)]
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": n, "ffn_types": ffn_types,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_embeddings": cfg.tie_embeddings, "hc_mult": cfg.hc_mult,
        "mtp_layers": cfg.mtp_layers, "ffn_activation": cfg.ffn_activation, "embed_scale": cfg.embed_scale,
        "sandwich_norm": cfg.sandwich_norm, "layer_scalar": cfg.layer_scalar, "ple_dim": cfg.ple_dim,
        "final_logit_softcap": cfg.final_logit_softcap,
    }
    if cfg.ple_dim:
        out["ple_vocab_size"] = cfg.ple_vocab_size or cfg.vocab_size
    if any(t in MOE_FFN_TYPES for t in ffn_types) or cfg.mtp_layers:
        out.update({f"moe.{k}": getattr(m, k) for k in (
            "num_experts", "top_k", "intermediate_size", "num_shared_experts", "score_func", "norm_topk_prob",
            "routed_scaling_factor", "swiglu_limit", "num_hash_layers", "router_input_norm", "per_expert_scale",
            "router_logit_softcap", "n_group", "topk_group")})
        if m.num_shared_experts:
            out["moe.shared_width"] = m.shared_intermediate_size or m.intermediate_size * m.num_shared_experts
    if any(t != "moe" for t in ffn_types):
        out["dense_intermediate_sizes"] = [cfg.dense_width(i) if t != "moe" else None for i, t in enumerate(ffn_types)]
        out["moe.swiglu_limit"] = m.swiglu_limit  # dense layers clamp too
    if cfg.hc_mult > 1:
        out.update({"hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps})
    for i, spec in enumerate(layer_specs(cfg)):
        out[f"layers[{i}].attention.kind"] = spec.kind
        out.update({f"layers[{i}].attention.{k}": v for k, v in spec.architecture().items()})
    return out


def _config_path(cfg: ModelConfig, key: str) -> str:
    """The config field behind an ``architecture`` key: a layer's attention field is its menu entry's."""
    if key == "moe.shared_width":
        return "model.moe.shared_intermediate_size"
    if not key.startswith("layers["):
        return f"model.{key}"
    layer, field = key[len("layers["):].split("].attention.")
    name = cfg.attention_type(int(layer))
    return "model.layer_types" if field == "kind" else f"model.attention.menu.{name}.{field}"


def check_same_architecture(run: ModelConfig, checkpoint: ModelConfig, source: str) -> None:
    """ConfigError naming the first ``model.*`` field where the run config disagrees with the checkpoint's."""
    mine, theirs = architecture(run), architecture(checkpoint)
    # Fields one side does not use come last: the field that makes them used is the one to name.
    order = sorted(mine.keys() | theirs.keys(),
                   key=lambda k: (k not in mine or k not in theirs, k.startswith("layers["), k))
    for key in order:
        ours, ckpt = mine.get(key, "(unused)"), theirs.get(key, "(unused)")
        field = _config_path(run if key in mine else checkpoint, key)
        where = f" at {key.split('.attention.')[0]}" if key.startswith("layers[") else ""
        require(ours == ckpt, f"{field}={ours!r} disagrees with the checkpoint {source} ({ckpt!r}){where}; "
                              f"set {field}={ckpt!r} or use another checkpoint")
