"""Model families moesaic converts to and from transformers, and how one is chosen.

A family is one transformers architecture (DeepSeek-V4, Qwen3-MoE, Gemma 4 text, Laguna, ZAYA1, DeepSeek-V3 /
V3.2, GLM-MoE-DSA) answering four questions: which ModelConfig a config.json describes (``from_hf``), which
config.json a ModelConfig exports to (``to_hf``, refusing with a ConfigError naming the field it cannot
express), and where each tensor lives in a checkpoint (``names``, a ``tensor_map.NamePlan``). On import the family is
config.json's ``model_type``; on export it is the one ``family_for_model`` infers from the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from moesaic.configs import ConfigError, ModelConfig
from moesaic.model.attention import layer_specs

from .tensor_map import NamePlan


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def require_values(obj: Any, where: str, family: str, expected: list[tuple[str, Any]]) -> None:
    """Each (field, value) of ``obj`` (config path ``where``) must hold value, the only one ``family`` expresses."""
    for field, value in expected:
        actual = getattr(obj, field)
        require(actual == value, f"{where}.{field}={actual!r}: {family} needs {value!r}")


def shared_entry(cfg: ModelConfig, family: str, layers: range, varying: tuple[str, ...] = ()) -> tuple[str, Any]:
    """The menu entry (name, spec) of ``layers[0]``, which every one of ``layers`` must equal but for ``varying``
    fields: a config.json holds one value per attention key for them all."""
    specs = layer_specs(cfg)
    first = specs[layers[0]].architecture()
    for i in layers:
        other = specs[i].architecture()
        field = next((k for k in sorted(first.keys() | other.keys())
                      if k not in varying and first.get(k) != other.get(k)), None)
        require(field is None, f"model.attention.menu.{cfg.attention_type(i)} and model.attention.menu."
                               f"{cfg.attention_type(layers[0])} disagree on {field} ({other.get(field)!r} vs "
                               f"{first.get(field)!r}): a {family} config.json has one value for those layers")
    return cfg.attention_type(layers[0]), specs[layers[0]]


class ConfigReader:
    """Typed access to config.json keys; every problem names the key and the file."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        require(default is not ..., f"{self.source}: '{key}' is missing")
        return default

    def expect(self, key: str, allowed: Any, default: Any, why: str) -> None:
        value = self.get(key, default)
        require(value == allowed, f"{self.source}: {key}={value!r} is not supported ({why})")


class Family(ABC):
    """One transformers architecture: config mapping both ways and its checkpoint's tensor names."""

    name: ClassVar[str]  # for messages, e.g. "Qwen3-MoE"
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values this family reads

    @abstractmethod
    def claims(self, cfg: ModelConfig) -> bool:
        """Whether ``cfg`` has this family's shape (its attention and block layout): export then tries it."""

    @abstractmethod
    def from_hf(self, hf: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
        """The ModelConfig of a checkpoint with this config.json and these tensors."""

    @abstractmethod
    def to_hf(self, cfg: ModelConfig, dtype: str) -> dict[str, Any]:
        """The config.json exporting ``cfg`` (weights stored as ``dtype``); ConfigError naming a field it cannot
        express."""

    @abstractmethod
    def names(self, cfg: ModelConfig, tensor_names: frozenset[str] = frozenset()) -> NamePlan:
        """Where each tensor of a model of ``cfg`` lives (``tensor_names``: a checkpoint's, to pick its layout)."""

    def constant_tensors(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (transformers name -> value) that export writes for parts the family always has
        but a model of ``cfg`` lacks (DeepSeek-V4's mHC around a plain residual)."""
        return {}


def families() -> list[Family]:
    """The families in the order export tries them: the first that claims a config exports it."""
    from .deepseek_v3 import DeepSeekV3, DeepSeekV32, GlmMoeDsa
    from .deepseek_v4 import DeepSeekV4
    from .gemma4 import Gemma4
    from .laguna import Laguna
    from .qwen3_moe import Qwen3Moe
    from .zaya import Zaya

    return [Zaya(), Gemma4(), Laguna(), Qwen3Moe(), DeepSeekV32(), GlmMoeDsa(), DeepSeekV3(), DeepSeekV4()]


def family_for_hf(hf: dict[str, Any], source: str) -> Family:
    """The family of a config.json, by its model_type."""
    model_type = hf.get("model_type")
    for family in families():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in families() for t in f.model_types)
    raise ConfigError(f"{source}: model_type={model_type!r} is not a family moesaic converts ({known})")


def family_for_model(cfg: ModelConfig) -> Family:
    """The family whose shape ``cfg`` has (the last one, DeepSeek-V4, claims every other config); its
    ``to_hf`` then names the field that stops an export."""
    return next(f for f in families() if f.claims(cfg))
