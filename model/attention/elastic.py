"""Elastic attention: one layer holding several modes on one backbone, switched per training step or per call.

An ``elastic`` entry names its modes, each an ordinary menu entry of another kind (``modes.<name>:
{kind: ..., <fields>}``, filled from ``model.attention.common`` like any entry); e.g. for V4 a
window-only SWA, CSA at top-k 8, CSA at top-k 2 and HCA. The layer builds each mode's own layer
module (so every mode runs that type's code, unchanged) and ties the parameters that have the same
name and shape in two modes: the backbone (queries, the K=V projection, output, sink) is one set of
weights, CSA at two top-k values is one module's weights, and only what a mode alone has (a
compressor, an indexer) is its own.

Training draws each layer's mode per optimizer step from ``mode_weights`` with a generator seeded
by (train.seed, step, layer), so every rank of an EP/SP run draws the same modes and a resumed run
the same schedule (``draw_modes``, called by the trainer); the share of steps per mode is logged
(``mode_shares``). Forwards without gradients (evaluation, decoding) run ``inference_mode``: ``eval_mode`` by
default, or what a budget controller chose for the call (``model/budget.py: fit_modes``). KV bytes and the
decode cache are the inference mode's; FLOPs per trained token are the draw-weighted mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from moesaic.configs import ConfigError

from .base import AttentionLayer, AttentionSpec, HFReader, parse_entry, register, require
from .context import ForwardContext

if TYPE_CHECKING:
    from moesaic.configs.schema import ModelConfig


@register
@dataclass
class ElasticSpec(AttentionSpec):
    kind: str = "elastic"
    modes: dict[str, Any] = field(default_factory=dict)  # mode name -> a menu entry ({kind: ..., fields})
    mode_weights: dict[str, float] = field(default_factory=dict)  # training draw odds per mode; empty = uniform
    mode_costs: dict[str, float] = field(default_factory=dict)  # controller's cost per mode; empty = list order
    eval_mode: str = ""  # mode of evaluation and of decoding without a budget; "" = the first mode

    not_architecture = frozenset({"kind", "mode_weights", "mode_costs", "eval_mode"})

    def with_common(self, where: str, common: Mapping[str, Any]) -> ElasticSpec:
        return replace(self, modes={m: parse_entry(f"{where}.modes.{m}", e, common) for m, e in self.modes.items()})

    def mode_specs(self) -> dict[str, AttentionSpec]:
        """Each mode's spec (entries given as mappings are parsed here, without ``common``)."""
        return {m: parse_entry(f"elastic.modes.{m}", e, {}) for m, e in self.modes.items()}

    def default_mode(self) -> str:
        return self.eval_mode or next(iter(self.modes))

    def _default(self) -> AttentionSpec:
        return self.mode_specs()[self.default_mode()]

    def weights(self) -> list[float]:
        """Training draw probabilities in mode order."""
        raw = [float(self.mode_weights.get(m, 0.0)) if self.mode_weights else 1.0 for m in self.modes]
        return [w / sum(raw) for w in raw]

    def mode_cost(self, mode: str) -> float:
        """The controller's predicted cost of running ``mode`` (list position unless ``mode_costs`` says)."""
        return float(self.mode_costs[mode]) if self.mode_costs else float(list(self.modes).index(mode))

    def summary(self) -> str:
        return "elastic " + "; ".join(f"{m}: {s.summary()}" for m, s in self.mode_specs().items())

    def check(self, where: str, seq_len: int) -> None:
        require(len(self.modes) > 0, f"{where}.modes must name at least one mode")
        for name, spec in self.mode_specs().items():
            require(name.isidentifier(), f"{where}.modes.{name}: a mode name must be an identifier")
            require(not isinstance(spec, ElasticSpec), f"{where}.modes.{name}: a mode cannot be elastic itself")
            require(spec.own_kv() == spec, f"{where}.modes.{name}: a mode cannot read another layer's K/V")
            spec.check(f"{where}.modes.{name}", seq_len)
        for label, values in (("mode_weights", self.mode_weights), ("mode_costs", self.mode_costs)):
            for name in values:
                require(name in self.modes, f"{where}.{label}.{name} is not a mode ({', '.join(self.modes)})")
        if self.mode_costs:
            require(set(self.mode_costs) == set(self.modes), f"{where}.mode_costs must give every mode a cost")
        require(all(w >= 0 for w in self.mode_weights.values()) and
                (not self.mode_weights or sum(self.mode_weights.values()) > 0),
                f"{where}.mode_weights must be >= 0 with a positive sum")
        require(not self.eval_mode or self.eval_mode in self.modes,
                f"{where}.eval_mode='{self.eval_mode}' is not a mode ({', '.join(self.modes)})")

    def build(self, model: ModelConfig, layer_idx: int) -> ElasticAttention:
        return ElasticAttention(self, model, layer_idx)

    def kv_bytes(self, tokens: int, fmt: str, index_fmt: str) -> tuple[float, float]:
        return self._default().kv_bytes(tokens, fmt, index_fmt)

    def dense_kv_bytes_per_token(self, fmt: str) -> float:
        return self._default().dense_kv_bytes_per_token(fmt)

    def flops_per_token(self, seq_len: int) -> float:
        specs = self.mode_specs().values()
        return sum(w * s.flops_per_token(seq_len) for w, s in zip(self.weights(), specs))

    def sp_alignment(self, where: str) -> int:
        return math.lcm(*(s.sp_alignment(f"{where}.modes.{m}") for m, s in self.mode_specs().items()))

    def to_hf(self, where: str) -> dict[str, Any]:
        raise ConfigError(f"{where}: elastic layers have no transformers equivalent; export a fixed layout "
                          f"(moesaic budget writes one)")

    @classmethod
    def from_hf(cls, hf: HFReader) -> ElasticSpec:
        raise ConfigError(f"{hf.source}: transformers has no elastic attention layers")


def draw_modes(model: nn.Module, step: int, seed: int) -> None:
    """Draw every elastic layer's training mode for optimizer step ``step`` (the trainer, before the step)."""
    for module in model.modules():
        if isinstance(module, ElasticAttention):
            module.begin_step(step, seed)


def mode_shares(model: nn.Module) -> dict[int, dict[str, float]]:
    """Per elastic layer, the share of steps trained in each mode since the last call."""
    return {m.layer_idx: m.window_metrics() for m in model.modules() if isinstance(m, ElasticAttention)}


def _tie_shared(modes: nn.ModuleDict) -> None:
    """Make every parameter of a later mode with the name and shape of an earlier mode's that parameter."""
    first: dict[tuple[str, tuple[int, ...]], nn.Parameter] = {}
    for mode in modes.values():
        for name, p in list(mode.named_parameters()):
            key = (name, tuple(p.shape))
            if key not in first:
                first[key] = p
                continue
            owner, _, leaf = name.rpartition(".")
            setattr(mode.get_submodule(owner) if owner else mode, leaf, first[key])


class ElasticAttention(AttentionLayer):
    """The modes' layer modules (``modes.<name>``, tied weights); forward runs the active one."""

    def __init__(self, spec: ElasticSpec, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(layer_idx)
        self.spec = spec
        self.modes = nn.ModuleDict({m: s.build(cfg, layer_idx) for m, s in spec.mode_specs().items()})
        _tie_shared(self.modes)
        self.training_mode = self.inference_mode = spec.default_mode()
        self.steps_in_mode = dict.fromkeys(spec.modes, 0)  # since the last ``window_metrics``

    def begin_step(self, step: int, seed: int) -> None:
        """Draw this layer's training mode for optimizer step ``step`` (the same on every rank)."""
        rng = np.random.default_rng([seed, step, self.layer_idx])
        self.training_mode = list(self.spec.modes)[rng.choice(len(self.spec.modes), p=self.spec.weights())]
        self.steps_in_mode[self.training_mode] += 1

    def window_metrics(self) -> dict[str, float]:
        """Share of the steps since the last call trained in each mode (``mode/<name>``); resets the counts."""
        total = sum(self.steps_in_mode.values())
        out = {f"mode/{m}": n / total for m, n in self.steps_in_mode.items()} if total else {}
        self.steps_in_mode = dict.fromkeys(self.steps_in_mode, 0)
        return out

    def set_mode(self, mode: Optional[str]) -> None:
        """The mode of evaluation and decoding (None: ``eval_mode``)."""
        if mode is not None and mode not in self.modes:
            raise ConfigError(f"layer {self.layer_idx}: '{mode}' is not an elastic mode ({', '.join(self.modes)})")
        self.inference_mode = mode or self.spec.default_mode()

    def active(self) -> nn.Module:
        """The drawn mode in a training forward (train mode, gradients on); else the inference mode."""
        training = self.training and torch.is_grad_enabled()
        return self.modes[self.training_mode if training else self.inference_mode]

    def forward(self, x: torch.Tensor, ctx: Optional[ForwardContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        active = self.active()
        out, aux = active(x, ctx)
        if self.training and torch.is_grad_enabled():
            # The idle modes' own weights get a zero gradient rather than none, so every optimizer and
            # engine (plain AdamW, DeepSpeed ZeRO under EP/SP) treats them alike: moments and decay continue.
            used = {id(p) for p in active.parameters()}
            aux = aux + sum(p.sum() for p in self.parameters() if id(p) not in used) * 0.0
        return out, aux

    def make_cache(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Any:
        """The inference mode's cache: only what that mode keeps."""
        return self.modes[self.inference_mode].make_cache(batch_size, device, dtype)
