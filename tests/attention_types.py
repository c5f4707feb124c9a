"""Small settings of every registered attention type, for the tests parametrised over the registry.

A new type gets the causality, prefill/decode, generation and Hugging Face round-trip tests by
registering and adding its entry here (``test_every_registered_type_has_small_settings`` fails until
it does). Sizes fit hidden size 48; windows and compression ratios are small, so short test
sequences cross many window and compression boundaries; 16 index heads keep top-k ties rare.
"""

from __future__ import annotations

import dataclasses

from moesaic.configs.schema import AttentionConfig
from moesaic.model.attention import AttentionSpec, registered

_V4 = dict(num_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16, window=8,
           query_chunk=6)
_COMPRESSED = dict(_V4, yarn_factor=4.0, yarn_original_max_position=32)
SMALL_CSA = dict(_COMPRESSED, ratio=4, index_heads=16, index_head_dim=16, index_topk=3)
SMALL: dict[str, dict] = {
    "swa": _V4,
    "csa": SMALL_CSA,
    "hca": dict(_COMPRESSED, ratio=8),
    "gqa": dict(num_heads=4, num_kv_heads=2, head_dim=16, rope_fraction=0.5, query_chunk=6, gate="head",
                yarn_factor=4.0, yarn_original_max_position=16),  # Laguna's gate and YaRN
    "cca": dict(num_heads=4, num_kv_heads=2, head_dim=16, query_chunk=6),
    "mla": dict(num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                yarn_factor=4.0, yarn_original_max_position=32, yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
                query_chunk=6),
    "dsa": dict(num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                index_heads=16, index_head_dim=16, index_topk=5, query_chunk=6),
    # V4's modes on one backbone, best first: CSA at two top-k, HCA, window only; evaluated (and decoded) as CSA
    "elastic": dict(modes={"csa": dict(kind="csa", **SMALL_CSA),
                           "csa1": dict(kind="csa", **dict(SMALL_CSA, index_topk=1)),
                           "hca": dict(kind="hca", **_COMPRESSED, ratio=8), "window": dict(kind="swa", **_V4)}),
}
KINDS = list(registered())
HF_KINDS = [kind for kind, cls in registered().items() if cls.hf_layer_type is not None]


def small_spec(kind: str) -> AttentionSpec:
    return registered()[kind](**SMALL[kind])


def small_menu() -> AttentionConfig:
    """One entry per registered type, named by its kind."""
    return AttentionConfig(menu={kind: small_spec(kind) for kind in KINDS})


def _has(kind: str, field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(registered()[kind])}


def menu_overrides(**fixed: object) -> list[str]:
    """``small_menu`` as dot-list overrides (one whole entry each), with the ``fixed`` values for the fields
    an entry's kind has (they win over a base config's entries, which ``model.attention.common`` does not)."""
    def mode(settings: dict) -> dict:  # an elastic entry's mode gets the fixed values of its own kind
        return {**settings, **{k: v for k, v in fixed.items() if _has(settings["kind"], k)}}

    def entry(kind: str) -> str:
        fields = {"kind": kind, **SMALL[kind], **{k: v for k, v in fixed.items() if _has(kind, k)}}
        if "modes" in fields:
            fields["modes"] = {name: mode(m) for name, m in fields["modes"].items()}
        return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"
    return [f"model.attention.menu.{kind}={entry(kind)}" for kind in KINDS]


def every_entry(field: str, value: object) -> list[str]:
    """Dot-list overrides setting ``field`` in every ``menu_overrides`` entry (and elastic mode) whose kind has it."""
    modes = [f"{kind}.modes.{name}" for kind in KINDS for name, m in SMALL[kind].get("modes", {}).items()
             if _has(m["kind"], field)]
    return [f"model.attention.menu.{where}.{field}={value}"
            for where in [kind for kind in KINDS if _has(kind, field)] + modes]


# The attention mosaic as config overrides, for a menu that already has "csa" and "hca" entries: V4's CSA and
# HCA beside Gemma-style GQA layers (sliding, and global with k_eq_v and proportional RoPE), two of which read
# an earlier layer's K/V (kv_source). Default logit scale: Gemma's 1.0 with untrained q/k norms makes logits of
# ~head_dim and a softmax too peaked for multi-step exactness checks.
_GEMMA = "num_heads: 2, v_norm: true"
_GLOBAL = f"{_GEMMA}, num_kv_heads: 1, head_dim: 32, k_eq_v: true, rope_type: proportional, rope_fraction: 0.25"
MOSAIC = ["model.num_layers=6", "model.layer_types=[csa,sliding,hca,global,sliding_shared,global_shared]",
          "model.ffn_types=[dense,moe,moe,moe,moe,moe]",
          f"model.attention.menu.sliding={{kind: gqa, {_GEMMA}, head_dim: 16, window: 6}}",
          f"model.attention.menu.global={{kind: gqa, {_GLOBAL}}}",
          f"model.attention.menu.sliding_shared={{kind: gqa, {_GEMMA}, head_dim: 16, window: 6, kv_source: 1}}",
          f"model.attention.menu.global_shared={{kind: gqa, {_GLOBAL}, kv_source: 3}}"]
