"""KV-cache accounting of a model's layer layout (MODEL_SPEC §8.2): each layer's attention type says
its bytes (``AttentionSpec.kv_bytes``); for the V4 types, per sequence of N tokens, with b_main bytes
per head_dim-wide KV vector and b_idx bytes per index_head_dim-wide indexer key:

    SWA  min(window, N) * b_main
    CSA  min(window, N) * b_main + floor(N / ratio) * (b_main + b_idx)
    HCA  min(window, N) * b_main + floor(N / ratio) * b_main

Entry formats (``attention/kv_formats.py``): V4's fp8 main entry is 584 B, the indexer's fp8 key
132 B and fp4 key 68 B. The fixed comparison point is DeepSeek-V3.2: 61 layers of one MLA
entry (512 latent + 64 RoPE channels; 656 B in FlashMLA's FP8 layout) plus one 128-wide indexer key
(132 B in FP8), in the main format asked for (the paper compares V4 FP8 + FP4 with V3.2 FP8 + FP8).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..configs import ModelConfig
from .attention import layer_specs
from .attention.kv_formats import INDEX_FORMATS, MAIN_FORMATS, index_entry_bytes, main_entry_bytes

__all__ = ["INDEX_FORMATS", "MAIN_FORMATS", "LayerKV", "dense_kv_bytes", "format_report", "index_entry_bytes",
           "layer_kv_bytes", "main_entry_bytes", "v32_bytes_per_token"]

V32_LAYERS, V32_MLA_FP8_BYTES = 61, 656


def v32_bytes_per_token(fmt: str) -> float:
    """DeepSeek-V3.2's cache per token in ``fmt`` (FP8 means FlashMLA's MLA layout + FP8 indexer)."""
    mla = V32_MLA_FP8_BYTES if fmt == "fp8" else 576 * {"fp32": 4, "bf16": 2}[fmt]
    return V32_LAYERS * (mla + index_entry_bytes(128, fmt))


@dataclass(frozen=True)
class LayerKV:
    layer: int
    kind: str
    window_bytes: float
    compressed_bytes: float
    entry: str = ""  # the layer's model.attention.menu entry
    own_kv_bytes: float = 0.0  # what the layer would hold computing its own K/V (differs for KV-shared layers)

    @property
    def total(self) -> float:
        return self.window_bytes + self.compressed_bytes


def layer_kv_bytes(cfg: ModelConfig, tokens: int, fmt: str = "bf16", index_fmt: str | None = None) -> list[LayerKV]:
    """Bytes of each decoder layer's decode cache for one sequence of ``tokens`` tokens."""
    specs = layer_specs(cfg)[:cfg.num_layers]
    index_fmt = index_fmt or fmt
    return [LayerKV(i, spec.kind, *spec.kv_bytes(tokens, fmt, index_fmt), entry=cfg.attention_type(i),
                    own_kv_bytes=sum(spec.own_kv().kv_bytes(tokens, fmt, index_fmt))) for i, spec in enumerate(specs)]


def dense_kv_bytes(cfg: ModelConfig, tokens: int, fmt: str = "bf16") -> float:
    """The same layers without compression or windowing: every layer keeps its keys/values for every token."""
    return tokens * sum(spec.dense_kv_bytes_per_token(fmt) for spec in layer_specs(cfg)[:cfg.num_layers])


def _ratio(other: float, total: float) -> str:
    return f"{other / total:.2f}x smaller" if other >= total else f"{total / other:.2f}x larger"


def format_report(cfg: ModelConfig, tokens: int, fmt: str, index_fmt: str) -> str:
    """The table ``moesaic kv-report`` prints."""
    layers = layer_kv_bytes(cfg, tokens, fmt, index_fmt)
    total = sum(layer.total for layer in layers)
    gib = 2 ** 30
    width = max(5, *(len(layer.entry) for layer in layers))
    lines = [f"KV cache for one sequence of {tokens:,} tokens (main entries {fmt}, indexer keys {index_fmt})",
             "basis: window-aware (a sliding-window layer keeps min(window, tokens) tokens); a layer reading "
             "another layer's K/V holds 0 bytes",
             f"{'layer':>5} {'entry':>{width}} {'type':>4} {'window MiB':>11} {'compressed MiB':>15} {'total MiB':>10}"]
    lines += [f"{layer.layer:>5} {layer.entry:>{width}} {layer.kind:>4} {layer.window_bytes / 2**20:>11.3f} "
              f"{layer.compressed_bytes / 2**20:>15.3f} {layer.total / 2**20:>10.3f}" for layer in layers]
    counts = Counter(layer.kind for layer in layers)
    dense = dense_kv_bytes(cfg, tokens, fmt)
    v32 = v32_bytes_per_token(fmt) * tokens
    lines += [
        "layers: " + ", ".join(f"{n} {kind.upper()}" for kind, n in counts.items()),
        f"total: {total / gib:.4f} GiB ({total / tokens:,.1f} B/token)",
        f"vs uncompressed full-context KV of the same layers ({dense / gib:.3f} GiB): {_ratio(dense, total)}",
        f"vs DeepSeek-V3.2 in {fmt} ({v32 / gib:.3f} GiB): {_ratio(v32, total)}",
    ]
    shared = [layer for layer in layers if layer.own_kv_bytes != layer.total]
    if shared:
        own = sum(layer.own_kv_bytes - layer.total for layer in shared)
        lines.append(f"KV-shared layers {','.join(str(layer.layer) for layer in shared)}: 0 bytes; with their own "
                     f"K/V they would add {own / gib:.4f} GiB ({(total + own) / total:.2f}x the total)")
    return "\n".join(lines)
