"""Streaming safetensors I/O: read one tensor (or a slice of one) at a time, write without holding them.

``write_safetensors`` lays the header out from planned names, dtypes and shapes, then asks each
plan for its tensor only when its bytes are due, so converting a checkpoint holds one tensor (two
for a fused pair) in memory, never the model. ``atomic_directory`` builds an output directory
next to its destination and renames it into place only once everything is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes (the format's own names).
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class ConversionError(RuntimeError):
    """A checkpoint tensor or file is missing, malformed or unexpected; the message names it."""


class SafetensorsDir:
    """The tensors of a checkpoint directory: ``model.safetensors``, or the shards listed by
    ``model.safetensors.index.json``, or else every ``*.safetensors`` file in it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ConversionError(f"{index} is corrupted: {exc}") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = {}
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.directory} holds no *.safetensors file")
        self._handles: dict[str, Any] = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise ConversionError(f"checkpoint shard {path} (listed in {INDEX_FILE}) is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ConversionError(f"checkpoint file {path} is unreadable or truncated: {exc}") from None
            self._handles[name] = handle
            for key in handle.keys():
                if key in self._file_of:
                    raise ConversionError(f"tensor '{key}' appears in both {self._file_of[key]} and {name}")
                self._file_of[key] = name
        for key, name in weight_map.items():
            if self._file_of.get(key) != name:
                raise ConversionError(f"tensor '{key}' is listed in {INDEX_FILE} under {name} but is not in that file")

    def keys(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str) -> Any:
        if key not in self._file_of:
            raise ConversionError(f"tensor '{key}' is missing from the checkpoint in {self.directory}")
        return self._handles[self._file_of[key]]

    def _slice(self, key: str) -> Any:
        return self._handle(key).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._slice(key).get_dtype()
        if code not in _DTYPES:
            raise ConversionError(f"tensor '{key}' has dtype {code}, which moesaic does not convert")
        return _DTYPES[code]

    def get(self, key: str, index: Optional[tuple] = None) -> torch.Tensor:
        """The tensor, or only ``index`` of it (read from disk without the rest)."""
        return self._slice(key)[index] if index is not None else self._handle(key).get_tensor(key)


@dataclass
class TensorPlan:
    """One tensor to write: its layout, known up front, and how to produce it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, plans: list[TensorPlan], metadata: Optional[dict[str, str]] = None) -> None:
    """Write one safetensors file, loading each planned tensor only when its bytes are written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for plan in plans:
        header[plan.name] = {"dtype": DTYPE_CODES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for plan in plans:
            t = plan.load()
            if tuple(t.shape) != plan.shape or t.dtype != plan.dtype:
                raise ConversionError(f"tensor '{plan.name}' came out {t.dtype} {tuple(t.shape)}, "
                                      f"expected {plan.dtype} {plan.shape}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_sharded(directory: Path, plans: list[TensorPlan], max_shard_bytes: int,
                  metadata: Optional[dict[str, str]] = None) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (a larger tensor gets a shard of its own) plus the index transformers reads."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    if len(shards) == 1:
        write_safetensors(directory / SINGLE_FILE, plans, metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / name, shard, metadata)
        weight_map.update({plan.name: name for plan in shard})
    index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``destination`` to fill; rename it into place on success.

    On any error the temporary directory is removed, so nothing half-written is ever found at
    ``destination``. An existing destination is refused rather than overwritten.
    """
    dst = Path(destination)
    if dst.exists():
        raise ConversionError(f"{dst} already exists; choose a new output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
