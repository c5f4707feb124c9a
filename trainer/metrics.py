"""The metrics panel beyond the loss: MoE load balance, attention/KV statistics and throughput.

Cost model: routers accumulate tokens per expert and score entropy on the device every training
forward (no host sync); attention statistics are collected only during the forward passes of a
log step (``MetricsPanel.arm``). At log steps ``collect`` does one sum and one max all-reduce over
the world, moves a few hundred numbers to the host and resets the accumulators. Per-layer values
are logged under ``moe_layers/`` and ``attn_layers/``; the ``moe/`` and ``attn/`` sections hold
aggregates over layers (the tail that signals trouble: max and p90, or min and p10), so 60 layers
of 256 experts stay a handful of panels. docs/metrics.md lists every key.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..configs import Config
from ..model.attention import AttentionStats, StatsSink, layer_specs
from ..model.kv_accounting import dense_kv_bytes, layer_kv_bytes
from .distributed import all_reduce_sum

H100_BF16_PEAK_FLOPS = 989e12  # dense, per GPU

# Per-layer MoE metrics whose high values signal trouble (aggregated as max and p90 over layers);
# the rest signal trouble when low (min and p10).
HIGH_IS_BAD = {"maxvio", "cv", "dead", "bias_max", "bias_std", "aux_loss", "ep_load"}


def context_label(tokens: int) -> str:
    """131072 -> "128k", 1048576 -> "1M" (binary multiples, as ``moesaic kv-report --context`` reads them)."""
    for suffix, size in (("M", 2**20), ("k", 2**10)):
        if tokens % size == 0:
            return f"{tokens // size}{suffix}"
    return str(tokens)


def layer_label(layer: int) -> str:
    return f"L{layer:02d}"


def balance_metrics(counts: torch.Tensor, ep: int) -> dict[str, torch.Tensor]:
    """Per-layer balance of tokens-per-expert counts [L, E] summed over the world and the log window.

    Loads are relative to the ideal (mean) count: MaxVio = max/mean - 1, CV = std/mean, dead =
    experts with no token. With ``ep`` > 1, rank r owns experts [r*E/ep, (r+1)*E/ep) and ep_load is
    the busiest rank's tokens over the mean rank's.
    """
    mean = counts.mean(dim=-1).clamp(min=1e-12)
    out = {
        "load_min": counts.amin(dim=-1) / mean,
        "maxvio": counts.amax(dim=-1) / mean - 1,
        "cv": counts.std(dim=-1, correction=0) / mean,
        "dead": (counts == 0).sum(dim=-1).float(),
    }
    if ep > 1:
        per_rank = counts.view(counts.shape[0], ep, -1).sum(dim=-1)  # [L, ep]
        out["ep_load"] = per_rank.amax(dim=-1) / per_rank.mean(dim=-1).clamp(min=1e-12)
    return out


def router_metrics(counts: torch.Tensor, sums: torch.Tensor, bias: torch.Tensor, top_k: int, ep: int,
                   seq_aux: bool) -> dict[str, torch.Tensor]:
    """All per-layer MoE metrics from the routers' window: counts [L, E], sums [L, 2] (entropy in
    nats and aux loss, each summed over tokens), expert_bias [L, E] -> name -> [L]."""
    out = balance_metrics(counts, ep)
    tokens = (counts.sum(dim=-1) / top_k).clamp(min=1)
    num_experts = counts.shape[-1]
    out["entropy"] = sums[:, 0] / tokens / (math.log(num_experts) if num_experts > 1 else 1.0)
    if seq_aux:
        out["aux_loss"] = sums[:, 1] / tokens
    out["bias_min"] = bias.amin(dim=-1)
    out["bias_max"] = bias.amax(dim=-1)
    out["bias_std"] = bias.std(dim=-1, correction=0)
    return out


def per_layer_keys(section: str, layers: list[int], values: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"{section}/{layer_label(layer)}/{name}": v.item() for name, vs in values.items()
            for layer, v in zip(layers, vs)}


def moe_aggregates(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Over layers: max and p90 of the metrics where high is bad, min and p10 of the others."""
    out = {}
    for name, v in values.items():
        if name in HIGH_IS_BAD:
            out[f"moe/{name}/max"], out[f"moe/{name}/p90"] = v.max().item(), torch.quantile(v, 0.9).item()
        else:
            out[f"moe/{name}/min"], out[f"moe/{name}/p10"] = v.min().item(), torch.quantile(v, 0.1).item()
    out["moe/dead/total"] = values["dead"].sum().item()
    return out


def kv_metrics(cfg: Config) -> dict[str, float]:
    """Static KV-cache sizes at ``logging.kv_contexts``, in the cache format of the training dtype."""
    fmt = "bf16" if cfg.train.dtype == "bf16" else "fp32"
    m = cfg.model
    dense_layer = [spec.dense_kv_bytes_per_token(fmt) for spec in layer_specs(m)]  # per token, per layer
    out = {}
    for tokens in cfg.logging.kv_contexts:
        ctx = context_label(tokens)
        layers = layer_kv_bytes(m, tokens, fmt)
        total = sum(layer.total for layer in layers)
        out[f"kv/{ctx}/gib"] = total / 2**30
        out[f"kv/{ctx}/bytes_per_token"] = total / tokens
        out[f"kv/{ctx}/compression"] = dense_kv_bytes(m, tokens, fmt) / total
        for layer in layers:
            out[f"kv_layers/{layer_label(layer.layer)}/{ctx}/bytes_per_token"] = layer.total / tokens
            if layer.total:  # a layer reading another's K/V holds none: nothing to compress
                out[f"kv_layers/{layer_label(layer.layer)}/{ctx}/compression"] = \
                    dense_layer[layer.layer] * tokens / layer.total
    return out


def head_metrics(cfg: Config) -> dict[str, float]:
    """Static query heads per layer (its menu entry's; layers may differ, e.g. Laguna's per-layer budget)."""
    return {f"attn_layers/{layer_label(i)}/query_heads": float(spec.num_heads)
            for i, spec in enumerate(layer_specs(cfg.model)) if hasattr(spec, "num_heads")}


def flops_per_token(model: torch.nn.Module, cfg: Config) -> float:
    """Model FLOPs per trained token: 6 x active non-embedding parameters (routed experts count
    top_k of num_experts) + each attention layer's real work over the keys its queries see, MTP blocks
    included (``AttentionSpec.flops_per_token``). Lookup tables (the untied embedding, the per-layer
    embedding table) do no multiply-adds and are left out."""
    params = model.num_params(active_only=True)
    if not cfg.model.tie_embeddings:
        params -= model.embed.weight.numel()
    if model.ple is not None:
        params -= model.ple.embed.weight.numel()
    return 6 * params + sum(spec.flops_per_token(cfg.data.seq_len) for spec in layer_specs(cfg.model))


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@dataclass
class Heatmap:
    """Per-layer x per-expert loads (load / ideal): a wandb Table + heatmap image, or a JSONL object."""

    layers: list[int]
    loads: list[list[float]]  # [layer][expert]

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "load": self.loads}

    def to_wandb(self, key: str) -> dict[str, Any]:
        import wandb

        from .report import heatmap_figure, wandb_image

        rows = [[layer, e, v] for layer, loads in zip(self.layers, self.loads) for e, v in enumerate(loads)]
        fig = heatmap_figure(self.loads, [layer_label(x) for x in self.layers], "expert", "load / ideal")
        return {key: wandb.Table(columns=["layer", "expert", "load"], data=rows), f"{key}_heatmap": wandb_image(fig)}


class MetricsPanel:
    """Collects the panel at log steps; every rank calls ``arm``/``collect`` (they reduce over ranks)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device, world_size: int) -> None:
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.routers = sorted(model.routers(), key=lambda r: r.layer_idx)
        self.sink: StatsSink | None = None  # attention statistics of the forwards it is passed to
        self.flops_per_token = flops_per_token(model, cfg)
        self.peak_flops = cfg.logging.peak_flops or (H100_BF16_PEAK_FLOPS if device.type == "cuda" else None)
        # Constant values, logged with the first collect of each invocation (resumed runs included).
        self.pending_static = {**kv_metrics(cfg), **head_metrics(cfg), "perf/flops_per_token": self.flops_per_token}

    def set_enabled(self, on: bool) -> None:
        """Turn the routers' per-forward accumulation on or off (off = the panel costs nothing)."""
        for router in self.routers:
            router.track_stats = on
            router.reset_stats()

    def arm(self) -> StatsSink:
        """The sink to pass to the coming log step's forwards: its attention statistics go to the next collect."""
        self.sink = StatsSink()
        return self.sink

    def collect(self, step: int, tokens_per_s: float) -> dict[str, Any]:
        """Reduce the window's accumulators over the world, reset them and return the panel."""
        out: dict[str, Any] = dict(self.pending_static)
        self.pending_static = {}
        attn = self.sink.items() if self.sink is not None else []
        self.sink = None
        # One sum all-reduce: router counts [L*E], router sums [L*2], then (sum, count) per attention mean.
        moe = [torch.stack([r.stat_counts for r in self.routers]).flatten(),
               torch.stack([r.stat_sums for r in self.routers]).flatten()] if self.routers else []
        means = [torch.stack([total, torch.as_tensor(count, dtype=torch.float32, device=self.device)])
                 for _, stats in attn for total, count in stats.means.values()]
        summed = all_reduce_sum(torch.cat([torch.zeros(0, device=self.device), *moe, *means])).cpu()
        # One max all-reduce: peak memory, then the attention maxima.
        maxima = [torch.tensor([peak_memory_gib(self.device)], device=self.device)]
        maxima += [v.view(1) for _, stats in attn for v in stats.maxima.values()]
        maxed = _all_reduce_max(torch.cat(maxima)).cpu()

        out["perf/peak_mem_gib"] = maxed[0].item()
        achieved = self.flops_per_token * tokens_per_s / self.world_size
        out["perf/tflops_per_device"] = achieved / 1e12
        if self.peak_flops is not None:
            out["perf/mfu"] = achieved / self.peak_flops
        n_moe = sum(t.numel() for t in moe)
        if self.routers:
            out.update(self._moe(step, summed[:n_moe]))
        out.update(self._attention(attn, summed[n_moe:], maxed[1:]))
        return out

    def _moe(self, step: int, summed: torch.Tensor) -> dict[str, Any]:
        layers, num_experts = [r.layer_idx for r in self.routers], self.routers[0].num_experts
        counts, sums = summed.split([len(layers) * num_experts, 2 * len(layers)])
        counts, sums = counts.view(len(layers), num_experts), sums.view(len(layers), 2)
        bias = torch.stack([r.expert_bias for r in self.routers]).float().cpu()
        for router in self.routers:
            router.reset_stats()
        e = self.cfg.model.moe
        values = router_metrics(counts, sums, bias, e.top_k, self.cfg.parallel.ep, e.seq_aux_loss_coef > 0)
        out: dict[str, Any] = {**per_layer_keys("moe_layers", layers, values), **moe_aggregates(values)}
        every = self.cfg.logging.moe_heatmap_every
        if every and step % every == 0:
            loads = counts / counts.mean(dim=-1, keepdim=True).clamp(min=1e-12)
            out["moe/expert_load"] = Heatmap(layers, loads.tolist())
        return out

    @staticmethod
    def _attention(attn: list[tuple[int, AttentionStats]], summed: torch.Tensor,
                   maxed: torch.Tensor) -> dict[str, float]:
        """Per-layer means and maxima, then means (of means) and maxima (of maxima) over layers."""
        out: dict[str, float] = {}
        by_name: dict[str, list[float]] = {}
        i = j = 0
        for layer, stats in attn:
            for name in stats.means:
                value = (summed[i] / summed[i + 1].clamp(min=1)).item()
                out[f"attn_layers/{layer_label(layer)}/{name}"] = value
                by_name.setdefault(f"attn/{name}/mean", []).append(value)
                i += 2
            for name in stats.maxima:
                out[f"attn_layers/{layer_label(layer)}/{name}"] = maxed[j].item()
                by_name.setdefault(f"attn/{name}/max", []).append(maxed[j].item())
                j += 1
        for key, values in by_name.items():
            out[key] = max(values) if key.endswith("/max") else sum(values) / len(values)
        return out
