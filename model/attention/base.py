"""The attention-type protocol and its registry: what the rest of moesaic may ask of an attention type.

An attention type is one module under ``model/attention/`` holding a config dataclass that
subclasses ``AttentionSpec`` and is registered under its ``kind`` with ``@register``. The config
(``model.attention.menu.<name>: {kind: ..., <that kind's fields>}``) is parsed into that dataclass,
and the dataclass answers for its layers everything moesaic outside this package needs: validation,
the layer module, KV bytes, FLOPs, sequence-parallel alignment and the Hugging Face mapping. So no
code outside ``model/attention/`` branches on a type's name, and a type that misses a method fails
at ``@register`` (class definition), not with a silent zero somewhere else.

Layer modules subclass ``AttentionLayer``: ``forward(x, ctx)`` with a ``ForwardContext`` (context.py)
and ``make_cache`` for decoding.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, ABCMeta, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from moesaic.configs import ConfigError

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig

    from .context import ForwardContext


class HFReader(ABC):
    """The view of a transformers ``config.json`` that ``AttentionSpec.from_hf`` reads (model/interop)."""

    source: str  # the file, for error lines
    rope: dict[str, Any]  # parsed RoPE settings: rope_head_dim, rope_theta, compress_rope_theta, yarn_*
    rates: dict[str, int]  # compression ratio per transformers layer type

    @abstractmethod
    def get(self, key: str, default: Any = ...) -> Any:
        """The value of ``key``; ``default`` when missing (no default: a ConfigError naming key and file)."""


@dataclasses.dataclass
class AttentionSpec(ABC):
    """One menu entry: a type's fields, and the answers the rest of moesaic needs about its layers.

    Subclasses are dataclasses that set the default of ``kind`` to their registered name.
    """

    kind: str = ""

    hf_layer_type: ClassVar[Optional[str]] = None  # transformers' name of the layer type; None: not exportable
    # In-layer tensor names: moesaic ("attn." + key) -> transformers ("self_attn." + value).
    hf_names: ClassVar[dict[str, str]] = {}
    not_architecture: ClassVar[frozenset[str]] = frozenset({"kind"})  # fields that change no weight and no output

    @abstractmethod
    def check(self, where: str, seq_len: int) -> None:
        """Raise ConfigError naming ``where``.field for a bad value (``seq_len``: the training length)."""

    def check_in_model(self, where: str, layer: int, specs: list[AttentionSpec], num_layers: int) -> None:
        """Raise ConfigError for a choice that involves other layers (``specs``: every layer's, decoder
        layers first, then MTP blocks) at ``layer``; most types have none."""

    @abstractmethod
    def build(self, model: ModelConfig, layer_idx: int) -> AttentionLayer:
        """The layer module of this entry at ``layer_idx``."""

    @abstractmethod
    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        """Decode-cache bytes of one sequence of ``tokens`` tokens: (window part, compressed part)."""

    @abstractmethod
    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        """Bytes per token of this layer's keys/values kept for every token (no window, no compression)."""

    @abstractmethod
    def flops_per_token(self, seq_len: int) -> float:
        """Forward + backward attention FLOPs per trained token at ``seq_len`` (projections not included)."""

    @abstractmethod
    def sp_alignment(self, where: str) -> int:
        """Every sequence shard must start at a multiple of this; raise ConfigError if the type cannot shard."""

    @abstractmethod
    def to_hf(self, where: str) -> dict[str, Any]:
        """This layer's keys of transformers' config.json (layers of one model must agree on shared keys);
        ConfigError naming ``where``.field for a value config.json cannot express."""

    @classmethod
    @abstractmethod
    def from_hf(cls, hf: HFReader) -> AttentionSpec:
        """The entry of this type described by a transformers config.json."""

    def with_common(self, where: str, common: Mapping[str, Any]) -> AttentionSpec:
        """This entry with the entries it holds parsed under ``common`` too (an elastic entry's modes)."""
        return self

    def own_kv(self) -> AttentionSpec:
        """This entry as it would be computing its own keys/values (itself, unless it reads another layer's)."""
        return self

    def architecture(self) -> dict[str, Any]:
        """The fields that decide weights and outputs (a checkpoint of one layer fits another iff equal)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.not_architecture}

    def summary(self) -> str:
        """One line for ``moesaic config``: kind and the fields that differ from the type's defaults."""
        default = type(self)()
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if f.name != "kind" and getattr(self, f.name) != getattr(default, f.name)]
        return " ".join([self.kind, *changed])


class AttentionLayer(nn.Module, metaclass=ABCMeta):
    """An attention layer module: ``forward(x [B,S,D], ctx) -> (out [B,S,D], aux_loss scalar)``."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    @abstractmethod
    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over ``ctx``'s view of the sequence (a shard of it under SP) or its decode cache
        (no ``ctx``: the whole sequence, no cache)."""

    @abstractmethod
    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Any:
        """Empty decode state for this layer."""


_TYPES: dict[str, type[AttentionSpec]] = {}


def register(cls: type[AttentionSpec]) -> type[AttentionSpec]:
    """Class decorator (outermost, above ``@dataclass``) adding a complete attention type to the registry."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"attention type {cls.__name__} does not implement {', '.join(missing)}")
    kind = cls.__dataclass_fields__["kind"].default
    if not kind or kind in _TYPES:
        raise TypeError(f"attention type {cls.__name__}: kind {kind!r} is empty or registered twice")
    _TYPES[kind] = cls
    return cls


def registered() -> dict[str, type[AttentionSpec]]:
    """kind -> spec class, in registration order."""
    return dict(_TYPES)


def spec_for_hf(hf_layer_type: str) -> Optional[type[AttentionSpec]]:
    return next((cls for cls in _TYPES.values() if cls.hf_layer_type == hf_layer_type), None)


def parse_entry(name: str, entry: Any, common: Mapping[str, Any]) -> AttentionSpec:
    """Menu entry ``name`` (a mapping with ``kind``, or an ``AttentionSpec`` as is) -> its typed spec.

    ``common`` fills the fields of the entry's kind that the mapping does not set. Types and
    unknown keys are checked by omegaconf against the kind's dataclass.
    """
    if isinstance(entry, AttentionSpec):
        return entry
    where = f"model.attention.menu.{name}"
    kinds = ", ".join(_TYPES)
    if not isinstance(entry, Mapping) or "kind" not in entry:
        raise ConfigError(f"{where} needs a 'kind' (one of: {kinds})")
    cls = _TYPES.get(entry["kind"])
    if cls is None:
        raise ConfigError(f"{where}.kind='{entry['kind']}' is not an attention type (choose one of: {kinds})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{where}.{unknown[0]}': kind {entry['kind']} takes "
                          f"{', '.join(sorted(names - {'kind'}))}")
    values = {**{k: v for k, v in common.items() if k in names}, **entry}
    try:
        spec: AttentionSpec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))  # type: ignore
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad value for '{where}.{getattr(exc, 'key', '?')}': {str(exc).splitlines()[0]}") from None
    return spec.with_common(name, common)


def resolve_menu(cfg: ModelConfig) -> dict[str, AttentionSpec]:
    """Every menu entry of ``cfg`` as its typed spec."""
    a = cfg.attention
    return {name: parse_entry(name, entry, a.common) for name, entry in a.menu.items()}


def layer_specs(cfg: ModelConfig) -> list[AttentionSpec]:
    """The spec of every layer: the decoder layers, then the MTP blocks."""
    menu = resolve_menu(cfg)
    return [menu[cfg.attention_type(i)] for i in range(cfg.num_layers + cfg.mtp_layers)]


def describe_layers(cfg: ModelConfig) -> list[str]:
    """Per menu entry in use: the layers using it and its resolved kind and non-default fields."""
    menu, layers = resolve_menu(cfg), {}
    for i in range(cfg.num_layers + cfg.mtp_layers):
        layers.setdefault(cfg.attention_type(i), []).append(str(i))
    return [f"{name} (layers {','.join(idx)}): {menu[name].summary()}" for name, idx in layers.items()]


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_positive(where: str, spec: AttentionSpec, names: list[str]) -> None:
    for name in names:
        value = getattr(spec, name)
        require(value > 0, f"{where}.{name}={value} must be > 0")


def mean_over_positions(seq_len: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Mean over query positions t < seq_len of fn(t) (a tensor expression of positions): keys a query sees."""
    return fn(torch.arange(seq_len, dtype=torch.float64)).mean().item()


def causal_keys(seq_len: int, window: int = 0) -> float:
    """Mean keys a causal query sees over positions t < seq_len: itself and every earlier token, at most the
    last ``window`` of them (0: no window)."""
    return mean_over_positions(seq_len, lambda t: (t + 1).clamp(max=window) if window else t + 1)
