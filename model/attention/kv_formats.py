"""Byte sizes of one cached key/value entry per storage format (MODEL_SPEC §8.2), for the types' ``kv_bytes``.

fp32/bf16 store every channel at that width; main "fp8" is DeepSeek's FlashMLA "MODEL1" layout
(e4m3 nope channels, bf16 RoPE channels, one ue8m0 scale per 64 nope channels, padded to 8 bytes);
the indexer's "fp8" is e4m3 + one fp32 scale and "fp4" is e2m1 + one ue8m0 scale per 32 values.
"""

from __future__ import annotations

import math

MAIN_FORMATS = ("fp32", "bf16", "fp8")
INDEX_FORMATS = ("fp32", "bf16", "fp8", "fp4")


def main_entry_bytes(head_dim: int, rope_dim: int, fmt: str) -> int:
    if fmt == "fp8":
        nope = head_dim - rope_dim
        raw = nope + 2 * rope_dim + math.ceil(nope / 64)
        return 8 * math.ceil(raw / 8)
    return head_dim * {"fp32": 4, "bf16": 2}[fmt]


def index_entry_bytes(index_head_dim: int, fmt: str) -> float:
    return {"fp32": 4 * index_head_dim, "bf16": 2 * index_head_dim, "fp8": index_head_dim + 4,
            "fp4": index_head_dim / 2 + math.ceil(index_head_dim / 32)}[fmt]
