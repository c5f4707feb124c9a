"""Load, merge, validate and save run configurations.

``load_config("configs/tiny.yaml", ["train.steps=50"])`` returns a typed ``Config``. Every
problem raises ``ConfigError`` whose message is one line naming the field and what is allowed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import (
    FFN_ACTIVATIONS,
    FFN_TYPES,
    MOE_FFN_TYPES,
    ROUTERS,
    SCORE_FUNCS,
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    SourceConfig,
    TrainConfig,
)

CONFIG_DIR = Path(__file__).resolve().parent

__all__ = [
    "AttentionConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "SourceConfig",
    "TrainConfig",
    "load_config",
    "resolve_config_path",
    "save_config",
    "to_yaml",
    "check_topology",
    "check_attention",
    "check_trainable",
    "validate",
]


class ConfigError(ValueError):
    """A configuration problem, reported as one actionable line."""


def resolve_config_path(path: str | Path) -> Path:
    """Accept a file path or the name of a bundled config ("tiny", "tiny.yaml")."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    bundled = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{path}' not found (bundled configs: {bundled})")


def _omegaconf_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "not in" in msg:
        if key.startswith("model.attention."):  # the flat attention fields of configs written before the menu
            return ConfigError(f"unknown config key '{key}' in {source}: attention fields now go in a menu entry "
                               f"(model.attention.menu.<name>.{key.split('.')[-1]}) or in model.attention.common "
                               f"(docs/config.md)")
        return ConfigError(f"unknown config key '{key}' in {source}: check the spelling against docs/config.md")
    return ConfigError(f"bad value for '{key}' in {source}: {msg}")


def _yaml_error(exc: yaml.YAMLError, file: Path) -> ConfigError:
    """file:line:column (1-based) and PyYAML's own description of a syntax error."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{where}: YAML syntax error: {problem}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults <- YAML file <- dot-list overrides, then validate."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        file = resolve_config_path(path)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(file))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, str(file)) from None
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, file) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=50)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _omegaconf_error(exc, f"override '{item}'") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_choice(field: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    _require(value in allowed, f"{field}='{value}' is not allowed (choose one of: {', '.join(allowed)})")


def _check_positive(prefix: str, obj: object, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{prefix}.{name}={value} must be > 0")


def check_trainable(cfg: Config) -> None:
    """Reject valid configs that use features this version of moesaic cannot train yet."""
    p, m = cfg.parallel, cfg.model
    _require(p.sp == 1 or m.mtp_layers == 0,
             f"model.mtp_layers={m.mtp_layers} cannot run with parallel.sp={p.sp} yet: multi-token prediction "
             f"shifts tokens across sequence shards (set model.mtp_layers=0 or parallel.sp=1)")


def check_topology(p: ParallelConfig, world_size: int) -> None:
    """world = dp x sp; expert-parallel groups may span any ranks, so ep only has to divide the world."""
    _require(world_size % p.ep == 0 and world_size % p.sp == 0,
             f"parallel.ep={p.ep} and parallel.sp={p.sp} must divide the world size {world_size}")


def check_attention(m: ModelConfig, seq_len: int) -> dict:
    """Check the attention menu and the layers' choices; returns the entries in use, name -> typed spec."""
    from moesaic.model._cpu_compiled import BACKENDS  # the model package imports configs: import it lazily
    from moesaic.model.attention import resolve_menu

    _check_choice("model.attention.backend", m.attention.backend, BACKENDS)
    _require(not m.layer_types or len(m.layer_types) == m.num_layers,
             f"model.layer_types has {len(m.layer_types)} entries but model.num_layers={m.num_layers} "
             f"(give one per layer or none)")
    menu = resolve_menu(m)
    entries = ", ".join(menu)
    for i, name in enumerate(m.layer_types):
        _require(name in menu, f"model.layer_types[{i}]='{name}' is not an entry of model.attention.menu ({entries})")
    names = [m.attention_type(i) for i in range(m.num_layers + m.mtp_layers)]
    for name in set(names) - set(menu):  # the MTP blocks' entry, or "swa" for an empty model.layer_types
        field = "model.mtp_layer_type" if name == m.mtp_layer_type and m.mtp_layers else "model.layer_types"
        raise ConfigError(f"{field} uses '{name}', which is not an entry of model.attention.menu ({entries})")
    known = {f for spec in menu.values() for f in vars(spec)} - {"kind"}
    for key in m.attention.common:
        _require(key in known, f"unknown config key 'model.attention.common.{key}': no menu entry's kind has it")
    used = {name: menu[name] for name in dict.fromkeys(names)}  # unused entries are parsed, not checked
    for name, spec in used.items():
        spec.check(f"model.attention.menu.{name}", seq_len)
    specs = [menu[name] for name in names]
    for i, (name, spec) in enumerate(zip(names, specs)):
        spec.check_in_model(f"model.attention.menu.{name}", i, specs, m.num_layers)
    return used


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-field checks that types alone cannot express. ``world_size`` adds topology checks."""
    m, e, d, t, p = cfg.model, cfg.model.moe, cfg.data, cfg.train, cfg.parallel
    _check_positive("model", m, ["vocab_size", "hidden_size", "num_layers", "dense_intermediate_size", "hc_mult"])
    _check_positive("model.moe", e, ["num_experts", "top_k", "intermediate_size"])
    _check_positive("data", d, ["seq_len"])
    _check_positive("train", t, ["steps", "micro_batch_size", "global_batch_size", "lr", "log_every",
                                 "eval_every", "eval_batches"])
    _check_positive("parallel", p, ["ep", "sp"])

    _require(not m.ffn_types or len(m.ffn_types) == m.num_layers,
             f"model.ffn_types has {len(m.ffn_types)} entries but model.num_layers={m.num_layers} "
             f"(give one per layer or none)")
    for i, kind in enumerate(m.ffn_types):
        _check_choice(f"model.ffn_types[{i}]", kind, FFN_TYPES)
    _require(not m.dense_intermediate_sizes or len(m.dense_intermediate_sizes) == m.num_layers,
             f"model.dense_intermediate_sizes has {len(m.dense_intermediate_sizes)} entries but model.num_layers="
             f"{m.num_layers} (give one per layer or none)")
    for i, width in enumerate(m.dense_intermediate_sizes):
        _require(width > 0, f"model.dense_intermediate_sizes[{i}]={width} must be > 0")
    _check_choice("model.ffn_activation", m.ffn_activation, FFN_ACTIVATIONS)
    _require(m.ffn_activation == "silu" or e.swiglu_limit == 0,
             f"model.ffn_activation='{m.ffn_activation}' has no clamp: set model.moe.swiglu_limit=0 "
             f"(it is {e.swiglu_limit}; the clamp is SwiGLU's)")
    _require(m.ple_dim >= 0, f"model.ple_dim={m.ple_dim} must be >= 0 (0 disables per-layer embeddings)")
    _require(m.ple_vocab_size >= 0, f"model.ple_vocab_size={m.ple_vocab_size} must be >= 0 (0 = model.vocab_size)")
    _require(m.hc_mult == 1 or not (m.residual_scale or m.fp32_residual),
             f"model.hc_mult={m.hc_mult}: model.residual_scale and model.fp32_residual need a plain residual (1)")
    _require(m.final_logit_softcap >= 0, f"model.final_logit_softcap={m.final_logit_softcap} must be >= 0 (0 disables)")
    used = check_attention(m, d.seq_len)
    _require(m.attention.backend != "cpu" or (t.dtype == "fp32" and t.device != "cuda"),
             f"model.attention.backend='cpu' runs fp32 CPU tensors only, but train.dtype='{t.dtype}' and "
             f"train.device='{t.device}'; use 'auto'")
    if m.attention.backend == "triton":
        _require(importlib.util.find_spec("triton") is not None,
                 "model.attention.backend='triton' needs the triton package (pip install triton)")
        _require(t.device != "cpu" or os.environ.get("TRITON_INTERPRET") == "1",
                 "model.attention.backend='triton' runs on CUDA, but train.device='cpu' (on CPU only in Triton's "
                 "interpreter, TRITON_INTERPRET=1); use 'auto'")
        from moesaic.model.attention.backbone import V4Spec  # lazily, as check_attention's imports
        for name, spec in used.items():  # the kernels' tl.dot tiles span the indexer's and the V4 heads' widths
            widths = {"index_head_dim": getattr(spec, "index_head_dim", 16),
                      "head_dim": spec.head_dim if isinstance(spec, V4Spec) else 16}
            for width, c in widths.items():
                _require(c >= 16 and not c & (c - 1), f"model.attention.backend='triton' needs {width} a power of 2 "
                         f">= 16, but model.attention.menu.{name} has {c}")

    _require(e.top_k <= e.num_experts,
             f"model.moe.top_k={e.top_k} must be <= model.moe.num_experts={e.num_experts}")
    _check_choice("model.moe.score_func", e.score_func, SCORE_FUNCS)
    _check_choice("model.moe.router", e.router, ROUTERS)
    if e.router == "mlp":
        _require(e.router_hidden_size > 0, f"model.moe.router_hidden_size={e.router_hidden_size} must be > 0")
        _require(e.score_func == "softmax", f"model.moe.score_func='{e.score_func}': model.moe.router='mlp' scores "
                                            f"with a softmax over the experts and the skip expert; set softmax")
        _require(e.num_hash_layers == 0 and not e.router_input_norm and not e.per_expert_scale,
                 "model.moe.router='mlp' takes no num_hash_layers, router_input_norm or per_expert_scale")
        _require(e.z_loss_coef == 0, f"model.moe.z_loss_coef={e.z_loss_coef}: the z-loss is the linear router's; "
                                     "model.moe.router='mlp' takes 0")
    _check_positive("model.moe", e, ["n_group", "topk_group"])
    if e.n_group > 1:
        _require(e.num_experts % e.n_group == 0 and e.num_experts // e.n_group >= 2,
                 f"model.moe.n_group={e.n_group} must split model.moe.num_experts={e.num_experts} into equal groups "
                 f"of at least 2 experts (a group scores by its two best)")
        _require(e.topk_group <= e.n_group and e.top_k <= e.topk_group * (e.num_experts // e.n_group),
                 f"model.moe.topk_group={e.topk_group} must be <= model.moe.n_group={e.n_group} and its groups must "
                 f"hold model.moe.top_k={e.top_k} experts")
    _require(e.num_shared_experts >= 0, f"model.moe.num_shared_experts={e.num_shared_experts} must be >= 0")
    _require(e.shared_intermediate_size >= 0,
             f"model.moe.shared_intermediate_size={e.shared_intermediate_size} must be >= 0 (0 = num_shared_experts "
             "x intermediate_size)")
    _require(e.router_logit_softcap >= 0, f"model.moe.router_logit_softcap={e.router_logit_softcap} must be >= 0 "
                                          "(0 disables)")
    _require(e.swiglu_limit >= 0, f"model.moe.swiglu_limit={e.swiglu_limit} must be >= 0 (0 disables)")
    _require(e.bias_update_rate >= 0, f"model.moe.bias_update_rate={e.bias_update_rate} must be >= 0")
    _require(e.seq_aux_loss_coef >= 0, f"model.moe.seq_aux_loss_coef={e.seq_aux_loss_coef} must be >= 0")
    _require(e.z_loss_coef >= 0, f"model.moe.z_loss_coef={e.z_loss_coef} must be >= 0")
    _require(0 <= e.num_hash_layers <= m.num_layers,
             f"model.moe.num_hash_layers={e.num_hash_layers} must be in [0, model.num_layers={m.num_layers}]")
    for i in range(e.num_hash_layers):
        _require(m.ffn_type(i) in MOE_FFN_TYPES, f"model.ffn_types[{i}]='{m.ffn_type(i)}' but "
                 f"model.moe.num_hash_layers={e.num_hash_layers} makes layer {i} a hash-routed MoE layer")
    _require(m.hc_sinkhorn_iters >= 1, f"model.hc_sinkhorn_iters={m.hc_sinkhorn_iters} must be >= 1")
    _require(m.hc_eps > 0, f"model.hc_eps={m.hc_eps} must be > 0")
    _require(m.mtp_layers >= 0, f"model.mtp_layers={m.mtp_layers} must be >= 0")
    _require(m.mtp_loss_coef >= 0, f"model.mtp_loss_coef={m.mtp_loss_coef} must be >= 0")

    _require(0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    _require(d.max_train_tokens >= 0, f"data.max_train_tokens={d.max_train_tokens} must be >= 0")
    _check_positive("data", d, ["num_proc", "shard_tokens", "tokenizer_sample_bytes"])
    for i, src in enumerate(d.sources):
        _require(bool(src.dataset), f"data.sources[{i}].dataset is empty (give a dataset as for data.dataset)")
        _require(src.weight > 0 and math.isfinite(src.weight),
                 f"data.sources[{i}].weight={src.weight} must be a finite number > 0")
    _check_choice("train.schedule", t.schedule, ("cosine", "wsd", "constant"))
    _check_choice("train.activation_checkpointing", t.activation_checkpointing, ("none", "block", "selective"))
    _check_choice("train.dtype", t.dtype, ("fp32", "bf16"))
    _check_choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _require(t.zero_stage in (0, 1, 2),
             f"train.zero_stage={t.zero_stage} is not allowed (choose 0, 1 or 2; DeepSpeed refuses MoE with ZeRO-3)")
    _require(0 <= t.stop_at <= t.steps, f"train.stop_at={t.stop_at} must be in [0, train.steps={t.steps}]")
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _require(0.0 < t.wsd_decay_fraction <= 1.0, f"train.wsd_decay_fraction={t.wsd_decay_fraction} must be in (0, 1]")
    _require(t.dtype != "bf16" or t.zero_stage in (1, 2),
             f"train.zero_stage={t.zero_stage} cannot train train.dtype=bf16: use 1 or 2 (their partitions hold the "
             f"fp32 master weights; on one rank ZeRO-1 costs what ZeRO-0 would)")
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables)")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    _require(t.spike_zscore >= 0, f"train.spike_zscore={t.spike_zscore} must be >= 0 (0 disables)")
    _require(t.spike_window >= 4, f"train.spike_window={t.spike_window} must be >= 4")
    _require(t.max_rollbacks >= 0, f"train.max_rollbacks={t.max_rollbacks} must be >= 0")
    _require(t.sample_tokens >= 0, f"train.sample_tokens={t.sample_tokens} must be >= 0")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size={t.global_batch_size} must be a multiple of "
             f"train.micro_batch_size={t.micro_batch_size}")

    c = cfg.checkpoint
    _require(c.every > 0, f"checkpoint.every={c.every} must be > 0")
    _require(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1")
    _check_choice("logging.wandb", cfg.logging.wandb, ("auto", "online", "offline", "disabled"))
    lg = cfg.logging
    _require(lg.moe_heatmap_every >= 0 and lg.moe_heatmap_every % t.log_every == 0,
             f"logging.moe_heatmap_every={lg.moe_heatmap_every} must be 0 (off) or a multiple of "
             f"train.log_every={t.log_every} (loads are counted over the log window)")
    _require(all(n > 0 for n in lg.kv_contexts), f"logging.kv_contexts={lg.kv_contexts} must all be > 0")
    _require(lg.peak_flops is None or lg.peak_flops > 0,
             f"logging.peak_flops={lg.peak_flops} must be > 0 or null (auto)")

    _require(e.num_experts % p.ep == 0,
             f"model.moe.num_experts={e.num_experts} must be divisible by parallel.ep={p.ep}")
    if p.ep > 1:
        _require(any(m.ffn_type(i) in MOE_FFN_TYPES for i in range(m.num_layers)),
                 f"parallel.ep={p.ep} needs MoE layers, but model.ffn_types has none; set parallel.ep=1")
        _require(t.zero_stage in (1, 2),
                 f"train.zero_stage={t.zero_stage} cannot run parallel.ep={p.ep}: use 1 or 2 (the ZeRO-0 gradient norm "
                 f"would miss the other ranks' experts, ZeRO-3 refuses MoE)")
    if p.sp > 1:
        # A shard must start where every layer's type needs it (e.g. a compression window boundary).
        aligned = {name: spec.sp_alignment(f"model.attention.menu.{name}") for name, spec in used.items()}
        step = math.lcm(*aligned.values())
        why = ", ".join(f"model.attention.menu.{name} at multiples of {n}" for name, n in aligned.items() if n > 1)
        _require(d.seq_len % (p.sp * step) == 0,
                 f"data.seq_len={d.seq_len} must be divisible by parallel.sp={p.sp}" + (f" x {step}" if why else "")
                 + f" (equal sequence shards{', starting ' + why if why else ''})")
        _require(t.zero_stage in (1, 2),
                 f"train.zero_stage={t.zero_stage} cannot run parallel.sp={p.sp}: use 1 or 2 (gradients are summed "
                 f"over sequence shards by ZeRO-1/2; ZeRO-0 would clip with a wrong norm)")
    if world_size is not None:
        check_topology(p, world_size)
        dp = world_size // p.sp
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"train.global_batch_size={t.global_batch_size} must be a multiple of train.micro_batch_size="
                 f"{t.micro_batch_size} x data-parallel size {dp}")
