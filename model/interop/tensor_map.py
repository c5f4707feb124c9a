"""Where each native tensor lives in a transformers checkpoint, and the plans that move one tensor at a time.

A family's ``NamePlan`` gives, per native name, the transformers keys that may hold it; ``read_plans``
and ``write_plans`` turn that into ``TensorPlan``s. Routed experts are the one many-to-one case:
moesaic's stacked ``ffn.experts.w1``/``w3`` [E, I, D] (gate, up) and ``w2`` [E, D, I] are either the
fused ``gate_up_proj`` [E, 2I, D] (gate first) and ``down_proj`` [E, D, I], or one matrix per expert
(what ``save_pretrained`` writes for the families transformers fuses on load, MOSAIC_SPEC §0.4).
Reading accepts both layouts; writing uses the family's (``ExpertLayout.write_fused``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .safetensors_io import ConversionError, SafetensorsDir, TensorPlan

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]  # native name -> (shape, dtype)
Source = Callable[[str, Optional[tuple]], torch.Tensor]  # native name, index -> (that part of) the tensor

_SCOPED = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERTS = re.compile(r"(^|\.)experts\.w([132])$")  # routed experts' stacked gate, up, down (ffn. or ffn.moe.)
_PARTS = {"1": 0, "3": 1, "2": 2}


def expert_part(native: str) -> Optional[int]:
    """0, 1, 2 for a layer's stacked routed-expert gate, up, down weight; None for any other tensor."""
    m = _EXPERTS.search(native)
    return _PARTS[m.group(2)] if m else None


def split_scope(native: str) -> tuple[str, int, str]:
    """native name -> (``layers``/``mtp``, block index, in-block name); top-level names give ("", -1, name)."""
    m = _SCOPED.match(native)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else ("", -1, native)


@dataclass(frozen=True)
class ExpertLayout:
    """A family's per-expert names of gate, up and down (under ``<experts>.{e}.``), and which layout it writes."""

    per_expert: tuple[str, str, str]
    write_fused: bool = True


class NamePlan(ABC):
    """One model's tensor names in one family's checkpoint; families implement ``keys`` and may override the hooks."""

    experts = ExpertLayout(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))

    @abstractmethod
    def keys(self, native: str) -> list[str]:
        """The keys that may hold ``native``, tried in order (the first is written); for routed experts the
        fused tensor's (its per-expert matrices sit beside it). [] = not stored: reads as zeros, and
        exports only if zero."""

    def write_key(self, native: str) -> Optional[str]:
        """The key ``native`` is written under; None: not written (not stored, or tied to another)."""
        keys = self.keys(native)
        return keys[0] if keys else None

    def ignored(self, key: str) -> bool:
        """A checkpoint tensor with no place in the model that the family drops without complaint."""
        return False

    def checked(self, native: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Validate a tensor's values as it is read (raise ConversionError naming ``key``)."""
        return tensor


def _per_expert_keys(fused: str, part: int, layout: ExpertLayout, num_experts: int) -> list[str]:
    base = fused.rsplit(".", 1)[0]
    return [f"{base}.{e}.{layout.per_expert[part]}" for e in range(num_experts)]


class _Reader:
    """Fetch the checkpoint tensor(s) behind one native name, checking the shape it must have."""

    def __init__(self, plan: NamePlan, src: SafetensorsDir) -> None:
        self.plan, self.src, self.used = plan, src, set()

    def _check(self, key: str, expected: tuple[int, ...], native: str) -> None:
        shape = self.src.shape(key)
        if shape != expected:
            raise ConversionError(f"tensor '{key}' in {self.src.directory} has shape {list(shape)}, but the "
                                  f"config implies {list(expected)} (moesaic '{native}')")

    def _missing(self, key: str, native: str) -> ConversionError:
        return ConversionError(f"tensor '{key}' is missing from the checkpoint in {self.src.directory} "
                               f"(needed for moesaic '{native}')")

    def plan_for(self, native: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorPlan:
        keys = self.plan.keys(native)
        if not keys:
            return TensorPlan(native, dtype, shape, lambda: torch.zeros(shape, dtype=dtype))
        key = next((k for k in keys if k in self.src), None)
        part = expert_part(native)
        if part is not None and key is None:
            return self._per_expert(native, keys, part, shape)
        if key is None:
            raise self._missing(keys[0], native)
        self.used.add(key)
        if part in (0, 1):  # a half of gate_up_proj along dim 1
            self._check(key, (shape[0], 2 * shape[1], *shape[2:]), native)
            half = (slice(None), slice(part * shape[1], (part + 1) * shape[1]))
            return TensorPlan(native, self.src.dtype(key), shape, lambda: self.src.get(key, half))
        self._check(key, shape, native)
        return TensorPlan(native, self.src.dtype(key), shape,
                          lambda: self.plan.checked(native, key, self.src.get(key)))

    def _per_expert(self, native: str, fused: list[str], part: int, shape: tuple[int, ...]) -> TensorPlan:
        layout = self.plan.experts
        keys = next((ks for f in fused if (ks := _per_expert_keys(f, part, layout, shape[0]))[0] in self.src), None)
        if keys is None:
            raise self._missing(fused[0], native)
        for key in keys:
            if key not in self.src:
                raise self._missing(key, native)
            self._check(key, shape[1:], native)
        self.used.update(keys)
        return TensorPlan(native, self.src.dtype(keys[0]), shape, lambda: torch.stack([self.src.get(k) for k in keys]))


def read_plans(plan: NamePlan, src: SafetensorsDir, native: Shapes) -> list[TensorPlan]:
    """What to read for each native tensor; every checkpoint tensor must be used (or ignored by the family),
    so a checkpoint with more layers, experts or blocks than its config is refused."""
    reader = _Reader(plan, src)
    plans = [reader.plan_for(name, shape, dtype) for name, (shape, dtype) in native.items()]
    unused = sorted(k for k in src.keys() - reader.used if not plan.ignored(k))
    if unused:
        raise ConversionError(f"tensor '{unused[0]}' in {src.directory} has no place in the model its config.json "
                              f"describes ({len(unused)} such tensors)")
    return plans


def write_plans(plan: NamePlan, source: Source, native: Shapes) -> list[TensorPlan]:
    """What to write for transformers, read lazily from ``source``."""
    out = []
    for name, (shape, dtype) in native.items():
        key = plan.write_key(name)
        part = expert_part(name)
        if key is None or (part == 1 and plan.experts.write_fused):
            continue  # not stored, or written with its gate half
        if part is None or (part == 2 and plan.experts.write_fused):
            out.append(TensorPlan(key, dtype, shape, lambda name=name: source(name, None)))
        elif plan.experts.write_fused:
            up = name[:-1] + "3"
            out.append(TensorPlan(key, dtype, (shape[0], 2 * shape[1], *shape[2:]),
                                  lambda name=name, up=up: torch.cat([source(name, None), source(up, None)], dim=1)))
        else:
            for e, expert_key in enumerate(_per_expert_keys(key, part, plan.experts, shape[0])):
                out.append(TensorPlan(expert_key, dtype, shape[1:],
                                      lambda name=name, e=e: source(name, (slice(e, e + 1),))[0].contiguous()))
    return out


def unstored(plan: NamePlan, native: Shapes) -> list[str]:
    """Native tensors the family's checkpoint has no place for (they export only when zero)."""
    return [name for name in native if not plan.keys(name)]


# Llama-style names that Qwen3-MoE and Gemma 4 share: gqa attention and the dense (gated) MLP, in-block.
GQA_NAMES = {f"attn.{n}.weight": f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
                                                                     "k_norm")}
MLP_NAMES = {"ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w3.weight": "mlp.up_proj.weight",
             "ffn.w2.weight": "mlp.down_proj.weight"}


class TableNames(NamePlan):
    """Names from two tables, top-level and in-block (None: not stored), under one of ``prefixes`` (the body's
    ``model.``; the first is written). A tied head is read from the embedding and not written."""

    family = ""
    top: dict[str, Optional[str]] = {}
    block: dict[str, Optional[str]] = {}

    def __init__(self, tied: bool, prefixes: tuple[str, ...] = ("model.",)) -> None:
        self.tied, self.prefixes = tied, prefixes

    def keys(self, native: str) -> list[str]:
        kind, i, rest = split_scope(native)
        table = self.block if kind == "layers" else self.top
        if kind == "mtp" or rest not in table:
            raise ConversionError(f"moesaic tensor '{native}' has no {self.family} (transformers) counterpart")
        theirs = table[rest]
        if theirs is None:
            return []
        scoped = f"layers.{i}.{theirs}" if kind else theirs
        if native == "head.weight":
            return [theirs, *(self.keys("embed.weight") if self.tied else [])]
        return [p + scoped for p in self.prefixes]

    def write_key(self, native: str) -> Optional[str]:
        return None if self.tied and native == "head.weight" else super().write_key(native)
