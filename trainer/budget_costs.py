"""Predicted cost of each layer's budget choices (model/budget.py), from a run's statistics or a calibration.

* ``calibration_costs`` (nats): the validation-loss increase when that layer alone runs the choice,
  with the trained weights (an elastic layer: in that mode), on the first validation batches. Exact for one
  switched layer; the planner adds the layers' increases, which ignores their interactions.
* ``stats_costs`` (attention mass): a proxy when no forward should run. A layer that put mass m on
  its compressed entries (``attn_layers/L../mass_compressed``, the mean of the last logged rows)
  loses, under a choice keeping a fraction f of its compressed cache at the target context,
  m x (1 - f). It ranks compressed layers by how much they read far back; it says nothing of
  window sizes or of types without compressed entries (their choices cost 0: calibrate for those).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..configs import ModelConfig
from ..model.attention.base import AttentionSpec
from ..model.attention.elastic import ElasticAttention
from ..model.budget import Choice
from ..model.transformer import Transformer
from .data import sequence_shard
from .metrics import layer_label

STATS_ROWS = 10  # logged rows averaged per layer (the end of the run)


def stats_costs(rows: Sequence[dict], choices: list[list[Choice]], current: list[AttentionSpec], context: int,
                fmt: str, index_fmt: str) -> list[list[float]]:
    """Attention mass each choice would drop, per layer (``current``: the trained specs)."""
    costs = []
    for layer, (options, spec) in enumerate(zip(choices, current)):
        key = f"attn_layers/{layer_label(layer)}/mass_compressed"
        values = [r[key] for r in rows if key in r][-STATS_ROWS:]
        mass = sum(values) / len(values) if values else 0.0
        own = spec.kv_bytes(context, fmt, index_fmt)[1]
        costs.append([mass * max(0.0, 1.0 - c.spec.kv_bytes(context, fmt, index_fmt)[1] / own) if own else 0.0
                      for c in options])
    return costs


@torch.no_grad()
def mean_loss(model: Transformer, batches: Sequence[torch.Tensor]) -> float:
    """Mean validation loss over blocks [B, seq_len + 1], each batch weighted by its sequences."""
    model.eval()
    total = sum(model(*sequence_shard(b, 0, 1)).lm_loss.double().item() * b.shape[0] for b in batches)
    return total / sum(b.shape[0] for b in batches)


def calibration_costs(cfg: ModelConfig, state: dict[str, torch.Tensor], batches: Sequence[torch.Tensor],
                      choices: list[list[Choice]]) -> tuple[float, list[list[float]]]:
    """(the trained model's loss, per layer and choice the loss increase with that layer alone switched)."""
    model = Transformer(cfg)
    model.load_state_dict(state)
    base = mean_loss(model, batches)
    costs = []
    for layer, options in enumerate(choices):
        block = model.layers[layer]
        trained, row = block.attn, []
        prefix = f"layers.{layer}.attn."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        for c in options:
            if c.current:
                row.append(0.0)
                continue
            if isinstance(trained, ElasticAttention):  # its modes hold their weights already
                trained.set_mode(c.entry)
                row.append(mean_loss(model, batches) - base)
                trained.set_mode(None)
                continue
            block.attn = c.spec.build(cfg, layer)
            wanted = block.attn.state_dict()
            block.attn.load_state_dict({k: own[k] for k in wanted})  # choices only use weights the layer has
            row.append(mean_loss(model, batches) - base)
        block.attn = trained
        costs.append(row)
    return base, costs
