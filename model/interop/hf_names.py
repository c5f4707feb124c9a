"""Tensor names and layouts: moesaic's (the official DeepSeek-V4 names) <-> transformers' (MODEL_SPEC §13.1).

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
from typing import Callable

import torch

from ..attention import registered
from .safetensors_io import ConversionError, SafetensorsDir, TensorPlan

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
_FUSED_HALF = {"ffn.experts.w1": 0, "ffn.experts.w3": 1}  # half of gate_up_proj along dim 1
_SCOPED = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_MTP_KEY = re.compile(r"^mtp\.(\d+)\.")

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # native name -> (shape, dtype)


def _split(native: str) -> tuple[str, str]:
    """native name -> (transformers prefix, in-scope native suffix); top-level names have no scope."""
    m = _SCOPED.match(native)
    if m is None:
        return "", native
    kind, i, rest = m.groups()
    return (f"model.layers.{i}." if kind == "layers" else f"mtp.{i}."), rest


def hf_name(native: str) -> str:
    """transformers' name of a moesaic tensor (for w1/w3: the fused tensor they are halves of)."""
    prefix, rest = _split(native)
    table = _TOP if not prefix else (_BLOCK if prefix.startswith("model.") else _MTP)
    if rest not in table:
        raise ConversionError(f"moesaic tensor '{native}' has no DeepSeek-V4 (transformers) counterpart")
    return prefix + table[rest]


def _is_hash_bias(native: str, names: set[str]) -> bool:
    return native.endswith("ffn.gate.expert_bias") and native.replace("expert_bias", "tid2eid") in names


def count_mtp_blocks(keys: set[str]) -> int:
    """Number of MTP blocks a transformers checkpoint holds weights for (``mtp.0`` ... contiguous)."""
    found = {int(m.group(1)) for k in keys if (m := _MTP_KEY.match(k))}
    if found != set(range(len(found))):
        raise ConversionError(f"MTP blocks {sorted(found)} are not numbered 0..{len(found) - 1}")
    return len(found)


def hf_plans(source: Callable[[str], torch.Tensor], native: Shapes) -> list[TensorPlan]:
    """What to write for transformers, read lazily from ``source`` (native name -> tensor)."""
    plans, names = [], set(native)
    for name, (shape, dtype) in native.items():
        if _is_hash_bias(name, names) or name.endswith("ffn.experts.w3"):
            continue  # no counterpart / written with w1
        if name.endswith("ffn.experts.w1"):
            up = name[:-1] + "3"
            plans.append(TensorPlan(hf_name(name), dtype, (shape[0], 2 * shape[1], *shape[2:]),
                                    lambda name=name, up=up: torch.cat([source(name), source(up)], dim=1)))
        else:
            plans.append(TensorPlan(hf_name(name), dtype, shape, lambda name=name: source(name)))
    return plans


def _checked_table(table: torch.Tensor, key: str, num_experts: int) -> torch.Tensor:
    """A hash table must name experts that exist, k distinct ones per token id."""
    if table.numel() and (table.min() < 0 or table.max() >= num_experts):
        raise ConversionError(f"tensor '{key}' routes to expert {int(table.max())} or {int(table.min())}, "
                              f"outside the {num_experts} experts")
    if (table.sort(dim=1).values.diff(dim=1) == 0).any():
        raise ConversionError(f"tensor '{key}' routes some token to the same expert twice")
    return table


class _HFReader:
    """Fetch the transformers tensor(s) behind one native name, checking the shape it must have."""

    def __init__(self, src: SafetensorsDir, native: Shapes) -> None:
        self.src, self.native, self.used = src, native, set()

    def _check(self, key: str, shape: tuple[int, ...], expected: tuple[int, ...], native: str) -> None:
        if shape != expected:
            raise ConversionError(f"tensor '{key}' in {self.src.directory} has shape {list(shape)}, but the "
                                  f"config implies {list(expected)} (moesaic '{native}')")

    def plan(self, native: str, shape: tuple[int, ...], names: set[str]) -> TensorPlan:
        if _is_hash_bias(native, names):
            return TensorPlan(native, torch.float32, shape, lambda: torch.zeros(shape))
        key = hf_name(native)
        if native == "head.weight" and key not in self.src and "head.weight" in self.src:
            key = "head.weight"
        prefix, rest = _split(native)
        if rest.startswith("ffn.experts.") and key not in self.src:
            return self._per_expert(native, prefix, shape)
        if key not in self.src:
            raise ConversionError(f"tensor '{key}' is missing from the checkpoint in {self.src.directory} "
                                  f"(needed for moesaic '{native}')")
        self.used.add(key)
        if rest in _FUSED_HALF:
            self._check(key, self.src.shape(key), (shape[0], 2 * shape[1], *shape[2:]), native)
            half = slice(_FUSED_HALF[rest] * shape[1], (_FUSED_HALF[rest] + 1) * shape[1])
            return TensorPlan(native, self.src.dtype(key), shape, lambda: self.src.get(key, (slice(None), half)))
        self._check(key, self.src.shape(key), shape, native)
        if rest == "ffn.gate.tid2eid":
            experts = self.native[native.replace("tid2eid", "weight")][0][0]
            return TensorPlan(native, self.src.dtype(key), shape,
                              lambda: _checked_table(self.src.get(key), key, experts))
        return TensorPlan(native, self.src.dtype(key), shape, lambda: self.src.get(key))

    def _per_expert(self, native: str, prefix: str, shape: tuple[int, ...]) -> TensorPlan:
        """The layout transformers' save_pretrained writes: mlp.experts.{e}.w{1,2,3}.weight."""
        keys = [f"{prefix}mlp.experts.{e}.{native.rsplit('.', 1)[1]}.weight" for e in range(shape[0])]
        for key in keys:
            if key not in self.src:
                raise ConversionError(f"tensor '{key}' is missing from the checkpoint in {self.src.directory} "
                                      f"(needed for moesaic '{native}')")
            self._check(key, self.src.shape(key), shape[1:], native)
        self.used.update(keys)
        return TensorPlan(native, self.src.dtype(keys[0]), shape, lambda: torch.stack([self.src.get(k) for k in keys]))


def native_plans(src: SafetensorsDir, native: Shapes) -> list[TensorPlan]:
    """What to read for each native tensor from a transformers checkpoint; every checkpoint tensor
    must be used, so a checkpoint with more layers, experts or blocks than its config is refused."""
    reader, names = _HFReader(src, native), set(native)
    plans = [reader.plan(name, shape, names) for name, (shape, _) in native.items()]
    unused = sorted(src.keys() - reader.used)
    if unused:
        raise ConversionError(f"tensor '{unused[0]}' in {src.directory} has no place in the model its config.json "
                              f"describes ({len(unused)} such tensors)")
    return plans
