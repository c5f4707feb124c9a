"""DeepSeek-V4 tensor names: moesaic's (the official DeepSeek-V4 names) <-> transformers' (MODEL_SPEC §13.1).

Everything maps one to one except:

* routed experts: moesaic's stacked ``ffn.experts.w1``/``w3`` [E, I, D] are the gate and up
  halves of transformers' fused ``mlp.experts.gate_up_proj`` [E, 2I, D] (gate first);
* a hash layer (one with ``ffn.gate.tid2eid``) has no selection bias in transformers, so its
  ``expert_bias`` (always zero in moesaic) is not written, and is zero when read back;
* MTP blocks, which transformers does not build (it skips ``mtp.*`` on load), are written as
  ``mtp.{i}.`` + the same in-block names as ``model.layers.{i}.``, plus ``e_proj``, ``h_proj``,
  ``enorm``, ``hnorm``, ``norm`` and ``hc_head.hc_{fn,base,scale}``.

Reading also accepts what transformers' own ``save_pretrained`` writes (it reverts part of its
load-time renaming): ``head.weight`` for the head and per-expert ``mlp.experts.{e}.w{1,2,3}.weight``.
"""

from __future__ import annotations

import re

import torch

from moesaic.configs import ModelConfig

from ..attention import registered
from .safetensors_io import ConversionError
from .tensor_map import ExpertLayout, NamePlan, split_scope

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.expert_bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.experts.w1": "mlp.experts.gate_up_proj",
    "ffn.experts.w3": "mlp.experts.gate_up_proj",
    "ffn.experts.w2": "mlp.experts.down_proj",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    # Each attention type names its own tensors (AttentionSpec.hf_names).
    **{f"attn.{ours}": f"self_attn.{theirs}" for spec in registered().values()
       for ours, theirs in spec.hf_names.items()},
}
_MTP = {**_BLOCK, **{n: n for n in ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight")},
        "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale"}
_MTP_KEY = re.compile(r"^mtp\.(\d+)\.")


def count_mtp_blocks(keys: set[str]) -> int:
    """Number of MTP blocks a transformers checkpoint holds weights for (``mtp.0`` ... contiguous)."""
    found = {int(m.group(1)) for k in keys if (m := _MTP_KEY.match(k))}
    if found != set(range(len(found))):
        raise ConversionError(f"MTP blocks {sorted(found)} are not numbered 0..{len(found) - 1}")
    return len(found)


def _checked_table(table: torch.Tensor, key: str, num_experts: int) -> torch.Tensor:
    """A hash table must name experts that exist, k distinct ones per token id."""
    if table.numel() and (table.min() < 0 or table.max() >= num_experts):
        raise ConversionError(f"tensor '{key}' routes to expert {int(table.max())} or {int(table.min())}, "
                              f"outside the {num_experts} experts")
    if (table.sort(dim=1).values.diff(dim=1) == 0).any():
        raise ConversionError(f"tensor '{key}' routes some token to the same expert twice")
    return table


class DeepSeekV4Names(NamePlan):
    """The tensor names of a DeepSeek-V4 model of ``cfg`` (see the module doc)."""

    experts = ExpertLayout(("w1.weight", "w3.weight", "w2.weight"))

    def __init__(self, cfg: ModelConfig) -> None:
        self.num_hash_layers, self.num_experts = cfg.moe.num_hash_layers, cfg.moe.num_experts

    def keys(self, native: str) -> list[str]:
        kind, i, rest = split_scope(native)
        if kind == "layers" and i < self.num_hash_layers and rest == "ffn.gate.expert_bias":
            return []  # a hash layer has no selection bias in transformers
        table = {"": _TOP, "layers": _BLOCK, "mtp": _MTP}[kind]
        if rest not in table:
            raise ConversionError(f"moesaic tensor '{native}' has no DeepSeek-V4 (transformers) counterpart")
        prefix = {"": "", "layers": f"model.layers.{i}.", "mtp": f"mtp.{i}."}[kind]
        # transformers' own save_pretrained writes the head as head.weight
        return [prefix + table[rest], *(["head.weight"] if native == "head.weight" else [])]

    def checked(self, native: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        return _checked_table(tensor, key, self.num_experts) if native.endswith("ffn.gate.tid2eid") else tensor
