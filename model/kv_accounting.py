"""KV-cache accounting for V4-style layer layouts (MODEL_SPEC §8.2).

Per layer and sequence of N tokens, with b_main bytes per head_dim-wide KV vector and b_idx bytes
per index_head_dim-wide indexer key:

    SWA  min(window, N) * b_main
    CSA  min(window, N) * b_main + floor(N / csa_ratio) * (b_main + b_idx)
    HCA  min(window, N) * b_main + floor(N / hca_ratio) * b_main

Entry formats: fp32/bf16 store every channel at that width; "fp8" is DeepSeek's FlashMLA "MODEL1"
layout (e4m3 nope channels, bf16 RoPE channels, one ue8m0 scale per 64 nope channels, padded to 8
bytes: 584 B for V4); the indexer's "fp8" is e4m3 + one fp32 scale (132 B) and "fp4" is e2m1 + one
ue8m0 scale per 32 values (68 B). The fixed comparison point is DeepSeek-V3.2: 61 layers of one MLA
entry (512 latent + 64 RoPE channels; 656 B in FlashMLA's FP8 layout) plus one 128-wide indexer key
(132 B in FP8), in the main format asked for (the paper compares V4 FP8 + FP4 with V3.2 FP8 + FP8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..configs import ModelConfig

MAIN_FORMATS = ("fp32", "bf16", "fp8")
INDEX_FORMATS = ("fp32", "bf16", "fp8", "fp4")
V32_LAYERS, V32_MLA_FP8_BYTES = 61, 656


def main_entry_bytes(head_dim: int, rope_dim: int, fmt: str) -> int:
    if fmt == "fp8":
        nope = head_dim - rope_dim
        raw = nope + 2 * rope_dim + math.ceil(nope / 64)
        return 8 * math.ceil(raw / 8)
    return head_dim * {"fp32": 4, "bf16": 2}[fmt]


def index_entry_bytes(index_head_dim: int, fmt: str) -> float:
    return {"fp32": 4 * index_head_dim, "bf16": 2 * index_head_dim, "fp8": index_head_dim + 4,
            "fp4": index_head_dim / 2 + math.ceil(index_head_dim / 32)}[fmt]


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

    @property
    def total(self) -> float:
        return self.window_bytes + self.compressed_bytes


def layer_kv_bytes(cfg: ModelConfig, tokens: int, fmt: str = "bf16", index_fmt: str | None = None) -> list[LayerKV]:
    """Bytes of each attention layer's decode cache for one sequence of ``tokens`` tokens."""
    a = cfg.attention
    b_main = main_entry_bytes(a.head_dim, a.rope_head_dim, fmt)
    b_idx = index_entry_bytes(a.index_head_dim, index_fmt or fmt)
    window = min(a.window, tokens) * b_main
    out = []
    for i in range(cfg.num_layers):
        kind = cfg.attention_type(i)
        if kind == "csa":
            compressed = (tokens // a.csa_ratio) * (b_main + b_idx)
        elif kind == "hca":
            compressed = (tokens // a.hca_ratio) * b_main
        else:
            compressed = 0
        out.append(LayerKV(i, kind, window, compressed))
    return out


def dense_kv_bytes(cfg: ModelConfig, tokens: int, fmt: str = "bf16") -> float:
    """The same layers without compression or windowing: one shared K=V head per token per layer."""
    return cfg.num_layers * tokens * main_entry_bytes(cfg.attention.head_dim, cfg.attention.rope_head_dim, fmt)


def format_report(cfg: ModelConfig, tokens: int, fmt: str, index_fmt: str) -> str:
    """The table ``moesaic kv-report`` prints."""
    layers = layer_kv_bytes(cfg, tokens, fmt, index_fmt)
    total = sum(layer.total for layer in layers)
    gib = 2 ** 30
    lines = [f"KV cache for one sequence of {tokens:,} tokens (main entries {fmt}, indexer keys {index_fmt})",
             f"{'layer':>5} {'type':>4} {'window MiB':>11} {'compressed MiB':>15} {'total MiB':>10}"]
    lines += [f"{layer.layer:>5} {layer.kind:>4} {layer.window_bytes / 2**20:>11.3f} "
              f"{layer.compressed_bytes / 2**20:>15.3f} {layer.total / 2**20:>10.3f}" for layer in layers]
    counts = {k: sum(layer.kind == k for layer in layers) for k in ("swa", "csa", "hca")}
    dense = dense_kv_bytes(cfg, tokens, fmt)
    v32 = v32_bytes_per_token(fmt) * tokens
    lines += [
        f"layers: {counts['swa']} SWA, {counts['csa']} CSA, {counts['hca']} HCA",
        f"total: {total / gib:.4f} GiB ({total / tokens:,.1f} B/token)",
        f"vs uncompressed full-context KV of the same layers ({dense / gib:.3f} GiB): {dense / total:.2f}x smaller",
        f"vs DeepSeek-V3.2 in {fmt} ({v32 / gib:.3f} GiB): {v32 / total:.2f}x smaller",
    ]
    return "\n".join(lines)
